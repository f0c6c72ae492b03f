"""Rational-quadratic spline coupling flow in float64 (Neural Spline Flows).

C. Durkan, A. Bekasov, I. Murray, G. Papamakarios, "Neural Spline Flows", NeurIPS 2019
(arXiv:1906.04032), built on the monotone rational-quadratic interpolant of J. A. Gregory and
R. Delbourgo, IMA J. Numer. Anal. 2 (1982) 123-130.

Direction (docs/architecture.md, Conventions) as for every flow here: ``forward`` maps the base
side x to the target
side y and returns (y, log|det dy/dx|); ``inverse`` returns (x, log|det dx/dy|), both log-dets
shaped like the batch.

Architecture: ``n_layers`` blocks [ElementwiseAffine, SplineCoupling] with the masks of the
affine coupling flow (:mod:`boltzgen.flows.base`). A coupling keeps the conditioning
coordinates x_c and maps every transformed coordinate by its own monotone spline τ whose
parameters θ(x_c) come from a conditioner MLP: for each transformed coordinate, K = ``n_bins``
unnormalised widths, K unnormalised heights and K - 1 unnormalised interior derivatives.

The spline (one coordinate, bound B = ``tail_bound``). Knots (x_k, y_k), k = 0..K, with
x_0 = y_0 = -B, x_K = y_K = B and bin widths / heights

    w_k = 2B [m_w + (1 - K m_w) softmax(θ^w)_k],   h_k = 2B [m_h + (1 - K m_h) softmax(θ^h)_k],

(m_w = m_h = 1e-3 of the interval); derivatives at the knots δ_0 = δ_K = 1 (so the identity
tails outside [-B, B] join with a continuous first derivative) and, inside,

    δ_k = m_δ + softplus(θ^δ_k + c),   c = log(exp(1 - m_δ) - 1),   m_δ = 1e-3,

so θ^δ = 0 gives δ_k = 1 exactly. With all conditioner outputs zero (the last layer of every
conditioner is zero-initialised) every bin has s_k = h_k / w_k = 1 and δ = 1: the spline is the
identity and so is the flow (up to rounding).

Forward, for x in bin k, with ξ = (x - x_k) / w_k ∈ [0, 1], s_k = h_k / w_k:

    y = y_k + h_k [s_k ξ² + δ_k ξ(1 - ξ)] / [s_k + (δ_{k+1} + δ_k - 2 s_k) ξ(1 - ξ)],

    dy/dx = s_k² [δ_{k+1} ξ² + 2 s_k ξ(1 - ξ) + δ_k (1 - ξ)²]
            / [s_k + (δ_{k+1} + δ_k - 2 s_k) ξ(1 - ξ)]²,

and log|dy/dx| is the log of that (a sum of logs of positive factors). Inverse, for y in bin
k (bins located among the y-knots): ξ solves a ξ² + b ξ + c = 0 with

    a = h_k (s_k - δ_k) + (y - y_k)(δ_{k+1} + δ_k - 2 s_k),
    b = h_k δ_k - (y - y_k)(δ_{k+1} + δ_k - 2 s_k),
    c = -s_k (y - y_k),

whose root in [0, 1] is taken in the numerically stable form of Durkan et al.

    ξ = 2c / (-b - sqrt(b² - 4ac)),

equal to (-b + sqrt(b² - 4ac)) / 2a but without the division by a, which vanishes where the
bin is linear (e.g. at the identity), and accurate where c -> 0 at the left knot. The
denominator is strictly negative (c = 0 forces b = h_k δ_k > 0; a = 0 forces b = h_k s_k > 0);
the discriminant is clamped at 0 against rounding. Then x = x_k + ξ w_k and
log|dx/dy| = -log|dy/dx| at that ξ. Outside [-B, B] the map is the identity with log-derivative
0 (the "linear tails").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from boltzgen._checks import check_float, check_int
from boltzgen.flows.base import CouplingFlow, MaskedCoupling, check_stack_args, conditioner_mlp
from boltzgen.layouts import Layout, as_layout

__all__ = ["SplineCoupling", "SplineCouplingFlow", "rational_quadratic_spline"]

MIN_BIN_WIDTH = 1e-3  # fraction of the interval [-B, B]
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
MAX_BINS = 999  # K * MIN_BIN_WIDTH must stay below 1


def _knots(
    unnormalized: torch.Tensor, tail_bound: float, min_size: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Knot positions (..., K + 1) from -B to B exactly, and bin sizes (..., K) as differences."""
    n_bins = unnormalized.shape[-1]
    fractions = min_size + (1.0 - min_size * n_bins) * torch.softmax(unnormalized, dim=-1)
    inner = 2.0 * tail_bound * torch.cumsum(fractions, dim=-1)[..., :-1] - tail_bound
    edge = inner.new_full((*inner.shape[:-1], 1), tail_bound)
    knots = torch.cat([-edge, inner, edge], dim=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _knot_derivatives(unnormalized: torch.Tensor, min_derivative: float,
                      boundary: torch.Tensor | None = None) -> torch.Tensor:
    """Derivatives at all K + 1 knots: m + softplus(θ + c) inside (1 at θ = 0); at both ends 1,
    or, with ``boundary`` (..., 1), the same shared value m + softplus(θ_b + c) (periodic)."""
    offset = math.log(math.expm1(1.0 - min_derivative))
    inner = min_derivative + F.softplus(unnormalized + offset)
    if boundary is None:
        end = inner.new_ones((*inner.shape[:-1], 1))
    else:
        end = min_derivative + F.softplus(boundary + offset)
    return torch.cat([end, inner, end], dim=-1)


def _gather(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, idx[..., None])[..., 0]


def rational_quadratic_spline(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    *,
    inverse: bool,
    tail_bound: float,
    min_bin_width: float = MIN_BIN_WIDTH,
    min_bin_height: float = MIN_BIN_HEIGHT,
    min_derivative: float = MIN_DERIVATIVE,
    unnormalized_boundary_derivative: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise monotone RQ spline on [-B, B], identity outside (see the module docstring).

    Shapes: ``inputs`` (...), widths and heights (..., K), derivatives (..., K - 1), and the
    optional boundary derivative (..., 1) that replaces the fixed end slopes 1 by one learnable
    slope shared by both ends (a circular spline: the map of [-B, B] then joins smoothly
    across the identified ends). Returns
    (outputs, log|d outputs / d inputs|), both shaped like ``inputs``; with ``inverse`` the
    inverse map and its log-derivative.
    """
    x_knots, widths = _knots(unnormalized_widths, tail_bound, min_bin_width)
    y_knots, heights = _knots(unnormalized_heights, tail_bound, min_bin_height)
    derivatives = _knot_derivatives(unnormalized_derivatives, min_derivative,
                                    unnormalized_boundary_derivative)

    inside = (inputs >= -tail_bound) & (inputs <= tail_bound)
    # Tail points are evaluated at the clamped value (finite, zero gradient) and then discarded,
    # so that no NaN/inf from the unused branch reaches the gradient through torch.where.
    z = inputs.clamp(-tail_bound, tail_bound)
    search = y_knots if inverse else x_knots
    idx = (z[..., None] >= search[..., 1:-1]).sum(dim=-1)  # bin index in 0 .. K - 1

    x_k, w = _gather(x_knots[..., :-1], idx), _gather(widths, idx)
    y_k, h = _gather(y_knots[..., :-1], idx), _gather(heights, idx)
    d_lo, d_hi = _gather(derivatives[..., :-1], idx), _gather(derivatives[..., 1:], idx)
    s = h / w
    curvature = d_hi + d_lo - 2.0 * s

    if inverse:
        dy = z - y_k
        a = h * (s - d_lo) + dy * curvature
        b = h * d_lo - dy * curvature
        c = -s * dy
        discriminant = (b * b - 4.0 * a * c).clamp(min=0.0)
        xi = (2.0 * c) / (-b - torch.sqrt(discriminant))
        out = x_k + xi * w
    else:
        xi = (z - x_k) / w
    one_minus = 1.0 - xi
    t = xi * one_minus
    denominator = s + curvature * t
    if not inverse:
        out = y_k + h * (s * xi * xi + d_lo * t) / denominator
    log_derivative = (
        2.0 * torch.log(s)
        + torch.log(d_hi * xi * xi + 2.0 * s * t + d_lo * one_minus * one_minus)
        - 2.0 * torch.log(denominator)
    )
    if inverse:
        log_derivative = -log_derivative
    outputs = torch.where(inside, out, inputs)
    logabsdet = torch.where(inside, log_derivative, torch.zeros_like(log_derivative))
    return outputs, logabsdet


class SplineCoupling(MaskedCoupling):
    """One RQ-spline coupling layer; ``cond_idx`` condition, the rest go through splines."""

    def __init__(
        self,
        dim: int,
        cond_idx: list[int],
        hidden: int,
        n_hidden_layers: int,
        n_bins: int,
        tail_bound: float,
    ) -> None:
        super().__init__(dim, cond_idx)
        self.n_bins = n_bins
        self.tail_bound = tail_bound
        n_params = 3 * n_bins - 1  # widths, heights, interior derivatives
        self.net = conditioner_mlp(self.n_cond, self.n_trans * n_params, hidden, n_hidden_layers)

    def _transform(
        self, x_cond: torch.Tensor, x_trans: torch.Tensor, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.net(x_cond).reshape(*x_cond.shape[:-1], self.n_trans, 3 * self.n_bins - 1)
        k = self.n_bins
        out, log_derivative = rational_quadratic_spline(
            x_trans,
            theta[..., :k],
            theta[..., k : 2 * k],
            theta[..., 2 * k :],
            inverse=inverse,
            tail_bound=self.tail_bound,
        )
        return out, log_derivative.sum(dim=-1)


class SplineCouplingFlow(CouplingFlow):
    """Stack of ``n_layers`` blocks [ElementwiseAffine, SplineCoupling] on R^dim, float64.

    Args:
        layout: a Euclidean layout (vector, particles, molecule) or its number of
            coordinates, >= 2.
        n_layers: number of coupling blocks, >= 1.
        hidden: width of the conditioner MLPs, >= 1.
        n_hidden_layers: hidden layers per conditioner (SiLU activations), >= 1.
        n_bins: spline bins per transformed coordinate, 2 .. 999.
        tail_bound: B; the splines act on [-B, B] and are the identity outside, > 0.
    """

    def __init__(
        self,
        layout: Layout | int,
        n_layers: int = 6,
        hidden: int = 64,
        n_hidden_layers: int = 2,
        n_bins: int = 8,
        tail_bound: float = 5.0,
    ) -> None:
        layout = as_layout(layout)
        dim, n_layers, hidden, n_hidden_layers = check_stack_args(
            layout, n_layers, hidden, n_hidden_layers)
        n_bins = check_int("n_bins", n_bins, minimum=2)
        if n_bins > MAX_BINS:
            raise ValueError(
                f"n_bins: {n_bins!r} is not allowed; must be an integer <= {MAX_BINS} "
                f"(minimum bin width {MIN_BIN_WIDTH} of the interval)"
            )
        tail_bound = check_float("tail_bound", tail_bound, positive=True)
        super().__init__(
            layout,
            n_layers,
            lambda cond: SplineCoupling(dim, cond, hidden, n_hidden_layers, n_bins, tail_bound),
        )
        self.n_bins = n_bins
        self.tail_bound = tail_bound
