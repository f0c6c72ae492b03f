"""Priors: the distribution a flow pushes forward, as a module the flow owns (``flow.prior``).

A flow T with prior p defines the density of y = T(x), x ~ p,

    log q(y) = log p(x) − log|det J_T(x)|,   x = T⁻¹(y),

(:meth:`boltzgen.flows.contract.Flow.sample_and_log_prob`, ``Flow.log_prob``). A prior is an
``nn.Module`` so that a trainable prior is just a module with parameters; the priors here have
none (and no buffers: they add nothing to a flow's ``state_dict``). Densities are normalized,
so the base state of a free-energy job built on a prior has f_A = −ln 1 = 0
(:mod:`boltzgen.bases`). Kinds (registry :data:`PRIORS`):

- ``gaussian``: N(0, s² I) in the flow coordinates of a Euclidean layout,
  log p(x) = −|x|² / (2 s²) − dim ln s − (dim / 2) ln 2π;
- ``uniform``: the normalized uniform measure on a rigid-body layout's coordinates (positions
  uniform in the periodic box, orientations uniform on S³, i.e. Haar on SO(3)), log p(x) = 0;
  pinned positions are at the origin and pinned orientations at the identity;
- ``slow_fast``: the latent space of the coarse-grained model
  (:mod:`boltzgen.flows.coarse_grained`): uniform on [−B, B]^k × N(0, I_{dim−k});
- ``internal_coordinates``: the latent space of a molecule's internal-coordinate flow
  (:mod:`boltzgen.flows.internal`), 3n − 6 numbers for n atoms: N(0, I) on the first 2n − 3
  (normalised bonds and angles) times the uniform density on [−π, π)^{n−3} (torsions),
  log p(z) = −|u|² / 2 − ((2n − 3)/2) ln 2π − (n − 3) ln 2π inside, −inf outside.

Sampling draws with the given ``torch.Generator`` on its device, float64; the number and order
of random draws are part of the contract (results are reproducible from a seed).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from boltzgen._checks import check_float, check_int
from boltzgen.layouts import Layout, MoleculeLayout, as_layout
from boltzgen.registry import Registry
from boltzgen.rigid.bodies import RigidLayout
from boltzgen.rigid.quaternions import random_unit_quaternions

__all__ = ["PRIORS", "GaussianPrior", "InternalCoordinatePrior", "Prior", "SlowFastPrior",
           "UniformRigidPrior",
           "default_prior", "prior_from_dict"]


class Prior(nn.Module):
    """A normalized density on a layout's flow coordinates that can be sampled.

    Subclasses implement :meth:`sample` and :meth:`log_prob` and list their constructor's
    settings in :meth:`to_dict` (``{"kind": ..., setting: value}``, plain data).
    """

    kind: str

    def __init__(self, layout: Layout | int) -> None:
        super().__init__()
        self.layout = as_layout(layout)
        self.dim = self.layout.dim

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples (n, dim), float64, on the generator's device (CPU without one)."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x), (..., dim) -> (...), with respect to the layout's normalized measure."""
        raise NotImplementedError

    def reduced_energy(self, x: torch.Tensor) -> torch.Tensor:
        """u(x) = −log p(x), the reduced energy of the base state A that this prior is."""
        return -self.log_prob(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: shape {tuple(x.shape)} is not allowed; need (..., {self.dim})")


PRIORS: Registry[Prior] = Registry("prior")


def _device(generator: torch.Generator | None) -> torch.device | None:
    return generator.device if generator is not None else None


@PRIORS.register("gaussian")
class GaussianPrior(Prior):
    """N(0, scale² I) on R^dim (module docstring); ``scale`` > 0."""

    kind = "gaussian"

    def __init__(self, layout: Layout | int, scale: float = 1.0) -> None:
        super().__init__(layout)
        if not self.layout.euclidean:
            raise ValueError(f"prior.kind: 'gaussian' needs Euclidean coordinates; this layout "
                             f"is {self.layout.description}")
        self.scale = check_float("scale", scale, positive=True)
        self._log_norm = self.dim * math.log(self.scale) + 0.5 * self.dim * math.log(2.0 * math.pi)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """scale · ε with ε ~ N(0, I) from one ``torch.randn`` of shape (n, dim)."""
        n = check_int("n", n, minimum=1)
        eps = torch.randn((n, self.dim), generator=generator, dtype=torch.float64,
                          device=_device(generator))
        return self.scale * eps

    def reduced_energy(self, x: torch.Tensor) -> torch.Tensor:
        """−log p(x) = |x|² / (2 s²) + dim ln s + (dim / 2) ln 2π, (..., dim) -> (...)."""
        self._check(x)
        return 0.5 * (x**2).sum(dim=-1) / self.scale**2 + self._log_norm

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -self.reduced_energy(x)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale}


