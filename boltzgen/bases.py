"""Base states "A" of a free-energy calculation (the flow maps A -> B).

Each state exposes ``reduced_energy(x)`` (dimensionless, kT units) and ``free_energy``,
f_A = -ln ∫ exp(-u_A(x)) dx in kT, or None where it is unknown and only differences are
meaningful (docs/architecture.md, Conventions: ΔF = f_B - f_A).
"""

from __future__ import annotations

import math

import torch

from boltzgen._checks import check_float, check_int
from boltzgen.systems.base import System


class NormalBase:
    """Normalized Gaussian N(0, scale^2 I) in ``dim`` dimensions; f_A = 0 exactly.

    u_A(x) = -log N(x; 0, scale^2 I) = |x|^2 / (2 scale^2) + dim ln(scale) + (dim/2) ln(2 pi),
    so exp(-u_A) integrates to 1 and f_A = -ln 1 = 0.
    """

    free_energy: float = 0.0

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        self.dim = check_int("dim", dim, minimum=1)
        self.scale = check_float("scale", scale, positive=True)
        self._log_norm = self.dim * math.log(self.scale) + 0.5 * self.dim * math.log(2.0 * math.pi)

    def __repr__(self) -> str:
        return f"NormalBase(dim={self.dim}, scale={self.scale})"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` samples, shape (n, dim), float64, on the generator's device."""
        n = check_int("n", n, minimum=1)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator)}")
        eps = torch.randn(
            (n, self.dim), generator=generator, dtype=torch.float64, device=generator.device
        )
        return self.scale * eps

    def reduced_energy(self, x: torch.Tensor) -> torch.Tensor:
        """u_A(x) = -log N(x; 0, scale^2 I), shape (..., dim) -> (...), dimensionless."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: shape {tuple(x.shape)} is not allowed; need (..., {self.dim})")
        return 0.5 * (x**2).sum(dim=-1) / self.scale**2 + self._log_norm


class ThermodynamicBase:
    """The system itself at temperature T_A: u_A(x) = U(x) / (k_B T_A); f_A unknown (None).

    Used for temperature transfer (e.g. ice 250 K -> 100 K): only ΔF = f_B - f_A is estimated.
    Samples of A come from MD / MCMC, not from this object.
    """

    free_energy: None = None

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


class UniformBase:
    """The normalized uniform distribution on a rigid-body system's coordinates; f_A = 0.

    Positions uniform in the periodic box, orientations uniform on S³ (Haar on SO(3)), both
    with normalized measures (:mod:`boltzgen.flows.rigid`), so the density is 1 and
    u_A(x) = −log 1 = 0 everywhere. Pinned coordinates take the system's pinned values.
    """

    free_energy: float = 0.0

    def __init__(self, system: System) -> None:
        if not isinstance(system, System):
            raise TypeError(f"system: expected a boltzgen System, got {type(system)}")
        if system.rigid_layout() is None:
            raise ValueError(f"base.kind: 'uniform' needs a rigid-body system; '{system.kind}' "
                             "has Euclidean coordinates (use 'normal')")
        self.system = system
        self.dim = system.dim

    def __repr__(self) -> str:
        return f"UniformBase({self.system!r})"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` samples, shape (n, dim), float64."""
        return self.system.sample_uniform(check_int("n", n, minimum=1), generator)

    def reduced_energy(self, x: torch.Tensor) -> torch.Tensor:
        """u_A(x) = 0 (the normalized uniform density is 1), shape (..., dim) -> (...)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: shape {tuple(x.shape)} is not allowed; need (..., {self.dim})")
        return x.new_zeros(x.shape[:-1])


AnalyticBase = NormalBase | UniformBase
"""Bases with a normalized density that can be sampled directly (f_A = 0)."""
