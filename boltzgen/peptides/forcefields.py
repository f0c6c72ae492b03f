"""The force fields peptides are built with, set up as the Boltzmann-generator literature sets
them up (transferable Boltzmann generators, equivariant flow matching).

Both are Amber with a generalized-Born implicit solvent, no constraints and no water:

- ``amber99sbildn-obc``: amber99sbildn.xml + amber99_obc.xml, no cutoff, 300 K; the alanine
  dipeptide of those papers. Forces: HarmonicBondForce, HarmonicAngleForce,
  PeriodicTorsionForce, NonbondedForce (NoCutoff), GBSAOBCForce (OBC2 parameters, NoCutoff).
- ``amber14-obc1``: amber14-all.xml + implicit/obc1.xml, non-periodic cutoff 2.0 nm, 310 K;
  their other dipeptides. Forces: HarmonicBondForce, HarmonicAngleForce,
  PeriodicTorsionForce, NonbondedForce (CutoffNonPeriodic, 2.0 nm), CustomGBForce (OBC1,
  CutoffNonPeriodic, 2.0 nm).

With a cutoff OpenMM's NonbondedForce would apply a reaction field; both implicit-solvent files
set its dielectric to 1, so the solvent's screening comes from the GB term alone.
Units: nm, kJ/mol, K.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import openmm
from openmm import app, unit

NONBONDED_METHODS = ("NoCutoff", "CutoffNonPeriodic")


@functools.cache
def _load_forcefield(files: tuple[str, ...]) -> app.ForceField:
    """OpenMM's ForceField from its shipped XML files, parsed once per process."""
    return app.ForceField(*files)


@dataclass(frozen=True)
class ForceFieldSpec:
    """A force field: OpenMM XML files and how the System is created from them.

    Attributes:
        name: key in :data:`FORCE_FIELDS`.
        files: OpenMM force-field XML files (shipped with OpenMM).
        nonbonded_method: an ``openmm.app`` nonbonded method by name, one of
            :data:`NONBONDED_METHODS`.
        cutoff_nm: nonbonded (and GB) cutoff in nm; None without a cutoff.
        temperature_k: temperature the literature samples this force field at, K.
        description: one line for reports.
    """

    name: str
    files: tuple[str, ...]
    nonbonded_method: str
    cutoff_nm: float | None
    temperature_k: float
    description: str

    def forcefield(self) -> app.ForceField:
        """The parsed ``openmm.app.ForceField`` (shared, cached per process)."""
        return _load_forcefield(self.files)

    def create_system(self, topology: app.Topology) -> openmm.System:
        """The System of ``topology``: no constraints (every bond vibrates, as in the papers),
        no water, and no CMMotionRemover.

        removeCMMotion is False so that the System holds only the physical forces: its energy
        must be the pure potential U(x) (kJ/mol) that the flow's estimators use, and the
        flow's frame already removes the external (translational, rotational) degrees of
        freedom.
        """
        kwargs = {}
        if self.cutoff_nm is not None:
            kwargs["nonbondedCutoff"] = self.cutoff_nm * unit.nanometer
        return self.forcefield().createSystem(
            topology,
            nonbondedMethod=getattr(app, self.nonbonded_method),
            constraints=None,
            removeCMMotion=False,
            **kwargs,
        )


FORCE_FIELDS: dict[str, ForceFieldSpec] = {
    "amber99sbildn-obc": ForceFieldSpec(
        name="amber99sbildn-obc",
        files=("amber99sbildn.xml", "amber99_obc.xml"),
        nonbonded_method="NoCutoff",
        cutoff_nm=None,
        temperature_k=300.0,
        description="Amber99SB-ILDN with OBC implicit solvent, no cutoff, 300 K "
                    "(alanine dipeptide of the transferable-BG and flow-matching papers)",
    ),
    "amber14-obc1": ForceFieldSpec(
        name="amber14-obc1",
        files=("amber14-all.xml", "implicit/obc1.xml"),
        nonbonded_method="CutoffNonPeriodic",
        cutoff_nm=2.0,
        temperature_k=310.0,
        description="Amber14 with OBC1 implicit solvent, non-periodic 2.0 nm cutoff, 310 K "
                    "(the other dipeptides of those papers)",
    ),
}


def get_force_field(name: str) -> ForceFieldSpec:
    """The :class:`ForceFieldSpec` called ``name`` (case and surrounding blanks ignored);
    ValueError naming ``system.force_field`` otherwise."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in FORCE_FIELDS:
        raise ValueError(f"system.force_field: {name!r} is not allowed; choose one of "
                         f"{', '.join(FORCE_FIELDS)}")
    return FORCE_FIELDS[key]
