"""Energy backends, registered in :data:`ENERGY_BACKENDS` under the spec's ``energy.backend``:
how a job's batch energy function x -> (U, ∇U) is computed.

A backend class has ``complaints(job, system)`` and ``make(system, energy, threads)``, which
returns the function (flow coordinates (B, dim) -> U (B,) in energy units and ∇U (B, dim)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from boltzgen.pipeline.problem import EnergyFunction, float64_tensor
from boltzgen.registry import Registry
from boltzgen.settings import EnergySettings, SettingError

if TYPE_CHECKING:
    from boltzgen.settings import JobSettings
    from boltzgen.systems.base import System


class EnergyBackend:
    name: ClassVar[str]
    # Whether training sends its energies to the energy-evaluator pool (whose actors keep
    # what is costly to build, such as an OpenMM Context) rather than computing them in the
    # trainer's own process.
    pooled_in_training: ClassVar[bool] = False
    uses_openmm: ClassVar[bool] = False  # where it runs, OpenMM needs the platform's devices

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        return iter(())

    @classmethod
    def make(cls, system: System, energy: EnergySettings, threads: int = 1) -> EnergyFunction:
        raise NotImplementedError

    @classmethod
    def training_potential(cls, system: System, energy: EnergySettings
                           ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A differentiable U(x) (energy units) of flow coordinates (..., dim) for a trainer
        that computes its energies in its own process (a backend not ``pooled_in_training``);
        None: the system's own ``potential``."""
        return None


ENERGY_BACKENDS: Registry[EnergyBackend] = Registry("energy backend", field="energy.backend")


@ENERGY_BACKENDS.register("torch")
class TorchEnergy(EnergyBackend):
    """The system's own torch potential in the calling process; ∇U by autograd."""

    @classmethod
    def make(cls, system: System, energy: EnergySettings, threads: int = 1) -> EnergyFunction:
        # A system whose torch potential is OpenMM in this process (ice) runs it on the
        # job's platform.
        system.set_openmm_platform(energy.platform)

        def torch_energy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            xt = float64_tensor(x).requires_grad_(True)
            u = system.potential(xt)
            (grad,) = torch.autograd.grad(u.sum(), xt)
            return u.detach().numpy(), grad.numpy()

        return torch_energy


@ENERGY_BACKENDS.register("openmm")
class OpenMMEnergy(EnergyBackend):
    """The system's OpenMM form on ``energy.platform`` with ``threads`` CPU threads; the
    Context is built on first use, in the calling process."""

    pooled_in_training = True
    uses_openmm = True

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        if not system.supports_openmm():
            yield SettingError("energy.backend", "openmm", f"system '{system.kind}' has no "
                               "OpenMM form; use torch")

    @classmethod
    def make(cls, system: System, energy: EnergySettings, threads: int = 1) -> EnergyFunction:
        from boltzgen.openmm_bridge import openmm_energy_function

        return openmm_energy_function(system, energy.platform, threads)


@ENERGY_BACKENDS.register("torch_forcefield")
class TorchForceFieldEnergy(EnergyBackend):
    """The system's OpenMM force field re-implemented in PyTorch
    (:class:`boltzgen.forcefield_torch.TorchForceField`: bonds, angles, torsions, Coulomb and
    Lennard-Jones with their 1-4 exceptions, OBC generalized Born with its surface term; no
    cutoff), batched and differentiable, in the calling process: a trainer computes a whole
    batch at once instead of sending one configuration per OpenMM call to the pool. For
    systems whose flow coordinates are Cartesian positions (molecules)."""

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        from boltzgen.layouts import MoleculeLayout

        if not system.supports_openmm() or not isinstance(system.layout(), MoleculeLayout):
            yield SettingError("energy.backend", "torch_forcefield", f"system '{system.kind}' "
                               "is not a molecule with an OpenMM force field; use torch or "
                               "openmm")

    @classmethod
    def training_potential(cls, system: System, energy: EnergySettings
                           ) -> Callable[[torch.Tensor], torch.Tensor]:
        from boltzgen.forcefield_torch import TorchForceField

        forcefield = TorchForceField(system.openmm_system())
        n_atoms = forcefield.n_atoms

        def potential(x: torch.Tensor) -> torch.Tensor:
            return forcefield.to(x.device)(x.reshape(*x.shape[:-1], n_atoms, 3))

        return potential

    @classmethod
    def make(cls, system: System, energy: EnergySettings, threads: int = 1) -> EnergyFunction:
        potential = cls.training_potential(system, energy)

        def forcefield_energy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            xt = float64_tensor(x).requires_grad_(True)
            u = potential(xt)
            (grad,) = torch.autograd.grad(u.sum(), xt)
            return u.detach().numpy(), grad.numpy()

        return forcefield_energy
