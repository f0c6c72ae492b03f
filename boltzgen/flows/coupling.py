"""RealNVP-style affine coupling flow in float64 (Dinh, Sohl-Dickstein, Bengio, ICLR 2017).

Direction (docs/architecture.md, Conventions): ``forward`` maps the base / state-A side x to the
target side y and
returns (y, log|det dy/dx|); ``inverse`` maps y back and returns (x, log|det dx/dy|). The
log-dets have the batch shape, on the input's device and dtype.

Each of the ``n_layers`` blocks is an elementwise affine layer (ActNorm-like, Kingma &
Dhariwal 2018, identity-initialised, no data-dependent init)

    y = x * exp(a) + m,                      log|det| = Σ_i a_i,

followed by an affine coupling with a binary mask splitting the coordinates into a conditioning
set c and a transformed set t:

    y_c = x_c,   y_t = x_t * exp(s(x_c)) + t(x_c),   log|det| = Σ_t s(x_c),

with soft-clamped log-scales s = clamp * tanh(s_raw / clamp). Masks cycle through
parity (even indices condition), its complement, first-half and its complement, so every
coordinate is transformed within two blocks for any dim >= 2 (odd dims included). The last
linear layer of each conditioner is zero-initialised, so the whole flow starts as the identity.
The masks, the elementwise affine layer and the stacking are shared with the spline flow
(:mod:`boltzgen.flows.base`).
"""

from __future__ import annotations

import torch

from boltzgen._checks import check_float
from boltzgen.flows.base import (
    CouplingFlow,
    ElementwiseAffine,
    MaskedCoupling,
    check_stack_args,
    conditioner_mlp,
)
from boltzgen.layouts import Layout, as_layout

__all__ = ["AffineCoupling", "AffineCouplingFlow", "ElementwiseAffine"]


class AffineCoupling(MaskedCoupling):
    """One affine coupling layer; ``cond_idx`` condition, the rest are scaled and shifted."""

    def __init__(
        self,
        dim: int,
        cond_idx: list[int],
        hidden: int,
        n_hidden_layers: int,
        scale_clamp: float,
    ) -> None:
        super().__init__(dim, cond_idx)
        self.scale_clamp = scale_clamp
        self.net = conditioner_mlp(self.n_cond, 2 * self.n_trans, hidden, n_hidden_layers)

    def _scale_shift(self, x_cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x_cond)
        s_raw, shift = out[..., : self.n_trans], out[..., self.n_trans :]
        log_scale = self.scale_clamp * torch.tanh(s_raw / self.scale_clamp)
        return log_scale, shift

    def _transform(
        self, x_cond: torch.Tensor, x_trans: torch.Tensor, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, shift = self._scale_shift(x_cond)
        if inverse:
            return (x_trans - shift) * torch.exp(-log_scale), -log_scale.sum(dim=-1)
        return x_trans * torch.exp(log_scale) + shift, log_scale.sum(dim=-1)


class AffineCouplingFlow(CouplingFlow):
    """Stack of ``n_layers`` blocks [ElementwiseAffine, AffineCoupling] on R^dim, float64.

    Args:
        layout: a Euclidean layout (vector, particles, molecule) or its number of
            coordinates, >= 2.
        n_layers: number of coupling blocks, >= 1.
        hidden: width of the conditioner MLPs, >= 1.
        n_hidden_layers: hidden layers per conditioner (SiLU activations), >= 1.
        scale_clamp: bound on |log-scale| of each coupling (soft clamp by tanh), > 0.
    """

    def __init__(
        self,
        layout: Layout | int,
        n_layers: int = 8,
        hidden: int = 64,
        n_hidden_layers: int = 2,
        scale_clamp: float = 3.0,
    ) -> None:
        layout = as_layout(layout)
        dim, n_layers, hidden, n_hidden_layers = check_stack_args(
            layout, n_layers, hidden, n_hidden_layers)
        scale_clamp = check_float("scale_clamp", scale_clamp, positive=True)
        super().__init__(
            layout,
            n_layers,
            lambda cond: AffineCoupling(dim, cond, hidden, n_hidden_layers, scale_clamp),
        )
