"""Energies and forces of batches of configurations from OpenMM.

An ``openmm.System`` pickles (as XML); an ``openmm.Context`` does not. :class:`OpenMMEvaluator`
therefore carries the System's XML and builds its Context lazily, in the process that evaluates
(an EnergyEvaluator actor), on an explicitly named platform with an explicit CPU thread count.
Nothing here chooses a GPU by itself: Ray >= 2.60 leaves GPUs visible to actors that asked for
none, so the platform is always the caller's decision.

Units: positions in nm, energies in kJ/mol, forces in kJ/mol/nm (OpenMM's own). Toy systems
written as OpenMM Systems read these numbers in their own reduced units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLATFORMS = ("CPU", "Reference", "CUDA", "OpenCL")


@dataclass
class OpenMMEvaluator:
    """Potential energies U (kJ/mol) and forces −∇U (kJ/mol/nm) for batches of positions.

    Args:
        system_xml: ``openmm.XmlSerializer.serialize(system)``.
        platform: one of :data:`PLATFORMS`, never guessed.
        threads: CPU threads of the CPU platform (the actor's CPUs).
    """

    system_xml: str
    platform: str = "CPU"
    threads: int = 1
    _context: Any = field(default=None, init=False, repr=False)
    _virtual: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ValueError(f"energy.platform: {self.platform!r} is not allowed; choose one of "
                             f"{', '.join(PLATFORMS)}")
        if self.threads < 1:
            raise ValueError(f"threads: {self.threads!r} is not allowed; must be >= 1")

    def __getstate__(self) -> dict[str, Any]:
        # A Context cannot travel between processes; the receiver builds its own.
        return {"system_xml": self.system_xml, "platform": self.platform,
                "threads": self.threads, "_context": None, "_virtual": None}

    def context(self) -> Any:
        if self._context is None:
            import openmm

            system = openmm.XmlSerializer.deserialize(self.system_xml)
            platform = openmm.Platform.getPlatformByName(self.platform)
            properties = {"Threads": str(self.threads)} if self.platform == "CPU" else {}
            # The integrator never steps: the Context only evaluates energies and forces.
            integrator = openmm.VerletIntegrator(0.001)
            self._context = openmm.Context(system, integrator, platform, properties)
            self._virtual = np.array([system.isVirtualSite(i)
                                      for i in range(system.getNumParticles())], dtype=bool)
        return self._context

    def energies_and_forces(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positions (B, n_particles, 3) nm -> U (B,) kJ/mol, F (B, n_particles, 3) kJ/mol/nm.

        Virtual sites' positions are recomputed from their parents; their forces come back as 0
        (OpenMM has moved them onto the parent atoms), so −F is ∇U over the real atoms.
        """
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim != 3 or positions.shape[-1] != 3:
            raise ValueError(f"positions: shape {positions.shape} is not allowed; must be "
                             "(batch, n_particles, 3)")
        import openmm
        from openmm import unit

        context = self.context()
        energies = np.empty(len(positions))
        forces = np.empty_like(positions)
        for i, frame in enumerate(positions):
            context.setPositions(frame)
            # Virtual sites (e.g. TIP4P M sites) follow the real atoms before evaluation.
            context.computeVirtualSites()
            state = context.getState(getEnergy=True, getForces=True)
            energies[i] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            forces[i] = state.getForces(asNumpy=True).value_in_unit(
                unit.kilojoule_per_mole / unit.nanometer)
        # OpenMM has already added each virtual site's force onto its parent atoms but still
        # reports it on the site; a virtual site is not a degree of freedom, so its force is
        # zeroed here (otherwise a chain rule through the site would count it twice).
        forces[:, self._virtual] = 0.0
        del openmm
        return energies, forces
