"""Conditional flow matching for continuous flows (Lipman et al. 2023; Tong et al. 2024), with
the couplings of prior and data samples that straighten the paths (registry :data:`COUPLINGS`,
the spec's ``training.coupling``).

Per step: x0 ~ prior (B samples), x1 ~ data (B samples), paired by the coupling; t ~ U(0, 1),
ε ~ N(0, I),

    x_t = (1 − t) x0 + t x1 + σ_min ε,     L = mean_b (1/D) |v(t_b, x_t,b) − (x1,b − x0,b)|²

(flow coordinates; for particles the centre-of-mass-free Helmert coordinates, where |·| is the
Cartesian norm). σ_min = 0.01 in TBG, 0 by default here. No ODE is solved in training.

Couplings (how the B prior samples are matched with the B data samples):

- ``independent``: as drawn.
- ``ot``: the batch optimal-transport assignment, the permutation π minimising
  Σ_b |x0_b − x1_π(b)|² (Hungarian algorithm, scipy's ``linear_sum_assignment``).
- ``equivariant_ot`` (Klein, Krämer, Noé 2023): for every pair (a, b) first align x0_a to x1_b
  by the permutation of its particles minimising Σ_i |x0_a,i − x1_b,σ(i)|² (Hungarian) and
  then the rotation of Kabsch's algorithm (proper, det = +1), then the batch assignment on the
  aligned squared distances; x0 is replaced by its aligned copy. Prior and density being
  invariant, an aligned prior sample is as likely as the drawn one, so the paths learnt are
  shorter while the marginal at t = 0 stays the prior. Costs B² small assignments per step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from boltzgen.layouts import Layout, ParticleLayout
from boltzgen.objectives import OBJECTIVES, EnergyFn, Objective
from boltzgen.registry import Registry
from boltzgen.settings import SettingError

if TYPE_CHECKING:
    from boltzgen.settings import JobSettings
    from boltzgen.systems.base import System

__all__ = ["COUPLINGS", "Coupling", "FlowMatching", "flow_matching_loss", "kabsch_rotations"]


class Coupling:
    """Pairs a batch of prior samples with a batch of data samples (both (B, D))."""

    name: ClassVar[str]

    @classmethod
    def complaints(cls, layout: Layout) -> Iterator[str]:
        """Why this coupling cannot be used with ``layout`` (nothing by default)."""
        return iter(())

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, layout: Layout
             ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


COUPLINGS: Registry[Coupling] = Registry("coupling", field="training.coupling")


@COUPLINGS.register("independent")
class IndependentCoupling(Coupling):
    """x0 and x1 as drawn."""

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, layout: Layout
             ) -> tuple[torch.Tensor, torch.Tensor]:
        return x0, x1


def _assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(rows), torch.as_tensor(cols)


@COUPLINGS.register("ot")
class BatchOTCoupling(Coupling):
    """Batch optimal transport on squared Euclidean distances (module docstring)."""

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, layout: Layout
             ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = _assignment(torch.cdist(x0, x1) ** 2)
        return x0[rows], x1[cols]


ENUMERATED_PERMUTATIONS_UP_TO = 6
"""Up to this many particles every permutation is tried at once (6! = 720), a few tensor
operations for all B² pairs; beyond, the Hungarian algorithm pair by pair."""


def best_permutations(cost: torch.Tensor) -> torch.Tensor:
    """For squared distances cost[..., i, j] = |p0_i − p1_j|² (..., n, n), the assignment
    index[..., k] = the prior particle matched with data particle k that minimises
    Σ_k cost[..., index[k], k] (exact: enumeration for small n, else Hungarian per pair)."""
    n = cost.shape[-1]
    batch = cost.shape[:-2]
    if n <= ENUMERATED_PERMUTATIONS_UP_TO:
        perms = torch.tensor(list(itertools.permutations(range(n))), device=cost.device)
        slots = torch.arange(n, device=cost.device)
        totals = cost[..., perms, slots].sum(-1)  # (..., n!): Σ_k cost[perm[k], k]
        return perms[totals.argmin(-1)]
    flat = cost.reshape(-1, n, n).detach().cpu().numpy()
    index = np.empty((len(flat), n), dtype=np.int64)
    for pair, matrix in enumerate(flat):
        rows, cols = linear_sum_assignment(matrix)
        index[pair, cols] = rows  # data particle cols[k] <- prior particle rows[k]
    return torch.as_tensor(index, device=cost.device).reshape(*batch, n)


def kabsch_rotations(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Proper rotations R (..., d, d) minimising Σ_i |R source_i − target_i|² for centred
    point sets (..., n, d) (Kabsch 1976): H = sourceᵀ target = U S Vᵀ, R = V diag(1, .., det)
    Uᵀ with det = sign det(V Uᵀ)."""
    h = source.transpose(-1, -2) @ target
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(-1, -2)
    sign = torch.sign(torch.linalg.det(v @ u.transpose(-1, -2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    fix = torch.ones(h.shape[:-1], dtype=h.dtype, device=h.device)
    fix[..., -1] = sign
    return v @ torch.diag_embed(fix) @ u.transpose(-1, -2)


@COUPLINGS.register("equivariant_ot")
class EquivariantOTCoupling(Coupling):
    """Per-pair permutation (Hungarian) and rotation (Kabsch), then batch OT (module
    docstring)."""

    @classmethod
    def complaints(cls, layout: Layout) -> Iterator[str]:
        if not (isinstance(layout, ParticleLayout) and layout.com_free):
            yield ("it permutes and rotates particles; it needs a system of particles with "
                   f"the centre of mass removed (dw4, lj), but this system is "
                   f"{layout.description}")

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, layout: Layout
             ) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(layout, ParticleLayout)
        p0 = layout.to_cartesian(x0.detach())  # (B, n, d), centred
        p1 = layout.to_cartesian(x1.detach())
        b, n = p0.shape[:2]
        # Best particle permutation of every prior sample a onto every data sample b.
        particle_cost = torch.cdist(p0[:, None], p1[None, :]) ** 2  # (B, B, n, n)
        index = best_permutations(particle_cost)
        permuted = torch.gather(p0[:, None].expand(b, b, n, p0.shape[-1]), 2,
                                index[..., None].expand(b, b, n, p0.shape[-1]))
        target = p1[None].expand(b, b, n, p1.shape[-1])
        rotation = kabsch_rotations(permuted, target)
        aligned = permuted @ rotation.transpose(-1, -2)  # (B, B, n, d)
        cost = ((aligned - target) ** 2).sum(dim=(-1, -2))
        rows, cols = _assignment(cost)
        x0_aligned = layout.from_cartesian(aligned[rows, cols]).to(x0.dtype)
        return x0_aligned, x1[cols]


def flow_matching_loss(flow: nn.Module, x0: torch.Tensor, x1: torch.Tensor,
                       generator: torch.Generator, sigma_min: float = 0.0) -> torch.Tensor:
    """Conditional flow-matching loss on paired (x0, x1) (module docstring), per dimension."""
    t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    xt = (1.0 - t[:, None]) * x0 + t[:, None] * x1 + sigma_min * eps
    v = flow.velocity(t, xt)  # type: ignore[operator]
    return ((v - (x1 - x0)) ** 2).mean()


@OBJECTIVES.register("flow_matching")
class FlowMatching(Objective):
    """Conditional flow matching on the target's training data with ``training.coupling``
    (default independent) and ``training.sigma_min`` (default 0); continuous flows only."""

    trains_on_target_data = True
    uses_coupling: ClassVar[bool] = True

    def __init__(self, coupling: str = "independent", sigma_min: float = 0.0) -> None:
        self.coupling = COUPLINGS.get(coupling)()
        self.sigma_min = float(sigma_min)

    @classmethod
    def from_settings(cls, training: Any) -> FlowMatching:
        return cls(training.coupling or "independent", training.sigma_min or 0.0)

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        from boltzgen.flows import FLOWS

        flow = FLOWS.get(job.flow.kind)
        if not getattr(flow, "is_continuous", False):
            continuous = [k for k, c in FLOWS.items() if getattr(c, "is_continuous", False)]
            yield SettingError("training.objective", "flow_matching", "it regresses the "
                               f"velocity of a continuous flow; flow '{job.flow.kind}' has "
                               f"none (use one of {', '.join(continuous)})")
        coupling = job.training.coupling or "independent"
        for reason in COUPLINGS.get(coupling).complaints(system.layout()):
            yield SettingError("training.coupling", coupling, reason)
        if job.training.warm_start_steps is not None:
            yield SettingError("training.warm_start_steps", job.training.warm_start_steps,
                               "a warm start precedes reverse_kl; leave it out")

    def validate(self, sample_a: Callable[[int], torch.Tensor] | None,
                 data_b: torch.Tensor | Any | None) -> None:
        if data_b is None or getattr(data_b, "ndim", None) != 2 or data_b.shape[0] == 0:
            raise ValueError(f"data_b: {type(data_b).__name__} is not allowed for objective "
                             "'flow_matching'; pass a non-empty (M, dim) tensor of target "
                             "samples")

    def loss(self, flow: nn.Module, step: int, batch_size: int, generator: torch.Generator,
             u_a: EnergyFn, u_b: EnergyFn, sample_a: Callable[[int], torch.Tensor] | None,
             data_b: torch.Tensor | Any | None) -> torch.Tensor:
        assert data_b is not None  # validate() refused missing data
        idx = torch.randint(0, data_b.shape[0], (batch_size,), generator=generator)
        x1 = data_b[idx.to(data_b.device)]
        x0 = flow.prior.sample(batch_size, generator).to(x1.device)  # type: ignore[operator]
        x0, x1 = self.coupling.pair(x0, x1, flow.layout)  # type: ignore[arg-type]
        return flow_matching_loss(flow, x0, x1, generator, self.sigma_min)
