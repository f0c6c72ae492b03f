"""The coarse-grained latent model of Stupp & Koutsourelakis (2025): a few slow variables with a
flexible, multimodal density, fast variables Gaussian given the slow ones, and a learnable
bijection to the system's coordinates.

Latent (the model's own prior, :class:`boltzgen.priors.SlowFastPrior`): u ~ U[−B, B]^k and
ε ~ N(0, I_{D−k}), k = ``slow_dim`` of the system's D coordinates. Forward map:

1. slow variables z = S(u): ``n_layers`` rational-quadratic spline layers on [−B, B] (the
   bounded base; :func:`boltzgen.flows.spline.rational_quadratic_spline`). For k = 1 each
   layer's spline has free parameters; for k ≥ 2 the layers are couplings whose splines are
   conditioned on the other half of z by an MLP (the masks of
   :func:`boltzgen.flows.base.conditioning_indices`). The density of z is thus any smooth
   density on the box, several modes included;
2. fast variables X = μ(z) + σ(z) ⊙ ε, with [μ, ln σ] an MLP of z (last layer zero-initialised:
   X | z starts as N(0, I));
3. the bijection x = W [z; X] + b to the system's coordinates, W = L U (L unit lower-triangular,
   U upper-triangular with diagonal e^s; always invertible, ln|det W| = Σ s), initialised at
   W = I, b = 0.

So q(x) has the exact log-density

    log q(x) = log p(u, ε) − Σ_layers ln|S'| − Σ ln σ(z) − Σ s,

and the model meets the flow contract (:mod:`boltzgen.flows.contract`): ``forward`` is (u, ε)
-> x with log|det| = Σ ln|S'| + Σ ln σ(z) + Σ s, ``inverse`` goes back by triangular solves.
The prior's box and the slow splines are part of the model and train with it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from boltzgen._checks import check_float, check_int
from boltzgen.flows.base import conditioner_mlp, conditioning_indices
from boltzgen.flows.contract import Flow
from boltzgen.flows.spline import MAX_BINS, rational_quadratic_spline
from boltzgen.layouts import Layout, VectorLayout, as_layout
from boltzgen.priors import SlowFastPrior

__all__ = ["CoarseGrainedFlow"]


class _SlowSpline(nn.Module):
    """One spline layer on the slow variables: free parameters (k = 1) or a coupling (k ≥ 2)
    whose conditioned half are the indices ``cond`` of z."""

    def __init__(self, slow_dim: int, layer: int, hidden: int, n_hidden_layers: int,
                 n_bins: int, bound: float) -> None:
        super().__init__()
        self.bound, self.n_bins = bound, n_bins
        n_params = 3 * n_bins - 1
        cond = conditioning_indices(slow_dim, layer) if slow_dim > 1 else []
        trans = [i for i in range(slow_dim) if i not in cond]
        self.register_buffer("cond", torch.tensor(cond, dtype=torch.long))
        self.register_buffer("trans", torch.tensor(trans, dtype=torch.long))
        if cond:
            self.net: nn.Module | None = conditioner_mlp(len(cond), len(trans) * n_params,
                                                         hidden, n_hidden_layers)
        else:
            self.net = None
            # Zero: the identity spline (equal bins, unit slopes), like a zero-initialised
            # conditioner's output.
            self.theta = nn.Parameter(torch.zeros(len(trans), n_params, dtype=torch.float64))

    def forward(self, z: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.n_bins
        moving = z.index_select(-1, self.trans)
        if self.net is None:
            theta = self.theta.expand(*z.shape[:-1], *self.theta.shape)
        else:
            theta = self.net(z.index_select(-1, self.cond)).reshape(
                *z.shape[:-1], len(self.trans), 3 * k - 1)
        out, log_derivative = rational_quadratic_spline(
            moving, theta[..., :k], theta[..., k:2 * k], theta[..., 2 * k:], inverse=inverse,
            tail_bound=self.bound)
        z = z.clone()
        z[..., self.trans] = out
        return z, log_derivative.sum(-1)


class _LinearBijection(nn.Module):
    """x = W y + b with W = L U (module docstring), identity at initialisation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lower = nn.Parameter(torch.zeros(dim, dim, dtype=torch.float64))
        self.upper = nn.Parameter(torch.zeros(dim, dim, dtype=torch.float64))
        self.log_diagonal = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.shift = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(len(self.shift), dtype=self.shift.dtype, device=self.shift.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(torch.exp(self.log_diagonal))
        return lower, upper

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper = self._factors()
        x = y @ (lower @ upper).T + self.shift
        return x, y.new_zeros(y.shape[:-1]) + self.log_diagonal.sum()

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper = self._factors()
        rhs = (x - self.shift).reshape(-1, x.shape[-1]).T
        v = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        y = torch.linalg.solve_triangular(upper, v, upper=True).T.reshape(x.shape)
        return y, x.new_zeros(x.shape[:-1]) - self.log_diagonal.sum()


class CoarseGrainedFlow(Flow):
    """The coarse-grained latent model (module docstring) for a system whose coordinates are
    a vector with declared slow variables (:class:`boltzgen.layouts.VectorLayout` ``slow_dim``).

    Args:
        layout: the system's layout.
        slow_dim: k, the number of slow variables modelled (the first k coordinates start as
            them); default and maximum: the system's declared slow dimension.
        n_layers: spline layers of the slow density, >= 1.
        hidden, n_hidden_layers: width and depth of the MLPs (slow conditioners and the fast
            variables' μ, ln σ).
        n_bins: spline bins, 2 .. 999.
        bound: B, half-width of the slow variables' box (their units: the system's
            coordinates, before W), > 0.
    """

    accepts: ClassVar[tuple[str, ...]] = ("vector",)
    layout_requirement: ClassVar[str] = ("needs a system that declares slow variables "
                                         "(double_well, gaussian_mixture)")
    owns_prior: ClassVar[bool] = True

    @classmethod
    def accepts_layout(cls, layout: Layout) -> bool:
        return isinstance(layout, VectorLayout) and layout.slow_dim is not None

    def __init__(self, layout: Layout | int, slow_dim: int | None = None, n_layers: int = 4,
                 hidden: int = 64, n_hidden_layers: int = 2, n_bins: int = 8,
                 bound: float = 4.0) -> None:
        layout = as_layout(layout)
        super().__init__(layout)
        assert isinstance(layout, VectorLayout) and layout.slow_dim is not None
        declared = layout.slow_dim
        k = declared if slow_dim is None else check_int("slow_dim", slow_dim, minimum=1)
        if k > declared:
            raise ValueError(f"slow_dim: {slow_dim!r} is not allowed; the system declares "
                             f"{declared} slow variable(s), so 1 .. {declared}")
        n_layers = check_int("n_layers", n_layers, minimum=1)
        hidden = check_int("hidden", hidden, minimum=1)
        n_hidden_layers = check_int("n_hidden_layers", n_hidden_layers, minimum=1)
        n_bins = check_int("n_bins", n_bins, minimum=2)
        if n_bins > MAX_BINS:
            raise ValueError(f"n_bins: {n_bins!r} is not allowed; must be <= {MAX_BINS}")
        bound = check_float("bound", bound, positive=True)
        self.slow_dim, self.fast_dim = k, self.dim - k
        self.prior = SlowFastPrior(layout, k, bound)
        self.slow = nn.ModuleList(_SlowSpline(k, layer, hidden, n_hidden_layers, n_bins, bound)
                                  for layer in range(n_layers))
        self.fast = conditioner_mlp(k, 2 * self.fast_dim, hidden, n_hidden_layers)
        self.bijection = _LinearBijection(self.dim)

    def _fast_parameters(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fast(z)
        return out[..., : self.fast_dim], out[..., self.fast_dim :]

    def _run(self, x: torch.Tensor, name: str, inverse: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_euclidean_input(name, x)
        k = self.slow_dim
        if inverse:
            latent, logdet = self.bijection.inverse(x)
            z, fast = latent[..., :k], latent[..., k:]
            mean, log_scale = self._fast_parameters(z)
            eps = (fast - mean) * torch.exp(-log_scale)
            logdet = logdet - log_scale.sum(-1)
            for layer in reversed(self.slow):
                z, ld = layer(z, inverse=True)
                logdet = logdet + ld
            return torch.cat([z, eps], -1), logdet
        z, eps = x[..., :k], x[..., k:]
        logdet = x.new_zeros(x.shape[:-1])
        for layer in self.slow:
            z, ld = layer(z, inverse=False)
            logdet = logdet + ld
        mean, log_scale = self._fast_parameters(z)
        fast = mean + torch.exp(log_scale) * eps
        y, ld = self.bijection(torch.cat([z, fast], -1))
        return y, logdet + log_scale.sum(-1) + ld
