"""A peptide in implicit solvent, built from its sequence (:mod:`boltzgen.peptides`).

Flow coordinates: the Cartesian positions of all atoms, x[3 i + a] in nm (the ``molecule``
layout, with the topology: elements, bonds, atom names, residue of each atom and its amino
acid). U(x) is the force field's potential energy in kJ/mol from OpenMM (no cutoff or a
non-periodic cutoff, no constraints; ``force_field`` names the literature's set-ups,
:data:`boltzgen.peptides.FORCE_FIELDS`).

U is invariant under translations and rotations, so exp(−u) is not normalizable on R^{3n}:
free energies and densities are taken on the quotient of R^{3n} by rigid motions,
dx^{3n} = dT · dR · dμ (dR the Haar measure of SO(3) with mass 8π²), Z = ∫ exp(−u) dμ. A flow
for this system must remove the six external degrees of freedom (the ``internal_coordinates``
flow does, and its log q is a density on dμ).

The force field is achiral (U(−x) = U(x)), so the Boltzmann density on all of R^{3n} has a
mirror-image (D) copy of every state. The target of a job is the L peptide: samples with a D
residue are invalid (:meth:`valid_samples`); they get weight zero and are counted.

Metastable states (the transferable-BG papers'): φ < 0 against φ > 0 of the backbone dihedral
φ that :func:`mdtraj.compute_phi` finds (of X in ACE-X-NME, of Y in X-Y), ΔF_φ =
F(φ > 0) − F(φ < 0) in kT.
"""

from __future__ import annotations

import threading
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from boltzgen.layouts import MoleculeLayout
from boltzgen.openmm_bridge import BatchEnergy, LocalOpenMMPotential
from boltzgen.systems.base import System
from boltzgen.units import KB_KJ_PER_MOL_K


