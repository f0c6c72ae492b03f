"""Rigid-body coupling flows: N bodies, positions on a periodic torus, orientations on S³.

Köhler, Invernizzi, de Haan, Noé, "Rigid body flows for sampling molecular crystal
structures", ICML 2023 (docs/architecture.md, Ice XI and rigid bodies). Flow coordinates follow
:class:`RigidLayout`:
[positions (N, 3) nm if the layout has a box] + [unit quaternions (N, 4)]. Direction as for
every flow here: ``forward`` maps the base side to the target side and returns
(y, log|det J|); ``inverse`` returns (x, log|det J⁻¹|).

Density convention: positions carry the Lebesgue measure of the box and orientations the
surface measure of S³, each *normalized* (so the uniform base has log-density 0). Every
orientation layer is odd on S³ and every conditioner is invariant to a sign flip of any
body's quaternion, so a flip-symmetric base stays flip-symmetric and the model density equals
the density of the rotations on SO(3) with respect to normalized Haar measure
(:mod:`boltzgen.rigid.quaternions`). Log-dets are taken on the manifold: per periodic
coordinate dθ'/dθ, per quaternion the 3 × 3 tangent-space determinant.

A layer maps (angles (B, N, 3) in [0, 2π) or None, quaternions (B, N, 4)) to the same and a
log-det (B,). Pinned coordinates (``RigidLayout.pinned_positions`` / ``pinned_orientations``)
are left exactly as they are and contribute nothing to the log-det.

Layers (the registry :data:`LAYERS` lists them for the conformance tests):

- ``circle_mobius`` / ``circular_spline``: one Cartesian component c of every body's position,
  conditioned on the other two components and on every orientation;
- ``double_mobius``: the symmetrized Möbius map of every quaternion with q_i ∈ B⁴ from a
  conditioner of the positions (the paper's layer);
- ``axial_mobius``: a mixture of axial double-Möbius maps about a fixed axis a
  (:func:`boltzgen.flows.sphere.axial_mixture`); it keeps every body's direction u_j
  orthogonal to a, so its conditioner sees the positions *and* u_j ⊗ u_j of all bodies, which
  makes it a coupling even for a single body;
- ``axial_circle_mobius``: the same coupling with circle Möbius maps of complex centre on the
  doubled angle to a (:func:`boltzgen.flows.sphere.axial_circle_mixture`; real centres give
  ``axial_mobius``);
- ``convex_gradient``: the projective convex-gradient map with ψ's parameters from a
  conditioner of the positions.

Conditioners: per-body tokens of flip-invariant features (cos/sin of the visible position
angles, the rotation matrix R(q) or u ⊗ u, and pinned flags) go through a small transformer
encoder (attention over bodies, permutation-equivariant) and a zero-initialised linear head, so
each layer starts at (or, for ``convex_gradient``, near) the identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from boltzgen._checks import check_int
from boltzgen.flows.circle import (
    circle_mobius,
    circular_spline,
    circular_spline_parameter_count,
)
from boltzgen.flows.contract import Flow
from boltzgen.flows.sphere import (
    axial_circle_mixture,
    axial_mixture,
    convex_gradient,
    convex_gradient_inverse,
    double_mobius,
)
from boltzgen.rigid.bodies import RigidLayout
from boltzgen.rigid.quaternions import check_unit_quaternion, quaternion_to_matrix

__all__ = ["LAYERS", "BodyAttention", "RigidBodyFlow", "RigidLayer"]

State = tuple[torch.Tensor | None, torch.Tensor]

INITIAL_REFLECTION_NORM = 0.15
"""|q| of a :class:`DoubleMobiusLayer` at initialisation (see there why not 0)."""

INITIAL_LOG_STRENGTH_SPREAD = 0.5
"""Log-strengths of an :class:`AxialMobiusLayer`'s K components start at linspace(−s, s, K)."""

