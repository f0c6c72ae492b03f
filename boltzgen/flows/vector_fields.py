"""Time-dependent vector fields v(t, z) for the continuous normalizing flows (:mod:`.cnf`).

Every field maps flow coordinates z (B, D) and times t (B,) to velocities (B, D), float64. The
particle fields work on the Cartesian positions x = to_cartesian(z) (B, n, d) of a
centre-of-mass-free particle layout and return from_cartesian(v_x); their v_x has zero mean
over the particles, so it lies in the centre-of-mass-free subspace and z -> x, being an
isometry onto it, carries the divergence over unchanged (see :class:`HollowEGNNField`).

- :class:`EGNNField`: an E(n)-equivariant graph network (Satorras, Hoogeboom, Welling 2021) over
  all pairs, as the vector field of the transferable Boltzmann generator (Klein & Noé 2024):
  node features h (a learned constant for identical particles, time concatenated), messages
  m_ij = φ_e(h_i, h_j, |x_i − x_j|², t) gated by a sigmoid attention weight, coordinate updates
  x_i += Σ_{j≠i} (x_i − x_j) / (|x_i − x_j| + 1) · a_l tanh(φ_x(m_ij)) / (n − 1) (bounded by a
  learnt range a_l per layer), feature updates
  h_i += φ_h(h_i, Σ_j m_ij), output v = x_L − x_0 with the mean removed. Equivariant to
  rotations, reflections and permutations, invariant to translations.
- :class:`HollowEGNNField`: an equivariant field whose exact divergence costs about one extra
  pass instead of D (a "hollow" design: Chen & Duvenaud 2019; for equivariant CNFs, HollowFlow,
  Gloy & Olsson 2025). Particle i moves by
      v_i = Σ_{j≠i} (x_i − x_j) φ(s_ij, c_j^{(−i)}, t),   s_ij = |x_i − x_j|²,
  where the context c_j^{(−i)} = ρ(Σ_{k∉{i,j}} ψ(s_jk, t), t) describes j's surroundings without
  particle i (a leave-one-out sum, computed for all i by one subtraction), so x_i enters v_i only
  through s_ij and x_i − x_j. Hence ∂v_i/∂x_i = Σ_j [φ_ij I + 2 (x_i − x_j)(x_i − x_j)ᵀ ∂φ_ij/∂s]
  and
      div v = Σ_i tr ∂v_i/∂x_i = Σ_{i≠j} [d φ_ij + 2 s_ij ∂φ_ij/∂s_ij],
  with ∂φ/∂s from one backward pass through φ alone. (Removing the mean does not change the
  divergence on the subspace: the projected Jacobian's trace is tr(J P) = tr J − (1/n) Σ_ij
  tr J_ij, and Σ_j J_ij = 0 because v is translation invariant.) The price is expressiveness:
  one leave-one-out context layer, no coordinate updates inside the network.
- :class:`MLPField`: a plain MLP of (z, t), not equivariant: the baseline.

Every field's last layer starts at zero, so a new flow is the identity map.
"""

from __future__ import annotations

import torch
from torch import nn

from boltzgen._checks import check_int
from boltzgen.flows.base import conditioner_mlp
from boltzgen.layouts import Layout, ParticleLayout


def mlp(n_in: int, hidden: int, n_out: int, n_hidden_layers: int = 2,
        zero_last: bool = False) -> nn.Sequential:
    """float64 MLP n_in -> hidden (SiLU) x n_hidden_layers -> n_out; with ``zero_last`` the
    field starts at zero, so the flow starts as the identity map."""
    return conditioner_mlp(n_in, n_out, hidden, n_hidden_layers, zero_last)


def _times(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t as a (B,) tensor for a batch ``like`` (B, ...): odeint passes a scalar."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(like.shape[0]) if t.ndim == 0 else t.reshape(like.shape[0])


class VectorField(nn.Module):
    """v(t, z): (B,) or scalar t and (B, D) z -> (B, D)."""

    def forward(self, t: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MLPField(VectorField):
    """v(t, z) = MLP([z, t]) on the flow coordinates; no symmetry (the baseline)."""

    def __init__(self, layout: Layout, hidden: int = 128, n_layers: int = 3) -> None:
        super().__init__()
        dim = layout.dim
        self.net = mlp(dim + 1, check_int("hidden", hidden, minimum=1), dim,
                       check_int("n_layers", n_layers, minimum=1), zero_last=True)

    def forward(self, t: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, _times(t, z)[:, None]], dim=-1))