class PeptideSystem(LocalOpenMMPotential, System):
    """A capped single residue (ACE-X-NME) or a dipeptide with free termini (X-Y).

    Args:
        sequence: dash-separated three-letter codes, e.g. ``"ACE-ALA-NME"`` (alanine
            dipeptide) or ``"ALA-TYR"``.
        force_field: ``"amber99sbildn-obc"`` or ``"amber14-obc1"``
            (:data:`boltzgen.peptides.FORCE_FIELDS`).

    The molecule is built (pdbfixer, hydrogens, minimisation, checks) on first use of its
    structure or energy, in the process that uses it; a build that fails raises
    :class:`boltzgen.peptides.PeptideBuildError` there, failing the job that needed it.
    """

    kind: ClassVar[str] = "peptide"
    estimand_note: ClassVar[str] = (
        "a peptide in implicit solvent; flow coordinates = Cartesian atom positions (nm); "
        "densities and Z on the quotient of R^3n by rigid motions (dx = dT dR dmu, the "
        "translation volume and the 8 pi^2 of SO(3) left out), L peptide only"
    )
    potential_runs_openmm: ClassVar[bool] = True
    boltzmann_constant: float = KB_KJ_PER_MOL_K
    metastable_label: ClassVar[str] = "phi"

    def __init__(self, *, sequence: str = "ACE-ALA-NME",
                 force_field: str = "amber99sbildn-obc") -> None:
        from boltzgen.peptides import FORCE_FIELDS, parse_sequence

        if not isinstance(sequence, str):
            raise ValueError(f"sequence: {sequence!r} is not allowed; a string such as "
                             "'ACE-ALA-NME' or 'ALA-TYR'")
        try:
            residues = parse_sequence(sequence)
        except ValueError as error:  # its message names "system.sequence"; make_system adds
            raise ValueError(str(error).removeprefix("system.")) from None  # the prefix
        self.sequence = "-".join(residues)
        if force_field not in FORCE_FIELDS:
            raise ValueError(f"force_field: {force_field!r} is not allowed; choose one of "
                             f"{', '.join(FORCE_FIELDS)}")
        self.force_field = force_field
        self.dim = 3 * self.topology.n_atoms
        self._evaluator: Any = None
        self._platform = "CPU"
        self._lock = threading.Lock()

    # -- the molecule ---------------------------------------------------------------------------
    @property
    def topology(self) -> Any:
        """The peptide completed but not minimised (:func:`boltzgen.peptides.peptide_topology`):
        atoms, bonds, dihedrals, the force field's System; cached per process."""
        from boltzgen.peptides import peptide_topology

        return peptide_topology(self.sequence, self.force_field)

    @property
    def molecule(self) -> Any:
        """The built, minimised and checked peptide (:func:`boltzgen.peptides.build_peptide`;
        cached per process)."""
        from boltzgen.peptides import build_peptide

        return build_peptide(self.sequence, self.force_field)

    @property
    def literature_temperature(self) -> float:
        """The temperature (K) the force field's set-up comes with in the literature."""
        from boltzgen.peptides import FORCE_FIELDS

        return FORCE_FIELDS[self.force_field].temperature_k

    @cached_property
    def _layout(self) -> MoleculeLayout:
        top = self.topology
        return MoleculeLayout(top.n_atoms, tuple(top.elements), tuple(top.bonds),
                              atom_names=tuple(top.atom_names),
                              residue_indices=tuple(top.residue_indices),
                              residue_names=tuple(top.residue_names),
                              slow_torsions=(tuple(map(int, top.phi_atoms)),
                                             tuple(map(int, top.psi_atoms))))

    def layout(self) -> MoleculeLayout:
        return self._layout

    def ideal_coordinates(self) -> np.ndarray:
        """The minimised structure (dim,), nm: where MD starts."""
        return np.asarray(self.molecule.positions_nm, dtype=np.float64).reshape(-1).copy()

    def from_cartesian(self, xyz: np.ndarray) -> np.ndarray:
        """Positions (F, n, 3) nm -> flow coordinates (F, 3n)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        return xyz.reshape(len(xyz), self.dim)

    def openmm_positions(self, x: np.ndarray) -> np.ndarray:
        """Flow coordinates (B, 3n) -> positions (B, n, 3) nm."""
        return np.asarray(x, dtype=np.float64).reshape(-1, self.dim // 3, 3)

    def flow_gradient(self, forces: np.ndarray, x: np.ndarray) -> np.ndarray:
        """∇U (B, 3n) from OpenMM forces (B, n, 3) kJ/mol/nm: the coordinates are Cartesian."""
        return -np.asarray(forces, dtype=np.float64).reshape(len(forces), self.dim)

    def mdtraj_topology(self) -> Any:
        return self.topology.mdtraj_topology()

    # -- energy ---------------------------------------------------------------------------------
    def openmm_system(self) -> Any:
        """The force field's ``openmm.System`` for this molecule (a fresh copy)."""
        import openmm

        return openmm.XmlSerializer.deserialize(
            openmm.XmlSerializer.serialize(self.topology.system))



    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """U(x) in kJ/mol from OpenMM in this process; (..., 3n) -> (...), differentiable
        (∇U from OpenMM's forces through :class:`boltzgen.openmm_bridge.BatchEnergy`)."""
        self._check_coordinates(x)
        flat = x.reshape(-1, self.dim)
        positions = flat.reshape(-1, self.dim // 3, 3)
        energy = BatchEnergy.apply(positions, self._local_evaluator().energies_and_gradients)
        return energy.reshape(x.shape[:-1])

    # -- what a job measures ----------------------------------------------------------------
    def valid_samples(self, x: np.ndarray) -> np.ndarray:
        """True where every amino acid of the sample is L (and its coordinates are finite);
        D samples are the force field's mirror states, not the target's."""
        from boltzgen.peptides import is_l_amino_acid

        arr = self._as_samples(x)
        finite = np.isfinite(arr).all(axis=1)
        xyz = np.where(finite[:, None], arr, 0.0).reshape(len(arr), -1, 3)
        return finite & is_l_amino_acid(xyz, self.topology.chiral_centers)

    def backbone_dihedrals(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(φ, ψ) in radians, in (−π, π], of samples (N, 3n): the φ and ψ that mdtraj's
        compute_phi / compute_psi find in this molecule."""
        from boltzgen.peptides.observables import backbone_dihedrals

        arr = self._as_samples(x)
        top = self.topology
        # n atoms explicitly: a reshape with -1 fails for zero samples (all of them invalid)
        return backbone_dihedrals(arr.reshape(len(arr), self.dim // 3, 3), top.phi_atoms,
                                  top.psi_atoms)

    # The Ramachandran basins of :meth:`mode_index`, in its order.
    mode_names: ClassVar[tuple[str, ...]] = ("C5", "C7eq", "alphaR", "alphaL", "C7ax")
    mode_count: ClassVar[int] = len(mode_names)

    def mode_index(self, x: np.ndarray) -> np.ndarray:
        """The Ramachandran basin of each sample (N, 3n), from its backbone (φ, ψ) in degrees:

        - φ < 0: αR (2) where −120 <= ψ < 50; otherwise the extended region, split at
          φ = −120 into C5 (0, φ < −120: β and C5) and C7eq (1, −120 <= φ < 0: C7eq and PII);
        - φ >= 0: αL (3) where ψ >= 0, C7ax (4) where ψ < 0.

        Straight lines between the basins' centres (C5 near (−155, 160), C7eq (−83, 75),
        αR (−75, −40), αL (60, 40), C7ax (75, −65)); a sample's basin is its region, with no
        gap left out. Non-finite samples land in C7eq; the caller masks them (invalid)."""
        phi, psi = (np.degrees(a) for a in self.backbone_dihedrals(x))
        alpha_r = (-120.0 <= psi) & (psi < 50.0)
        out = np.where(phi < -120.0, 0, 1)
        out = np.where(alpha_r, 2, out)
        out = np.where(phi >= 0.0, np.where(psi >= 0.0, 3, 4), out)
        return out.astype(np.int64)

    def metastable_coordinate(self, x: np.ndarray) -> np.ndarray:
        """φ (radians) of each sample (N, 3n); the states are φ < 0 and φ > 0."""
        return self.backbone_dihedrals(x)[0]

    # -- symmetry: hydrogens that differ only by their labels ------------------------------
    @cached_property
    def hydrogen_rotors(self) -> tuple[tuple[int, int, int], ...]:
        """Triples of atom indices (sorted) of the three hydrogens of each methyl, NH3+ (and
        any other atom with exactly three terminal hydrogens) whose per-particle parameters
        agree in every force of the force field: U is invariant under relabelling them."""
        top = self.topology
        neighbours: dict[int, list[int]] = {i: [] for i in range(top.n_atoms)}
        for i, j in top.bonds:
            neighbours[i].append(j)
            neighbours[j].append(i)
        hydrogen = [e.strip().upper() == "H" for e in top.elements]
        forces = [f for f in top.system.getForces()
                  if hasattr(f, "getNumParticles") and hasattr(f, "getParticleParameters")]

        def parameters(i: int) -> tuple[Any, ...]:
            return tuple(str(f.getParticleParameters(i)) for f in forces)

        rotors = []
        for centre in range(top.n_atoms):
            terminal = sorted(m for m in neighbours[centre]
                              if hydrogen[m] and len(neighbours[m]) == 1)
            if (len(terminal) == 3 and not hydrogen[centre]
                    and len({parameters(h) for h in terminal}) == 1):
                rotors.append(tuple(terminal))
        return tuple(rotors)

    @property
    def symmetry_operation_count(self) -> int:
        """G = 3^k: a cyclic relabelling (0, 1 or 2 places) of each of the k hydrogen rotors."""
        return 3 ** len(self.hydrogen_rotors)

    def symmetry_images(self, x: np.ndarray, operations: np.ndarray | None = None) -> np.ndarray:
        """Samples (B, 3n) with the hydrogens of each rotor (:attr:`hydrogen_rotors`)
        relabelled cyclically: operation g = Σ_j s_j 3^j moves the positions of rotor j's
        (h_0, h_1, h_2) to (h_{s_j}, h_{s_j+1}, h_{s_j+2}) (indices mod 3). Identical atoms
        trade places, so U, every amino acid's chirality and the Z-matrix's sibling torsions
        (a cyclic relabelling keeps each H's side) are unchanged: p(g x) = p(x). Row b by
        ``operations[b]``, or without ``operations`` every image, (G B, 3n) with image g of
        sample b at row g B + b."""
        arr = self._as_samples(x)
        count = self.symmetry_operation_count
        if operations is None:
            chosen = np.repeat(np.arange(count), len(arr))
            arr = np.tile(arr, (count, 1))
        else:
            chosen = np.asarray(operations)
            if chosen.shape != (len(arr),) or chosen.min(initial=0) < 0 or chosen.max(
                    initial=0) >= count:
                raise ValueError(f"operations: shape {chosen.shape} with values in "
                                 f"[{chosen.min(initial=0)}, {chosen.max(initial=0)}] is not "
                                 f"allowed; need ({len(arr)},) ints in [0, {count})")
        xyz = arr.reshape(len(arr), -1, 3)
        out = xyz.copy()
        for j, rotor in enumerate(self.hydrogen_rotors):
            shift = (chosen // 3**j) % 3
            atoms = np.asarray(rotor)
            for s in (1, 2):
                rows = shift == s
                out[np.ix_(rows, atoms)] = xyz[np.ix_(rows, np.roll(atoms, -s))]
        return out.reshape(len(arr), self.dim)

    def observables(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The backbone dihedrals φ and ψ (radians) of samples (N, 3n)."""
        phi, psi = self.backbone_dihedrals(x)
        return {"phi_rad": phi, "psi_rad": psi}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_layout", None)  # rebuilt from the topology where it is needed
        return state


__all__ = ["PeptideSystem"]
