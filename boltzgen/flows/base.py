"""Building blocks shared by the coupling flows (float64).

Direction (docs/architecture.md, Conventions): ``forward`` maps the base / state-A side x to the
target side y and
returns (y, log|det dy/dx|); ``inverse`` maps y back and returns (x, log|det dx/dy|). The
log-dets have the batch shape, on the input's device and dtype.

- :func:`conditioning_indices`: the binary masks. They cycle through parity (even indices
  condition), its complement, first-half and its complement, so every coordinate is transformed
  within two blocks for any dim >= 2 (odd dims included).
- :class:`ElementwiseAffine`: y = x * exp(a) + m, an ActNorm-like layer (Kingma & Dhariwal
  2018), identity-initialised, no data-dependent init; log|det| = Σ_i a_i.
- :class:`MaskedCoupling`: y_c = x_c, y_t = τ(x_t; θ(x_c)) with τ elementwise and invertible;
  subclasses supply τ through :meth:`MaskedCoupling._transform`.
- :func:`conditioner_mlp`: the conditioner θ, an MLP with SiLU activations whose last linear
  layer is zero-initialised (so a coupling whose τ is the identity at θ = 0 starts as such).
- :class:`CouplingFlow`: a stack of ``n_layers`` blocks [ElementwiseAffine, coupling] with the
  input checks and the forward / inverse composition; a :class:`boltzgen.flows.contract.Flow`
  for Euclidean layouts (a plain vector, particles, a molecule: the coordinates as R^dim, e.g.
  DW4's centre-of-mass-free Helmert coordinates), with a Gaussian prior N(0, I) by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from boltzgen._checks import check_int
from boltzgen.flows.contract import EUCLIDEAN_LAYOUTS, Flow
from boltzgen.layouts import Layout


def conditioning_indices(dim: int, layer: int) -> list[int]:
    """Indices that condition block ``layer`` (the others are transformed); non-empty both ways."""
    pattern = layer % 4
    if pattern in (0, 1):
        parity = pattern  # 0: even indices condition; 1: odd indices condition
        return [i for i in range(dim) if i % 2 == parity]
    half = dim // 2
    return list(range(half)) if pattern == 2 else list(range(half, dim))


def conditioner_mlp(n_in: int, n_out: int, hidden: int, n_hidden_layers: int,
                    zero_last: bool = True) -> nn.Sequential:
    """float64 MLP n_in -> hidden (SiLU) x n_hidden_layers -> n_out, last layer zero-initialised
    (unless ``zero_last`` is False)."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(width, hidden, dtype=torch.float64), nn.SiLU()]
        width = hidden
    last = nn.Linear(width, n_out, dtype=torch.float64)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class ElementwiseAffine(nn.Module):
    """y = x * exp(log_scale) + shift, learnable per coordinate, identity at initialisation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.shift = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x * torch.exp(self.log_scale) + self.shift
        return y, x.new_zeros(x.shape[:-1]) + self.log_scale.sum()

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (y - self.shift) * torch.exp(-self.log_scale)
        return x, y.new_zeros(y.shape[:-1]) - self.log_scale.sum()


class MaskedCoupling(nn.Module):
    """Coupling layer: ``cond_idx`` condition, the other (``n_trans``) coordinates are transformed.

    Subclasses implement ``_transform(x_cond, x_trans, inverse)`` returning the transformed
    coordinates and the log|det| of that direction, shaped like the batch.
    """

    def __init__(self, dim: int, cond_idx: list[int]) -> None:
        super().__init__()
        trans_idx = [i for i in range(dim) if i not in cond_idx]
        perm = cond_idx + trans_idx
        inv_perm = [perm.index(i) for i in range(dim)]
        self.register_buffer("cond_idx", torch.tensor(cond_idx, dtype=torch.long))
        self.register_buffer("trans_idx", torch.tensor(trans_idx, dtype=torch.long))
        self.register_buffer("inv_perm", torch.tensor(inv_perm, dtype=torch.long))
        self.n_cond = len(cond_idx)
        self.n_trans = len(trans_idx)

    def _transform(
        self, x_cond: torch.Tensor, x_trans: torch.Tensor, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _merge(self, x_cond: torch.Tensor, x_trans: torch.Tensor) -> torch.Tensor:
        return torch.cat([x_cond, x_trans], dim=-1).index_select(-1, self.inv_perm)

    def _couple(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x_cond, x_trans = x.index_select(-1, self.cond_idx), x.index_select(-1, self.trans_idx)
        out_trans, logdet = self._transform(x_cond, x_trans, inverse)
        return self._merge(x_cond, out_trans), logdet

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._couple(x, inverse=False)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._couple(y, inverse=True)


class CouplingFlow(Flow):
    """Stack of ``n_layers`` blocks [ElementwiseAffine, coupling] on R^dim, float64.

    ``make_coupling(cond_idx)`` builds the coupling of a block from its conditioning indices.
    """

    accepts = EUCLIDEAN_LAYOUTS
    layout_requirement = "acts on R^dim"

    def __init__(
        self, layout: Layout, n_layers: int, make_coupling: Callable[[list[int]], MaskedCoupling]
    ) -> None:
        super().__init__(layout)
        dim = self.dim
        self.n_layers = n_layers
        blocks: list[nn.Module] = []
        for layer in range(n_layers):
            blocks.append(ElementwiseAffine(dim))
            blocks.append(make_coupling(conditioning_indices(dim, layer)))
        self.blocks = nn.ModuleList(blocks)

    def _run(self, x: torch.Tensor, name: str, inverse: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward: the blocks in order; inverse: their inverses in reverse order; the log-dets
        summed (log|det dy/dx| forward, log|det dx/dy| = -log|det J_T(T^-1 y)| inverse)."""
        self._check_euclidean_input(name, x)
        logdet = x.new_zeros(x.shape[:-1])
        for block in (reversed(self.blocks) if inverse else self.blocks):
            x, ld = block.inverse(x) if inverse else block(x)
            logdet = logdet + ld
        return x, logdet


def check_stack_args(layout: Layout, n_layers: int, hidden: int, n_hidden_layers: int
                     ) -> tuple[int, int, int, int]:
    """Validate the arguments every coupling stack shares (ValueError naming the argument);
    returns (dim, n_layers, hidden, n_hidden_layers)."""
    return (check_int("dim", layout.dim, minimum=2), check_int("n_layers", n_layers, minimum=1),
            check_int("hidden", hidden, minimum=1),
            check_int("n_hidden_layers", n_hidden_layers, minimum=1))