class ParticleField(VectorField):
    """A field computed on Cartesian positions of a centre-of-mass-free particle layout."""

    def __init__(self, layout: ParticleLayout) -> None:
        super().__init__()
        self.layout = layout
        self.n = layout.n_particles
        self.d = layout.spatial_dim
        self.register_buffer("off_diagonal", 1.0 - torch.eye(self.n, dtype=torch.float64),
                             persistent=False)

    def _pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differences x_i − x_j (B, n, n, d) and squared distances (B, n, n)."""
        diff = x[:, :, None, :] - x[:, None, :, :]
        return diff, (diff**2).sum(-1)

    def forward(self, t: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
        x = self.layout.to_cartesian(z)
        v = self.cartesian(_times(t, z), x)
        return self.layout.from_cartesian(v - v.mean(dim=-2, keepdim=True))

    def cartesian(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EGNNField(ParticleField):
    """E(n)-equivariant graph network over all pairs (module docstring)."""

    def __init__(self, layout: ParticleLayout, hidden: int = 64, n_layers: int = 4) -> None:
        super().__init__(layout)
        hidden = check_int("hidden", hidden, minimum=1)
        self.n_layers = check_int("n_layers", n_layers, minimum=1)
        self.embedding = nn.Parameter(torch.randn(hidden, dtype=torch.float64) * 0.1)
        self.edge = nn.ModuleList(mlp(2 * hidden + 2, hidden, hidden, 1) for _ in range(n_layers))
        self.attention = nn.ModuleList(nn.Linear(hidden, 1, dtype=torch.float64)
                                       for _ in range(n_layers))
        # The last layer's features would feed nothing: n_layers − 1 feature updates.
        self.node = nn.ModuleList(mlp(2 * hidden + 1, hidden, hidden, 1)
                                  for _ in range(n_layers - 1))
        self.coordinate = nn.ModuleList(mlp(hidden, hidden, 1, 1, zero_last=True)
                                        for _ in range(n_layers))
        # Bound of each layer's coordinate update (learnt): tanh keeps every update finite.
        self.coordinate_range = nn.Parameter(torch.ones(n_layers, dtype=torch.float64))

    def cartesian(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        h = self.embedding.expand(b, n, -1)
        t_node = t[:, None, None].expand(b, n, 1)
        t_edge = t[:, None, None, None].expand(b, n, n, 1)
        x0 = x
        for layer in range(self.n_layers):
            diff, sq = self._pairs(x)
            h_i = h[:, :, None, :].expand(b, n, n, -1)
            h_j = h[:, None, :, :].expand(b, n, n, -1)
            m = self.edge[layer](torch.cat([h_i, h_j, sq[..., None], t_edge], dim=-1))
            m = m * torch.sigmoid(self.attention[layer](m)) * self.off_diagonal[..., None]
            step = torch.tanh(self.coordinate[layer](m)) * self.coordinate_range[layer]
            scaled = diff / (torch.sqrt(sq + 1e-12) + 1.0)[..., None]
            x = x + (scaled * step).sum(dim=2) / (n - 1)
            if layer < self.n_layers - 1:
                h = h + self.node[layer](torch.cat([h, m.sum(dim=2), t_node], dim=-1))
        return x - x0


class HollowEGNNField(ParticleField):
    """Equivariant field with a cheap exact divergence (module docstring)."""

    def __init__(self, layout: ParticleLayout, hidden: int = 64, n_layers: int = 3) -> None:
        super().__init__(layout)
        hidden = check_int("hidden", hidden, minimum=1)
        depth = check_int("n_layers", n_layers, minimum=1)
        self.pair = mlp(2, hidden, hidden, depth)  # ψ(s_jk, t)
        self.context = mlp(hidden + 1, hidden, hidden, depth)  # ρ(Σ ψ, t)
        self.radial = mlp(hidden + 2, hidden, 1, depth, zero_last=True)  # φ(s_ij, c_j^(−i), t)
        self.rate = nn.Parameter(torch.ones((), dtype=torch.float64))  # bound of |φ| (learnt)

    def _weights(self, t: torch.Tensor, sq: torch.Tensor, s_direct: torch.Tensor
                 ) -> torch.Tensor:
        """φ_ij (B, n, n), zero on the diagonal; ``s_direct`` is s_ij as φ's own input."""
        b, n = sq.shape[:2]
        t_pair = t[:, None, None, None].expand(b, n, n, 1)
        psi = self.pair(torch.cat([sq[..., None], t_pair], dim=-1))
        psi = psi * self.off_diagonal[..., None]
        # c_j^(−i): j's sum over k ≠ j, minus its term with i, in slot [i, j].
        leave_out = psi.sum(dim=2)[:, None, :, :] - psi.transpose(1, 2)
        context = self.context(torch.cat([leave_out, t_pair], dim=-1))
        raw = self.radial(torch.cat([s_direct[..., None], context, t_pair], dim=-1))[..., 0]
        # |φ| <= rate bound: the field grows at most linearly in the positions, so no solution
        # blows up in finite time (an unbounded φ(s) can, backwards in time).
        return torch.tanh(raw) * self.rate * self.off_diagonal

    def cartesian(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        diff, sq = self._pairs(x)
        return (diff * self._weights(t, sq, sq)[..., None]).sum(dim=2)

    def velocity_and_divergence(self, t: torch.Tensor | float, z: torch.Tensor,
                                create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """v(t, z) (B, D) and its exact divergence (B,) from the closed form of the module
        docstring; ``create_graph`` keeps the divergence differentiable (for training)."""
        t = _times(t, z)
        x = self.layout.to_cartesian(z)
        diff, sq = self._pairs(x)
        with torch.enable_grad():
            # φ's direct input as a separate node of the graph: ∂φ_ij/∂s_ij alone.
            s_direct = (diff**2).sum(-1)
            if not s_direct.requires_grad:  # z carries no graph (sampling): make s a leaf
                s_direct.requires_grad_(True)
            phi = self._weights(t, sq, s_direct)
            (dphi,) = torch.autograd.grad(phi.sum(), s_direct, create_graph=create_graph)
        v = (diff * phi[..., None]).sum(dim=2)
        div = (self.d * phi + 2.0 * sq * dphi * self.off_diagonal).sum(dim=(1, 2))
        v = self.layout.from_cartesian(v - v.mean(dim=-2, keepdim=True))
        return v, div
