"""Base states "A" of a free-energy calculation (the flow maps A -> B), registered in
:data:`BASES` under the spec's ``base.kind``.

Each state exposes ``reduced_energy(x)`` (dimensionless, kT units) and ``free_energy``,
f_A = -ln ∫ exp(-u_A(x)) dx in kT, or None where it is unknown and only differences are
meaningful (docs/architecture.md, Conventions: ΔF = f_B - f_A). A registered base class also
builds itself from a job's settings (``from_settings``) and checks how it goes with the job's
system (``complaints``); its class attributes say what the rest of the science may do with it:
``samples_directly`` (a normalized density the flow's training and sampling draw from) and
``temperature_ladder`` (the system itself at another temperature: ΔF between temperatures, with
an MBAR ladder between them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch

from boltzgen._checks import check_float, check_int
from boltzgen.priors import GaussianPrior, UniformRigidPrior
from boltzgen.registry import Registry
from boltzgen.settings import SettingError
from boltzgen.systems.base import System

if TYPE_CHECKING:
    from boltzgen.settings import JobSettings

BASES: Registry[type] = Registry("base", field="base.kind")
"""Base states A by ``base.kind``."""


def _no_temperature(job: JobSettings) -> Iterator[SettingError]:
    if job.base.temperature is not None:
        yield SettingError("base.temperature", job.base.temperature,
                           f"a {job.base.kind} base has no temperature")


def _flat_coordinates(job: JobSettings, system: System) -> Iterator[SettingError]:
    if system.rigid_layout() is not None:
        yield SettingError("base.kind", job.base.kind, f"system '{system.kind}' has "
                           "rigid-body coordinates (torus × S³); use 'uniform' or "
                           "'thermodynamic'")


@BASES.register("normal")
class NormalBase:
    """Normalized Gaussian N(0, scale^2 I) in ``dim`` dimensions; f_A = 0 exactly.

    u_A(x) = -log N(x; 0, scale^2 I) = |x|^2 / (2 scale^2) + dim ln(scale) + (dim/2) ln(2 pi),
    so exp(-u_A) integrates to 1 and f_A = -ln 1 = 0. For systems with Euclidean flow
    coordinates. ``prior`` is the same density as the module a flow owns
    (:class:`boltzgen.priors.GaussianPrior`); sampling and u_A go through it.
    """

    free_energy: float = 0.0
    samples_directly: ClassVar[bool] = True
    temperature_ladder: ClassVar[bool] = False
    description: ClassVar[str] = "Gaussian"
    temperature = None

    @classmethod
    def from_settings(cls, job: JobSettings, system: System) -> NormalBase:
        return cls(system.dim, job.base.scale)

    @classmethod
    def complaints(cls, job: JobSettings, system: System, *, temperature_known: bool = True
                   ) -> Iterator[SettingError]:
        yield from _flat_coordinates(job, system)
        yield from _no_temperature(job)

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        self.dim = check_int("dim", dim, minimum=1)
        self.prior = GaussianPrior(self.dim, scale)
        self.scale = self.prior.scale

    def __repr__(self) -> str:
        return f"NormalBase(dim={self.dim}, scale={self.scale})"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` samples, shape (n, dim), float64, on the generator's device."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator)}")
        return self.prior.sample(n, generator)

    def reduced_energy(self, x: torch.Tensor) -> torch.Tensor:
        """u_A(x) = -log N(x; 0, scale^2 I), shape (..., dim) -> (...), dimensionless."""
        return self.prior.reduced_energy(x)


@BASES.register("thermodynamic")
class ThermodynamicBase:
    """The system itself at temperature T_A: u_A(x) = U(x) / (k_B T_A); f_A unknown (None).

    Used for temperature transfer (e.g. ice 250 K -> 100 K): only ΔF = f_B - f_A is estimated.
    Samples of A come from MD / MCMC, not from this object.
    """

    free_energy: None = None
    samples_directly: ClassVar[bool] = False
    temperature_ladder: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, job: JobSettings, system: System) -> ThermodynamicBase:
        return cls(system, job.base.temperature)

    @classmethod
    def complaints(cls, job: JobSettings, system: System, *, temperature_known: bool = True
                   ) -> Iterator[SettingError]:
        base = job.base
        if base.temperature is None:
            yield SettingError("base.temperature", detail="required: a thermodynamic base "
                               "needs a temperature > 0")
        elif temperature_known and base.temperature == job.temperature:
            yield SettingError("base.temperature", base.temperature,
                               "it equals the target temperature (ΔF = 0); choose another")
        if job.reference.ladder_size < 2:
            yield SettingError("reference.ladder_size", job.reference.ladder_size,
                               "an MBAR ladder between the base and target temperatures "
                               "needs >= 2")

    def __init__(self, system: System, temperature: float) -> None:
        if not isinstance(system, System):
            raise TypeError(f"system: expected a boltzgen System, got {type(system)}")
        self.system = system
        self.temperature = check_float("temperature", temperature, positive=True)
        self.dim = system.dim

    def __repr__(self) -> str:
        return f"ThermodynamicBase({self.system!r}, temperature={self.temperature})"

    def reduced_energy(self, x: torch.Tensor) -> torch.Tensor:
        """u_A(x) = U(x) / (k_B T_A), shape (..., dim) -> (...), dimensionless."""
        return self.system.reduced_energy(x, self.temperature)


@BASES.register("uniform")
class UniformBase:
    """The normalized uniform distribution on a rigid-body system's coordinates; f_A = 0.

    Positions uniform in the periodic box, orientations uniform on S³ (Haar on SO(3)), both
    with normalized measures (:mod:`boltzgen.flows.rigid`), so the density is 1 and
    u_A(x) = −log 1 = 0 everywhere. Pinned positions are at the origin. ``prior`` is the same
    density as the module a flow owns (:class:`boltzgen.priors.UniformRigidPrior`).
    """

    free_energy: float = 0.0
    samples_directly: ClassVar[bool] = True
    temperature_ladder: ClassVar[bool] = False
    description: ClassVar[str] = "uniform"
    temperature = None

    @classmethod
    def from_settings(cls, job: JobSettings, system: System) -> UniformBase:
        return cls(system)

    @classmethod
    def complaints(cls, job: JobSettings, system: System, *, temperature_known: bool = True
                   ) -> Iterator[SettingError]:
        if system.rigid_layout() is None:
            yield SettingError("base.kind", "uniform", f"system '{system.kind}' has Euclidean "
                               "coordinates; use 'normal' or 'thermodynamic'")
        yield from _no_temperature(job)

    def __init__(self, system: System) -> None:
        if not isinstance(system, System):
            raise TypeError(f"system: expected a boltzgen System, got {type(system)}")
        if system.rigid_layout() is None:
            raise ValueError(f"base.kind: 'uniform' needs a rigid-body system; '{system.kind}' "
                             "has Euclidean coordinates (use 'normal')")
        self.system = system
        self.dim = system.dim
        self.prior = UniformRigidPrior(system.layout())

    def __repr__(self) -> str:
        return f"UniformBase({self.system!r})"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` samples, shape (n, dim), float64."""
        return self.prior.sample(n, generator)

    def reduced_energy(self, x: torch.Tensor) -> torch.Tensor:
        """u_A(x) = 0 (the normalized uniform density is 1), shape (..., dim) -> (...)."""
        return self.prior.reduced_energy(x)


Base = NormalBase | UniformBase | ThermodynamicBase
"""Any of the built-in bases (type hints; the registry may hold more)."""
