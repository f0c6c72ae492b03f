"""RealNVP-style affine coupling flow in float64 (Dinh, Sohl-Dickstein, Bengio, ICLR 2017).

Direction (DESIGN.md §3): ``forward`` maps the base / state-A side x to the target side y and
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
"""

from __future__ import annotations

import torch
from torch import nn

from boltzgen._checks import check_float, check_int


def _conditioning_indices(dim: int, layer: int) -> list[int]:
    """Indices that condition block ``layer`` (the others are transformed); non-empty both ways."""
    pattern = layer % 4
    if pattern in (0, 1):
        parity = pattern  # 0: even indices condition; 1: odd indices condition
        return [i for i in range(dim) if i % 2 == parity]
    half = dim // 2
    return list(range(half)) if pattern == 2 else list(range(half, dim))


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


class AffineCoupling(nn.Module):
    """One affine coupling layer; ``cond_idx`` condition, the rest are scaled and shifted."""

    def __init__(
        self,
        dim: int,
        cond_idx: list[int],
        hidden: int,
        n_hidden_layers: int,
        scale_clamp: float,
    ) -> None:
        super().__init__()
        trans_idx = [i for i in range(dim) if i not in cond_idx]
        perm = cond_idx + trans_idx
        inv_perm = [perm.index(i) for i in range(dim)]
        self.register_buffer("cond_idx", torch.tensor(cond_idx, dtype=torch.long))
        self.register_buffer("trans_idx", torch.tensor(trans_idx, dtype=torch.long))
        self.register_buffer("inv_perm", torch.tensor(inv_perm, dtype=torch.long))
        self.n_trans = len(trans_idx)
        self.scale_clamp = scale_clamp
        layers: list[nn.Module] = []
        width = len(cond_idx)
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden, dtype=torch.float64), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, 2 * self.n_trans, dtype=torch.float64)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def _scale_shift(self, x_cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x_cond)
        s_raw, shift = out[..., : self.n_trans], out[..., self.n_trans :]
        log_scale = self.scale_clamp * torch.tanh(s_raw / self.scale_clamp)
        return log_scale, shift

    def _merge(self, x_cond: torch.Tensor, x_trans: torch.Tensor) -> torch.Tensor:
        return torch.cat([x_cond, x_trans], dim=-1).index_select(-1, self.inv_perm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_cond, x_trans = x.index_select(-1, self.cond_idx), x.index_select(-1, self.trans_idx)
        log_scale, shift = self._scale_shift(x_cond)
        y_trans = x_trans * torch.exp(log_scale) + shift
        return self._merge(x_cond, y_trans), log_scale.sum(dim=-1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_cond, y_trans = y.index_select(-1, self.cond_idx), y.index_select(-1, self.trans_idx)
        log_scale, shift = self._scale_shift(y_cond)
        x_trans = (y_trans - shift) * torch.exp(-log_scale)
        return self._merge(y_cond, x_trans), -log_scale.sum(dim=-1)


class AffineCouplingFlow(nn.Module):
    """Stack of ``n_layers`` blocks [ElementwiseAffine, AffineCoupling] on R^dim, float64.

    Args:
        dim: number of coordinates, >= 2.
        n_layers: number of coupling blocks, >= 1.
        hidden: width of the conditioner MLPs, >= 1.
        n_hidden_layers: hidden layers per conditioner (SiLU activations), >= 1.
        scale_clamp: bound on |log-scale| of each coupling (soft clamp by tanh), > 0.
    """

    def __init__(
        self,
        dim: int,
        n_layers: int = 8,
        hidden: int = 64,
        n_hidden_layers: int = 2,
        scale_clamp: float = 3.0,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, minimum=2)
        self.n_layers = check_int("n_layers", n_layers, minimum=1)
        hidden = check_int("hidden", hidden, minimum=1)
        n_hidden_layers = check_int("n_hidden_layers", n_hidden_layers, minimum=1)
        scale_clamp = check_float("scale_clamp", scale_clamp, positive=True)
        blocks: list[nn.Module] = []
        for layer in range(self.n_layers):
            blocks.append(ElementwiseAffine(self.dim))
            cond = _conditioning_indices(self.dim, layer)
            blocks.append(AffineCoupling(self.dim, cond, hidden, n_hidden_layers, scale_clamp))
        self.blocks = nn.ModuleList(blocks)

    def _check_input(self, name: str, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x)}")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name}: shape {tuple(x.shape)} is not allowed; need (..., {self.dim})"
            )
        if x.dtype != torch.float64:
            raise TypeError(f"{name}: dtype {x.dtype} is not allowed; the flow is float64")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base side -> target side: (y, log|det dy/dx|), log-det shaped like the batch."""
        self._check_input("x", x)
        logdet = x.new_zeros(x.shape[:-1])
        for block in self.blocks:
            x, ld = block(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target side -> base side: (x, log|det dx/dy|) = (T^-1(y), -log|det J_T(T^-1 y)|)."""
        self._check_input("y", y)
        logdet = y.new_zeros(y.shape[:-1])
        for block in reversed(self.blocks):
            y, ld = block.inverse(y)
            logdet = logdet + ld
        return y, logdet