@PRIORS.register("uniform")
class UniformRigidPrior(Prior):
    """Uniform on a :class:`RigidLayout`'s box × (S³)^N, density 1 (module docstring)."""

    kind = "uniform"

    def __init__(self, layout: Layout) -> None:
        if not isinstance(layout, RigidLayout):
            raise ValueError("prior.kind: 'uniform' needs rigid-body coordinates; this layout "
                             f"is {as_layout(layout).description}")
        super().__init__(layout)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Positions: one ``torch.rand`` (n, N, 3) times the box edges; then orientations: one
        ``randn`` (n, N, 4) normalized (uniform on S³); pinned parts set afterwards."""
        n = check_int("n", n, minimum=1)
        layout: RigidLayout = self.layout  # type: ignore[assignment]
        positions = None
        if layout.box is not None:
            like = torch.zeros(1, dtype=torch.float64, device=_device(generator))
            positions = torch.rand(n, layout.n_bodies, 3, generator=generator,
                                   dtype=torch.float64, device=like.device)
            positions = positions * layout.box.tensor(like)
            positions[:, list(layout.pinned_positions)] = 0.0
        q = random_unit_quaternions((n, layout.n_bodies), generator)
        if layout.pinned_orientations:
            q[:, list(layout.pinned_orientations)] = q.new_tensor([1.0, 0.0, 0.0, 0.0])
        return layout.join(positions, q)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """0: the normalized uniform density is 1."""
        self._check(x)
        return x.new_zeros(x.shape[:-1])

    def reduced_energy(self, x: torch.Tensor) -> torch.Tensor:
        """0 (not −0.0)."""
        return self.log_prob(x)


@PRIORS.register("internal_coordinates")
class InternalCoordinatePrior(Prior):
    """N(0, I) on 2n − 3 coordinates × uniform on [−π, π)^{n−3}, for a :class:`MoleculeLayout`
    of n >= 3 atoms (module docstring); ``dim`` is 3n − 6, not the layout's 3n."""

    kind = "internal_coordinates"

    def __init__(self, layout: Layout) -> None:
        if not isinstance(layout, MoleculeLayout) or layout.n_atoms < 3:
            raise ValueError("prior.kind: 'internal_coordinates' needs a molecule of >= 3 atoms; "
                             f"this layout is {as_layout(layout).description}")
        super().__init__(layout)
        self.n_normal = 2 * layout.n_atoms - 3
        self.n_torsions = layout.n_atoms - 3
        self.dim = self.n_normal + self.n_torsions
        self._log_norm = (0.5 * self.n_normal + self.n_torsions) * math.log(2.0 * math.pi)

    def extra_repr(self) -> str:
        return f"normal={self.n_normal}, torsions={self.n_torsions}"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One ``torch.randn`` (n, 2n_atoms − 3), then one ``torch.rand`` (n, n_atoms − 3)
        mapped to [−π, π) (2π u − π, remainder-wrapped)."""
        n = check_int("n", n, minimum=1)
        device = _device(generator)
        normal = torch.randn((n, self.n_normal), generator=generator, dtype=torch.float64,
                             device=device)
        uniform = torch.rand((n, self.n_torsions), generator=generator, dtype=torch.float64,
                             device=device)
        torsions = torch.remainder(2.0 * math.pi * uniform, 2.0 * math.pi) - math.pi
        return torch.cat([normal, torsions], dim=-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        u, torsions = x[..., : self.n_normal], x[..., self.n_normal :]
        inside = ((torsions >= -math.pi) & (torsions < math.pi)).all(-1)
        log_p = -0.5 * (u**2).sum(-1) - self._log_norm
        return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))


@PRIORS.register("slow_fast")
class SlowFastPrior(Prior):
    """Uniform on [−B, B]^k (the slow latent variables) × N(0, I_{dim−k}) (the fast ones), the
    latent space of the coarse-grained model (:mod:`boltzgen.flows.coarse_grained`; for a
    molecule of n atoms dim is 3n − 6, its internal coordinates, and B = π):

        log p(u, ε) = −k ln 2B − |ε|² / 2 − ((dim − k)/2) ln 2π   inside the box, −inf outside.
    """

    kind = "slow_fast"

    def __init__(self, layout: Layout | int, slow_dim: int = 1, bound: float = 1.0) -> None:
        super().__init__(layout)
        if isinstance(self.layout, MoleculeLayout):  # the latent of a molecule's model: the
            self.dim = 3 * self.layout.n_atoms - 6  # 3n − 6 internal coordinates
        self.slow_dim = check_int("slow_dim", slow_dim, minimum=1)
        if self.slow_dim >= self.dim:
            raise ValueError(f"slow_dim: {slow_dim!r} is not allowed; must be below the "
                             f"dimension {self.dim} (at least one fast variable)")
        self.bound = check_float("bound", bound, positive=True)
        self._log_norm = (self.slow_dim * math.log(2.0 * self.bound)
                          + 0.5 * (self.dim - self.slow_dim) * math.log(2.0 * math.pi))

    def extra_repr(self) -> str:
        return f"slow_dim={self.slow_dim}, bound={self.bound}"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One ``torch.rand`` (n, k) mapped to [−B, B), then one ``torch.randn`` (n, dim − k)."""
        n = check_int("n", n, minimum=1)
        device = _device(generator)
        uniform = torch.rand((n, self.slow_dim), generator=generator, dtype=torch.float64,
                             device=device)
        normal = torch.randn((n, self.dim - self.slow_dim), generator=generator,
                             dtype=torch.float64, device=device)
        return torch.cat([self.bound * (2.0 * uniform - 1.0), normal], dim=-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        slow, fast = x[..., : self.slow_dim], x[..., self.slow_dim :]
        inside = (slow.abs() <= self.bound).all(-1)
        log_p = -0.5 * (fast**2).sum(-1) - self._log_norm
        return torch.where(inside, log_p, torch.full_like(log_p, -math.inf))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "slow_dim": self.slow_dim, "bound": self.bound}


def default_prior(layout: Layout) -> Prior:
    """N(0, I) for a Euclidean layout, the uniform prior for rigid bodies."""
    return GaussianPrior(layout) if layout.euclidean else UniformRigidPrior(layout)


def prior_from_dict(layout: Layout, data: dict[str, Any]) -> Prior:
    """The prior of :meth:`Prior.to_dict`'s output for ``layout`` (ValueError naming
    ``prior.kind`` or ``prior.<setting>``)."""
    cls = PRIORS.get(data.get("kind"), "prior.kind")
    try:
        return cls(layout, **{k: v for k, v in data.items() if k != "kind"})
    except TypeError as err:
        raise ValueError(f"prior: {err}") from err