INITIAL_CENTRE_NORM = 0.1
"""|w| of every centre of an :class:`AxialCircleMobiusLayer` at initialisation."""


class BodyAttention(nn.Module):
    """Per-body features (B, N, n_in) -> per-body outputs (B, N, n_out), float64.

    Linear embedding, ``blocks`` pre-norm transformer encoder layers (``heads`` heads,
    ``channels`` wide, attention over the N bodies), then SiLU, Linear, SiLU and a
    zero-initialised linear head (so even ``blocks = 0``, e.g. for a single body, is a
    non-linear per-body MLP).
    """

    def __init__(self, n_in: int, n_out: int, channels: int, heads: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Linear(n_in, channels, dtype=torch.float64)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(channels, heads, dim_feedforward=2 * channels,
                                       dropout=0.0, batch_first=True, norm_first=True,
                                       dtype=torch.float64)
            for _ in range(blocks)
        )
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(channels, channels, dtype=torch.float64),
                                 nn.SiLU())
        self.head = nn.Linear(channels, n_out, dtype=torch.float64)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.embed(features)
        for block in self.encoder:
            h = block(h)
        return self.head(self.mlp(h))


def rotation_features(quaternions: torch.Tensor) -> torch.Tensor:
    """R(q) flattened (…, 9): a smooth, flip-invariant description of an orientation."""
    return quaternion_to_matrix(quaternions).flatten(-2)


