"""Energies and forces of batches of configurations from OpenMM, and the one bridge between
them and PyTorch's autograd.

An ``openmm.System`` pickles (as XML); an ``openmm.Context`` does not. :class:`OpenMMEvaluator`
therefore carries the System's XML and builds its Context lazily, in the process that evaluates
(an EnergyEvaluator actor, or a system's own potential in this process), on an explicitly named
platform with an explicit CPU thread count. Nothing here chooses a GPU by itself: Ray >= 2.60
leaves GPUs visible to actors that asked for none, so the platform is always the caller's
decision (the job's ``energy.platform``).

:class:`BatchEnergy` makes any batch energy function x -> (U, ∇U) differentiable in torch:
the EnergyEvaluator pool's energies in training (flow coordinates) and ice's own potential
(site positions, ∇U = −F) both go through it.

Units: positions in nm, energies in kJ/mol, forces in kJ/mol/nm (OpenMM's own). Toy systems
written as OpenMM Systems read these numbers in their own reduced units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

PLATFORMS = ("CPU", "Reference", "CUDA", "OpenCL")

BatchEnergyFunction = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""x (B, ...) -> (U (B,), ∇U shaped like x), numpy arrays in the caller's energy units."""


class BatchEnergy(torch.autograd.Function):
    """U(x) (B,) float64 from a batch energy function x -> (U, ∇U) computed outside torch (numpy,
    OpenMM, another process), with ∇U as the gradient; x is (B, ...) of any trailing shape.

    Non-finite U stay non-finite: a non-finite loss makes training skip that step before any
    gradient is used, so nothing is zeroed here.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, energy: BatchEnergyFunction) -> torch.Tensor:
        u, grad = energy(x.detach().cpu().numpy())
        ctx.save_for_backward(torch.as_tensor(np.asarray(grad, dtype=np.float64),
                                              device=x.device))
        return torch.as_tensor(np.asarray(u, dtype=np.float64), device=x.device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        # dL/dx_b = dL/dU_b ∇U_b, the per-row factor broadcast over x's trailing axes.
        return grad_output.reshape(-1, *(1,) * (grad.ndim - 1)) * grad, None


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
        A frame with a non-finite position gets U = NaN and F = 0 without reaching OpenMM
        (which would raise), so that one bad sample costs its own weight, not the batch.
        """
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim != 3 or positions.shape[-1] != 3:
            raise ValueError(f"positions: shape {positions.shape} is not allowed; must be "
                             "(batch, n_particles, 3)")
        import openmm
        from openmm import unit

        context = self.context()
        energies = np.full(len(positions), np.nan)
        forces = np.zeros_like(positions)
        for i, frame in enumerate(positions):
            if not np.isfinite(frame).all():
                continue
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

    def energies_and_gradients(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positions (B, n_particles, 3) nm -> U (B,) kJ/mol, ∇U = −F (B, n_particles, 3): the
        batch energy function of :class:`BatchEnergy` over particle positions."""
        energies, forces = self.energies_and_forces(positions)
        return energies, -forces


def openmm_energy_function(system: Any, platform: str = "CPU", threads: int = 1
                           ) -> BatchEnergyFunction:
    """x (B, dim) flow coordinates -> (U (B,) kJ/mol, ∇U (B, dim)) by ``system``'s OpenMM form
    on ``platform``; the Context is built on first use, in the calling process."""
    import openmm

    evaluator = OpenMMEvaluator(openmm.XmlSerializer.serialize(system.openmm_system()),
                                platform=platform, threads=threads)

    def energy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u, forces = evaluator.energies_and_forces(system.openmm_positions(x))
        return u, system.flow_gradient(forces, x)

    return energy


class LocalOpenMMPotential:
    """Mixin for a system whose own ``potential`` runs OpenMM in the calling process (ice, a
    peptide): the platform it runs on (the job's ``energy.platform``) and a lazily built
    evaluator of ``self.openmm_system()``, dropped when the system is pickled (a Context does
    not travel). The class sets ``self._evaluator = None``, ``self._platform = "CPU"`` and
    ``self._lock = threading.Lock()`` in its ``__init__``."""

    _evaluator: Any
    _platform: str
    _lock: Any

    def set_openmm_platform(self, platform: str) -> None:
        """The potential runs on OpenMM's ``platform`` from its next call (CPU until set; the
        evaluator refuses a platform OpenMM does not name)."""
        with self._lock:
            if platform != self._platform:
                self._platform, self._evaluator = platform, None

    def _local_evaluator(self) -> OpenMMEvaluator:
        with self._lock:
            if self._evaluator is None:
                import openmm

                self._evaluator = OpenMMEvaluator(
                    openmm.XmlSerializer.serialize(self.openmm_system()),  # type: ignore[attr-defined]
                    platform=self._platform, threads=max(1, torch.get_num_threads()))
            return self._evaluator

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_evaluator"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import threading

        self.__dict__.update(state)
        self._lock = threading.Lock()