def axial_features(quaternions: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """u ⊗ u flattened (…, 16), u the unit direction of q's component orthogonal to ``axis``."""
    perp = quaternions - (quaternions * axis).sum(-1, keepdim=True) * axis
    u = perp / torch.linalg.vector_norm(perp, dim=-1, keepdim=True).clamp_min(1e-300)
    return (u[..., :, None] * u[..., None, :]).flatten(-2)


def position_features(angles: torch.Tensor | None, visible: list[int], like: torch.Tensor
                      ) -> torch.Tensor:
    """cos and sin of the visible angle components (B, N, 2·len(visible)), or (B, N, 0)."""
    if angles is None or not visible:
        return like.new_zeros((*like.shape[:-1], 0))
    chosen = angles[..., visible]
    return torch.cat([torch.cos(chosen), torch.sin(chosen)], dim=-1)


class _TwoWayLayer(nn.Module):
    """A layer as one ``_map(angles, quaternions, inverse)``: ``forward`` maps the base side
    to the target side, ``inverse`` back; both return (angles, quaternions, log-det (B,))."""

    def forward(self, angles: torch.Tensor | None, quaternions: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        return self._map(angles, quaternions, inverse=False)

    def inverse(self, angles: torch.Tensor | None, quaternions: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        return self._map(angles, quaternions, inverse=True)

    def _map(self, angles: torch.Tensor | None, quaternions: torch.Tensor, inverse: bool
               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class RigidLayer(_TwoWayLayer):
    """Base class: pinned masks, a conditioner over body tokens, forward/inverse contract."""

    def __init__(self, layout: RigidLayout, n_features: int, n_out: int, channels: int,
                 heads: int, blocks: int) -> None:
        super().__init__()
        self.layout = layout
        # Per-body constant inputs: a 1 (so a token is never all zeros, e.g. a single body
        # without positions) and, where the layout pins anything, the two pinned flags.
        flags = [torch.ones(layout.n_bodies, 1, dtype=torch.float64)]
        for pinned in (layout.pinned_positions, layout.pinned_orientations):
            if layout.pinned_positions or layout.pinned_orientations:
                column = torch.zeros(layout.n_bodies, 1, dtype=torch.float64)
                column[list(pinned)] = 1.0
                flags.append(column)
        self.register_buffer("flags", torch.cat(flags, dim=-1))
        self.conditioner = BodyAttention(n_features + self.flags.shape[-1], n_out, channels,
                                         heads, blocks)
        self.n_out = n_out

    def features(self, angles: torch.Tensor | None, quaternions: torch.Tensor
                 ) -> list[torch.Tensor]:
        """The flip-invariant per-body inputs (B, N, ·) of this layer's conditioner."""
        raise NotImplementedError

    def condition(self, angles: torch.Tensor | None, quaternions: torch.Tensor) -> torch.Tensor:
        """Conditioner output (B, N, n_out) for the current state."""
        features = self.features(angles, quaternions)
        flags = self.flags.to(quaternions.dtype).expand(*quaternions.shape[:-1],
                                                        self.flags.shape[-1])
        return self.conditioner(torch.cat([*features, flags], dim=-1))


class _PositionLayer(RigidLayer):
    """Transforms component ``component`` of every mobile body's position angle."""

    def __init__(self, layout: RigidLayout, component: int, n_params: int, channels: int,
                 heads: int, blocks: int) -> None:
        if not layout.has_positions:
            raise ValueError("layout: a position layer needs a layout with a periodic box")
        if component not in (0, 1, 2):
            raise ValueError(f"component: {component!r} is not allowed; choose 0, 1 or 2")
        self.component = component
        self.visible = [c for c in range(3) if c != component]
        super().__init__(layout, 2 * len(self.visible) + 9, n_params, channels, heads, blocks)
        self.register_buffer("mobile", layout.mobile_mask("positions", torch.zeros(1)))

    def _transform(self, angle: torch.Tensor, params: torch.Tensor, inverse: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def features(self, angles, quaternions):
        return [position_features(angles, self.visible, quaternions),
                rotation_features(quaternions)]

    def _map(self, angles, quaternions, inverse):
        params = self.condition(angles, quaternions)
        old = angles[..., self.component]
        new, log_derivative = self._transform(old, params, inverse)
        new = torch.where(self.mobile, new, old)
        log_det = (log_derivative * self.mobile).sum(-1)
        out = angles.clone()
        out[..., self.component] = new
        return out, quaternions, log_det


class CircleMobiusLayer(_PositionLayer):
    """Circle Möbius map of one position component; ω = t / sqrt(1 + |t|²) from the conditioner."""

    def __init__(self, layout: RigidLayout, component: int = 0, channels: int = 32,
                 heads: int = 4, blocks: int = 2) -> None:
        super().__init__(layout, component, 2, channels, heads, blocks)

    def _transform(self, angle, params, inverse):
        omega = params / torch.sqrt(1.0 + (params * params).sum(-1, keepdim=True))
        return circle_mobius(angle, omega, inverse)


class CircularSplineLayer(_PositionLayer):
    """Circular RQ spline of one position component (the alternative to the Möbius map)."""

    def __init__(self, layout: RigidLayout, component: int = 0, n_bins: int = 8,
                 channels: int = 32, heads: int = 4, blocks: int = 2) -> None:
        super().__init__(layout, component, circular_spline_parameter_count(n_bins), channels,
                         heads, blocks)

    def _transform(self, angle, params, inverse):
        return circular_spline(angle, params, inverse)


class _OrientationLayer(RigidLayer):
    def __init__(self, layout: RigidLayout, n_features: int, n_out: int, channels: int,
                 heads: int, blocks: int) -> None:
        super().__init__(layout, n_features, n_out, channels, heads, blocks)
        self.register_buffer("mobile", layout.mobile_mask("orientations", torch.zeros(1)))

    def features(self, angles, quaternions):
        return [position_features(angles, [0, 1, 2], quaternions)]

    def _finish(self, angles, old, new, log_det):
        new = torch.where(self.mobile[:, None], new, old)
        return angles, new, (log_det * self.mobile).sum(-1)


class DoubleMobiusLayer(_OrientationLayer):
    """Symmetrized Möbius map of every quaternion, q_i = t / sqrt(1 + |t|²) from the positions."""

    def __init__(self, layout: RigidLayout, channels: int = 32, heads: int = 4,
                 blocks: int = 2, seed: int = 0) -> None:
        super().__init__(layout, 6 if layout.has_positions else 0, 4, channels, heads, blocks)
        # The symmetrized map is even in q, so q = 0 (the identity) is a critical point of any
        # loss: a layer started there never moves. Start at a small random reflection point
        # instead (|q| = INITIAL_REFLECTION_NORM; the map is then within O(|q|²) of the identity).
        g = torch.Generator().manual_seed(15485863 * (seed + 1))
        direction = torch.randn(4, generator=g, dtype=torch.float64)
        t = INITIAL_REFLECTION_NORM / math.sqrt(1.0 - INITIAL_REFLECTION_NORM**2)
        with torch.no_grad():
            self.conditioner.head.bias.copy_(t * direction / torch.linalg.vector_norm(direction))

    def _map(self, angles, quaternions, inverse):
        raw = self.condition(angles, quaternions)
        q = raw / torch.sqrt(1.0 + (raw * raw).sum(-1, keepdim=True))
        new, log_det = double_mobius(quaternions, q, inverse)
        return self._finish(angles, quaternions, new, log_det)


def fixed_axis(index: int) -> torch.Tensor:
    """A reproducible pseudo-random unit axis in R⁴ for layer ``index`` (generic, so that no
    axis coincides with a symmetry element of a target)."""
    g = torch.Generator().manual_seed(7919 * (index + 1))
    a = torch.randn(4, generator=g, dtype=torch.float64)
    return a / torch.linalg.vector_norm(a)


class _AxialLayer(_OrientationLayer):
    """A coupling on S³ that changes only every body's angle θ to a fixed axis: the
    conditioner sees the positions and u_j ⊗ u_j of every body (all kept by the layer) and
    gives each body ``outputs_per_component`` × K parameters of a K-component angle map."""

    outputs_per_component = 2

    def __init__(self, layout: RigidLayout, axis_index: int = 0, components: int = 4,
                 channels: int = 32, heads: int = 4, blocks: int = 2) -> None:
        self.components = check_int("components", components, minimum=1)
        n_pos = 6 if layout.has_positions else 0
        super().__init__(layout, n_pos + 16, self.outputs_per_component * self.components,
                         channels, heads, blocks)
        self.register_buffer("axis", fixed_axis(axis_index))

    def features(self, angles, quaternions):
        return [position_features(angles, [0, 1, 2], quaternions),
                axial_features(quaternions, self.axis)]


class AxialMobiusLayer(_AxialLayer):
    """Mixture of ``components`` axial double-Möbius maps about a fixed axis (a coupling on S³).

    Each body gets K log-strengths and K mixture logits. K = 1 is the plain double Möbius map
    with a closed-form inverse.
    """

    def __init__(self, layout: RigidLayout, axis_index: int = 0, components: int = 4,
                 channels: int = 32, heads: int = 4, blocks: int = 2) -> None:
        super().__init__(layout, axis_index, components, channels, heads, blocks)
        # Identical components get identical gradients (Adam even equalises their step sizes)
        # and would stay identical, a mixture of one. Spread the log-strengths symmetrically
        # about 0 instead: the mixture is then the identity to first order in the spread.
        if self.components > 1:
            with torch.no_grad():
                self.conditioner.head.bias[: self.components] = torch.linspace(
                    -INITIAL_LOG_STRENGTH_SPREAD, INITIAL_LOG_STRENGTH_SPREAD, self.components,
                    dtype=torch.float64)

    def _map(self, angles, quaternions, inverse):
        out = self.condition(angles, quaternions)
        k = self.components
        new, log_det = axial_mixture(quaternions, self.axis, out[..., :k],
                                     torch.softmax(out[..., k:], dim=-1), inverse)
        return self._finish(angles, quaternions, new, log_det)


class AxialCircleMobiusLayer(_AxialLayer):
    """Axial coupling whose angle map mixes circle Möbius maps with *complex* centres.

    Same coupling as :class:`AxialMobiusLayer`, but each of the K components is the
    conjugation-symmetrized circle Möbius map of the doubled angle 2θ with a complex centre w
    (:func:`boltzgen.flows.sphere.axial_circle_mixture`); a real w is the axial double Möbius
    map. Off-axis centres let a single layer put a mode at any angle to the axis, where real
    ones can only push mass towards the poles or the equator. Each body gets K centres
    w = t / sqrt(1 + |t|²) (t from two outputs) and K mixture logits.
    """

    outputs_per_component = 3

    def __init__(self, layout: RigidLayout, axis_index: int = 0, components: int = 4,
                 channels: int = 32, heads: int = 4, blocks: int = 2) -> None:
        super().__init__(layout, axis_index, components, channels, heads, blocks)
        # Each component is even in Im w, so a centre on the real axis would get no gradient
        # towards leaving it; start the K centres at |w| = INITIAL_CENTRE_NORM spread over the
        # upper half disk instead (distinct, so they also get distinct gradients).
        k = self.components
        phases = math.pi * (torch.arange(k, dtype=torch.float64) + 0.5) / k
        t = INITIAL_CENTRE_NORM / math.sqrt(1.0 - INITIAL_CENTRE_NORM**2)
        with torch.no_grad():
            self.conditioner.head.bias[:k] = t * torch.cos(phases)
            self.conditioner.head.bias[k : 2 * k] = t * torch.sin(phases)

    def _map(self, angles, quaternions, inverse):
        out = self.condition(angles, quaternions)
        k = self.components
        raw = torch.complex(out[..., :k], out[..., k : 2 * k])
        centres = raw / torch.sqrt(1.0 + raw.abs() ** 2)
        new, log_det = axial_circle_mixture(quaternions, self.axis, centres,
                                            torch.softmax(out[..., 2 * k :], dim=-1), inverse)
        return self._finish(angles, quaternions, new, log_det)


class ConvexGradientLayer(_OrientationLayer):
    """Projective convex-gradient map; ψ's W, α, γ per body = learned base + conditioner output.

    ψ(x) = ½|x|² + γ · ½ (Σ_k α_k (w_k·x)^{2m})^{1/m} (:mod:`boltzgen.flows.sphere`), with
    γ = softplus(·) initialised at 0.05 (near the identity), α = softplus(·), W random.
    """

    def __init__(self, layout: RigidLayout, terms: int = 16, exponent: int = 2,
                 channels: int = 32, heads: int = 4, blocks: int = 2, seed: int = 0) -> None:
        self.terms = check_int("terms", terms, minimum=4)
        self.exponent = check_int("exponent", exponent, minimum=2)
        super().__init__(layout, 6 if layout.has_positions else 0, 5 * self.terms + 1,
                         channels, heads, blocks)
        g = torch.Generator().manual_seed(104729 * (seed + 1))
        self.weights = nn.Parameter(torch.randn(self.terms, 4, generator=g, dtype=torch.float64))
        self.alpha_raw = nn.Parameter(torch.zeros(self.terms, dtype=torch.float64))
        self.gamma_raw = nn.Parameter(torch.tensor(math.log(math.expm1(0.05)),
                                                   dtype=torch.float64))

    def _parameters_of(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = self.terms
        weights = self.weights + out[..., : 4 * k].reshape(*out.shape[:-1], k, 4)
        alphas = nn.functional.softplus(self.alpha_raw + out[..., 4 * k : 5 * k])
        gamma = nn.functional.softplus(self.gamma_raw + out[..., 5 * k])
        return gamma, weights, alphas

    def _map(self, angles, quaternions, inverse):
        out = self.condition(angles, quaternions)
        gamma, weights, alphas = self._parameters_of(out)
        if inverse:
            new, log_det = convex_gradient_inverse(quaternions, gamma, weights, alphas,
                                                   self.exponent)
        else:
            new, log_det = convex_gradient(quaternions, gamma, weights, alphas, self.exponent)
        return self._finish(angles, quaternions, new, log_det)


class ThermalScalingLayer(_TwoWayLayer):
    """Per-body scaling of each coordinate's displacement from a centre: the exact map between
    the temperatures of a harmonic crystal, as the first layer of an LFEP flow.

    If U is harmonic about its minimum, p_T ∝ exp(−U/k_B T) is a Gaussian whose covariance is
    ∝ T, so x ↦ μ + s (x − μ) with s = sqrt(T_B / T_A) maps the ensemble at T_A onto the one
    at T_B exactly, correlations between bodies included. On the manifold:

    * position angle θ (per body and axis) about a centre c, a real Möbius map of the circle
      that fixes c and c + π: tan(δ'/2) = s tan(δ/2), δ = θ − c, with
      log dθ'/dθ = log s − log(cos²(δ/2) + s² sin²(δ/2));
    * quaternion q ↦ M q / |M q| with a 4 × 4 matrix M per body (a projective linear map of
      S³, odd in q), log-det log|det M| − 4 log|M q|. M = s I + (1 − s) q₀ q₀ᵀ keeps the
      component along the centre orientation ±q₀ and scales the tangent part by s: to first
      order a scaling of the rotation angle away from q₀ by s.

    Starts as the identity (s = 1, M = I); :meth:`fit` sets the centres from base samples and s.
    Every parameter is trainable. Pinned coordinates are left as they are.
    """

    def __init__(self, layout: RigidLayout) -> None:
        super().__init__()
        self.layout = layout
        n = layout.n_bodies
        self.centre = nn.Parameter(torch.zeros(n, 3, dtype=torch.float64))
        self.log_scale = nn.Parameter(torch.zeros(n, 3, dtype=torch.float64))
        self.matrix = nn.Parameter(torch.eye(4, dtype=torch.float64).repeat(n, 1, 1))
        self.register_buffer("mobile_positions", layout.mobile_mask("positions", torch.zeros(1)))
        self.register_buffer("mobile_orientations",
                             layout.mobile_mask("orientations", torch.zeros(1)))

    @torch.no_grad()
    def fit(self, angles: torch.Tensor | None, quaternions: torch.Tensor, scale: float) -> None:
        """Centres from samples (B, N, 3) / (B, N, 4) of the base: the circular mean of each
        angle and the principal axis ±q₀ of Σ q qᵀ (sign-free); every scale = ``scale``."""
        if angles is not None:
            mean = torch.atan2(torch.sin(angles).mean(0), torch.cos(angles).mean(0))
            self.centre.copy_(torch.remainder(mean, 2 * math.pi))
        self.log_scale.fill_(math.log(scale))
        second_moment = torch.einsum("bni,bnj->nij", quaternions, quaternions)
        q0 = torch.linalg.eigh(second_moment).eigenvectors[..., -1]  # (N, 4), largest eigenvalue
        eye = torch.eye(4, dtype=quaternions.dtype)
        self.matrix.copy_(scale * eye + (1.0 - scale) * q0[:, :, None] * q0[:, None, :])

    def _map(self, angles: torch.Tensor | None, quaternions: torch.Tensor, inverse: bool
             ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        log_det = quaternions.new_zeros(quaternions.shape[:-2])
        if angles is not None:
            log_s = -self.log_scale if inverse else self.log_scale
            s = torch.exp(log_s)
            half = 0.5 * (torch.remainder(angles - self.centre + math.pi, 2 * math.pi) - math.pi)
            new_half = torch.atan2(s * torch.sin(half), torch.cos(half))
            log_derivative = log_s - torch.log(torch.cos(half) ** 2 + (s * torch.sin(half)) ** 2)
            new = torch.remainder(self.centre + 2.0 * new_half, 2 * math.pi)
            mobile = self.mobile_positions[:, None]
            angles = torch.where(mobile, new, angles)
            log_det = log_det + (log_derivative * mobile).sum((-1, -2))
        matrix = torch.linalg.inv(self.matrix) if inverse else self.matrix
        image = torch.einsum("nij,bnj->bni", matrix, quaternions)
        norm = torch.linalg.vector_norm(image, dim=-1, keepdim=True)
        log_det_q = torch.linalg.slogdet(matrix).logabsdet - 4.0 * torch.log(norm[..., 0])
        new_q = torch.where(self.mobile_orientations[:, None], image / norm, quaternions)
        log_det = log_det + (log_det_q * self.mobile_orientations).sum(-1)
        return angles, new_q, log_det


LAYERS: dict[str, type[RigidLayer]] = {
    "circle_mobius": CircleMobiusLayer,
    "circular_spline": CircularSplineLayer,
    "double_mobius": DoubleMobiusLayer,
    "axial_mobius": AxialMobiusLayer,
    "axial_circle_mobius": AxialCircleMobiusLayer,
    "convex_gradient": ConvexGradientLayer,
}
"""Every rigid layer; the conformance tests run on each entry."""

ROTATION_LAYERS = ("double_mobius", "convex_gradient")
AXIAL_LAYERS = {"axial_mobius": AxialMobiusLayer, "axial_circle_mobius": AxialCircleMobiusLayer}
POSITION_LAYERS = ("circle_mobius", "circular_spline")


class RigidBodyFlow(Flow):
    """``n_blocks`` × [position layers for x, y, z (if the layout has a box), orientation layers].

    Orientation part of a block: for ``rotation_layer = "double_mobius"``
    ``mobius_layers_per_block`` :class:`DoubleMobiusLayer` (conditioned on the positions; for a
    body without positions its reflection point is a free parameter) and
    ``rotation_layers_per_block`` axial layers (each about its own fixed axis,
    ``mixture_components`` components; ``axial_layer`` picks :class:`AxialMobiusLayer`, real
    centres, or :class:`AxialCircleMobiusLayer`, complex centres); for ``"convex_gradient"``,
    ``rotation_layers_per_block`` :class:`ConvexGradientLayer` (``convex_terms`` terms,
    exponent ``convex_exponent``).

    Args:
        layout: bodies, box and pinned coordinates (:class:`boltzgen.rigid.bodies.RigidLayout`).
        channels, heads, attention_blocks: size of every conditioner.
        thermal_scaling: start with a :class:`ThermalScalingLayer` (identity until
            :meth:`fit_thermal_scaling`; the pipeline fits it for a thermodynamic base).
    """

    accepts = ("rigid_bodies",)
    layout_requirement = "needs a rigid-body system"

    def __init__(self, layout: RigidLayout, rotation_layer: str = "double_mobius",
                 position_layer: str = "circle_mobius", n_blocks: int = 4,
                 rotation_layers_per_block: int = 1, mobius_layers_per_block: int = 1,
                 mixture_components: int = 4, axial_layer: str = "axial_mobius",
                 convex_terms: int = 16, convex_exponent: int = 2, n_bins: int = 8,
                 channels: int = 32, heads: int = 4, attention_blocks: int = 2,
                 thermal_scaling: bool = False) -> None:
        super().__init__(layout)
        if rotation_layer not in ROTATION_LAYERS:
            raise ValueError(f"rotation_layer: {rotation_layer!r} is not allowed; choose one of "
                             f"{', '.join(ROTATION_LAYERS)}")
        if position_layer not in POSITION_LAYERS:
            raise ValueError(f"position_layer: {position_layer!r} is not allowed; choose one of "
                             f"{', '.join(POSITION_LAYERS)}")
        if axial_layer not in AXIAL_LAYERS:
            raise ValueError(f"axial_layer: {axial_layer!r} is not allowed; choose one of "
                             f"{', '.join(AXIAL_LAYERS)}")
        n_blocks = check_int("n_blocks", n_blocks, minimum=1)
        per_block = check_int("rotation_layers_per_block", rotation_layers_per_block, minimum=1)
        mobius_per_block = check_int("mobius_layers_per_block", mobius_layers_per_block,
                                     minimum=0)
        channels = check_int("channels", channels, minimum=1)
        heads = check_int("heads", heads, minimum=1)
        if channels % heads:
            raise ValueError(f"channels: {channels} is not allowed; must be a multiple of "
                             f"heads ({heads})")
        attention = {"channels": channels, "heads": heads,
                     "blocks": check_int("attention_blocks", attention_blocks, minimum=0)}
        if not isinstance(thermal_scaling, bool):
            raise ValueError(f"thermal_scaling: {thermal_scaling!r} is not allowed; true or false")
        layers: list[nn.Module] = [ThermalScalingLayer(layout)] if thermal_scaling else []
        for block in range(n_blocks):
            if layout.has_positions:
                for component in range(3):
                    if position_layer == "circle_mobius":
                        layers.append(CircleMobiusLayer(layout, component, **attention))
                    else:
                        layers.append(CircularSplineLayer(layout, component, n_bins, **attention))
            if rotation_layer == "double_mobius":
                layers += [DoubleMobiusLayer(layout, seed=block * mobius_per_block + j,
                                             **attention)
                           for j in range(mobius_per_block)]
                layers += [AXIAL_LAYERS[axial_layer](layout, block * per_block + j,
                                                     mixture_components, **attention)
                           for j in range(per_block)]
            else:
                layers += [ConvexGradientLayer(layout, convex_terms, convex_exponent,
                                               seed=block * per_block + j, **attention)
                           for j in range(per_block)]
        self.layers = nn.ModuleList(layers)

    def fit_thermal_scaling(self, x_base: torch.Tensor, scale: float) -> None:
        """Centre the :class:`ThermalScalingLayer` (``thermal_scaling: true``) on base samples
        (B, dim) and set its scale (sqrt(T_target / T_base)); the rest of the flow is unchanged."""
        if not self.layers or not isinstance(self.layers[0], ThermalScalingLayer):
            raise ValueError("thermal_scaling: this flow has no thermal scaling layer")
        positions, quaternions = self._check_input("x_base", x_base)
        angles = self.layout.box.to_angles(positions) if self.layout.box is not None else None
        self.layers[0].fit(angles, quaternions, scale)

    def _check_input(self, name: str, x: torch.Tensor) -> State:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x)}")
        if x.dtype != torch.float64:
            raise TypeError(f"{name}: dtype {x.dtype} is not allowed; the flow is float64")
        positions, quaternions = self.layout.split(x)
        check_unit_quaternion(quaternions, f"{name} (quaternions)")
        if positions is not None and not bool(torch.isfinite(positions).all()):
            raise ValueError(f"{name}: positions contain non-finite values")
        return positions, quaternions

    def _run(self, x: torch.Tensor, name: str, inverse: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        positions, quaternions = self._check_input(name, x)
        box = self.layout.box
        angles = box.to_angles(positions) if box is not None else None
        log_det = x.new_zeros(x.shape[:-1])
        for layer in (reversed(self.layers) if inverse else self.layers):
            angles, quaternions, ld = layer.inverse(angles, quaternions) if inverse else layer(
                angles, quaternions)
            log_det = log_det + ld
        if box is not None:
            out_positions = box.from_angles(angles)
            # Pinned positions are returned exactly as given (no wrap, no rounding).
            keep = self.layout.mobile_mask("positions", x)[:, None]
            out_positions = torch.where(keep, out_positions, positions)
        else:
            out_positions = None
        return self.layout.join(out_positions, quaternions), log_det

