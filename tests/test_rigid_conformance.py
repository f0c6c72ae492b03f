"""One conformance suite for every rigid-body layer, in float64 (the composite flows are in
tests/test_flow_conformance.py with every other flow).

Each case is built from the registry (:data:`boltzgen.flows.rigid.LAYERS`); a new layer gets
every test here by being registered. Parameters are perturbed away from their (near-)identity
initialisation so that no test passes trivially.

Checks: round trip (<= 1e-8), log-det against the autograd Jacobian projected to the tangent
spaces (<= 1e-6), inverse log-det = −forward log-det, flip-equivariance of every S³ map,
flip-invariance of every conditioner, gradients reaching every parameter (both directions),
pinned coordinates never moved, near-identity start.
"""

from __future__ import annotations

import math

import pytest
import torch

from boltzgen.flows.rigid import LAYERS
from boltzgen.flows.sphere import axial_circle_mixture, axial_mixture
from boltzgen.rigid.bodies import RigidLayout
from boltzgen.rigid.quaternions import random_unit_quaternions, tangent_basis
from tests.flow_helpers import NO_BOX, WITH_BOX, perturb, random_state

SMALL = {"channels": 8, "heads": 2, "blocks": 1}

LAYER_CASES = [
    (name, layout)
    for name in LAYERS
    for layout in ((WITH_BOX, NO_BOX) if name not in ("circle_mobius", "circular_spline")
                   else (WITH_BOX,))
]
ORIENTATION_LAYERS = [name for name in LAYERS if name not in ("circle_mobius",
                                                              "circular_spline")]


def make_layer(name: str, layout: RigidLayout, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(SMALL)
    if name in ("circle_mobius", "circular_spline"):
        kwargs["component"] = 1
    if name == "convex_gradient":
        kwargs["terms"] = 6
    return LAYERS[name](layout, **kwargs)


def circular_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi


def flat(angles: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    parts = [] if angles is None else [angles.reshape(-1)]
    return torch.cat([*parts, q.reshape(-1)])


def tangent_frame(angles: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """Block-diagonal orthonormal tangent basis of one state: identity for angles, q⊗i,j,k."""
    blocks = [] if angles is None else [torch.eye(angles.numel(), dtype=q.dtype)]
    blocks += [tangent_basis(q_i) for q_i in q]
    return torch.block_diag(*blocks)


def projected_log_det(layer: torch.nn.Module, angles, q, inverse: bool) -> torch.Tensor:
    """log|det E_outᵀ J E_in| per sample from the autograd Jacobian of the embedded map."""
    out = []
    for b in range(q.shape[0]):
        a_b = None if angles is None else angles[b : b + 1]
        q_b = q[b : b + 1]
        n_ang = 0 if a_b is None else a_b.numel()

        def embedded(v: torch.Tensor, a_b=a_b, q_b=q_b, n_ang=n_ang) -> torch.Tensor:
            a_in = None if a_b is None else v[:n_ang].reshape(a_b.shape)
            q_in = v[n_ang:].reshape(q_b.shape)
            fn = layer.inverse if inverse else layer
            a_out, q_out, _ = fn(a_in, q_in)
            return flat(a_out, q_out)

        v = flat(a_b, q_b)
        jac = torch.autograd.functional.jacobian(embedded, v)
        a_out, q_out, _ = (layer.inverse if inverse else layer)(a_b, q_b)
        e_in = tangent_frame(None if a_b is None else a_b[0], q_b[0])
        e_out = tangent_frame(None if a_out is None else a_out[0], q_out[0])
        out.append(torch.linalg.slogdet(e_out.T @ jac @ e_in)[1])
    return torch.stack(out)


@pytest.mark.parametrize(("name", "layout"), LAYER_CASES)
def test_layer_round_trip_and_log_dets(name: str, layout: RigidLayout) -> None:
    layer = perturb(make_layer(name, layout))
    angles, q = random_state(layout, 16)
    a1, q1, ld = layer(angles, q)
    a2, q2, ld_inv = layer.inverse(a1, q1)
    assert (q2 - q).abs().max() <= 1e-8
    if angles is not None:
        assert circular_difference(a2, angles).abs().max() <= 1e-8
    assert (ld + ld_inv).abs().max() <= 1e-8
    assert ld.abs().max() > 1e-3, "the perturbed layer should not be volume preserving"


@pytest.mark.parametrize(("name", "layout"), LAYER_CASES)
@pytest.mark.parametrize("inverse", [False, True])
def test_layer_log_det_matches_projected_autograd_jacobian(name: str, layout: RigidLayout,
                                                            inverse: bool) -> None:
    layer = perturb(make_layer(name, layout))
    angles, q = random_state(layout, 3)
    _, _, log_det = (layer.inverse if inverse else layer)(angles, q)
    reference = projected_log_det(layer, angles, q, inverse)
    assert (log_det - reference).abs().max() <= 1e-6


@pytest.mark.parametrize(("name", "layout"), LAYER_CASES)
def test_flip_equivariance_and_conditioner_invariance(name: str, layout: RigidLayout) -> None:
    layer = perturb(make_layer(name, layout))
    angles, q = random_state(layout, 8)
    g = torch.Generator().manual_seed(5)
    signs = torch.where(torch.rand(q.shape[:-1], generator=g) < 0.5, -1.0, 1.0).double()
    flipped = q * signs[..., None]
    assert torch.allclose(layer.condition(angles, flipped), layer.condition(angles, q),
                          atol=1e-12, rtol=0)
    a1, q1, ld1 = layer(angles, q)
    a2, q2, ld2 = layer(angles, flipped)
    assert (q2 - q1 * signs[..., None]).abs().max() <= 1e-12  # f(−q) = −f(q), body by body
    assert (ld2 - ld1).abs().max() <= 1e-10
    if angles is not None:
        assert (a2 - a1).abs().max() <= 1e-12


@pytest.mark.parametrize(("name", "layout"), LAYER_CASES)
@pytest.mark.parametrize("inverse", [False, True])
def test_gradients_reach_every_parameter(name: str, layout: RigidLayout, inverse: bool) -> None:
    layer = perturb(make_layer(name, layout))
    angles, q = random_state(layout, 8)
    a1, q1, ld = (layer.inverse if inverse else layer)(angles, q)
    g = torch.Generator().manual_seed(9)
    loss = ld.sum() + (q1 * torch.randn(q1.shape, generator=g, dtype=q1.dtype)).sum()
    if a1 is not None:
        loss = loss + torch.sin(a1).sum()
    loss.backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), pname


@pytest.mark.parametrize(("name", "layout"), LAYER_CASES)
def test_pinned_coordinates_never_move_and_start_near_identity(name: str,
                                                               layout: RigidLayout) -> None:
    fresh = make_layer(name, layout)
    angles, q = random_state(layout, 8)
    a1, q1, ld = fresh(angles, q)
    # The position layers start at the identity. The S³ layers start a little away from it:
    # the convex-gradient map at a small γ (0.05), so that its Newton inverse is well
    # conditioned; the double Möbius map at |q| = 0.15 and the axial mixture with log-strengths
    # spread over ±0.5, and the complex-centre mixture with centres at |w| = 0.1 off the real
    # axis, because at the identity their training cannot start (see
    # test_fresh_orientation_layers_can_learn); all are within O(0.15², 0.5², 0.1²) of it.
    tolerance = {"convex_gradient": 0.15, "double_mobius": 0.05, "axial_mobius": 0.05,
                 "axial_circle_mobius": 0.05}.get(name, 1e-12)
    assert (q1 - q).abs().max() <= tolerance
    moved = perturb(make_layer(name, layout))
    a2, q2, _ = moved(angles, q)
    for body in layout.pinned_orientations:
        assert torch.equal(q2[:, body], q[:, body])
    for body in layout.pinned_positions:
        assert torch.equal(a2[:, body], angles[:, body])


@pytest.mark.parametrize("name", ["double_mobius", "axial_mobius", "axial_circle_mobius"])
def test_fresh_orientation_layers_can_learn(name: str) -> None:
    """At its initialisation a layer gets a gradient, and mixture components are not clones.

    The symmetrized Möbius map is even in its reflection point q, so at q = 0 every gradient
    with respect to q vanishes; K identical mixture components get identical updates forever.
    Either would leave a layer (or K − 1 components) dead however long one trains.
    """
    layout = RigidLayout(1)
    mixture = name in ("axial_mobius", "axial_circle_mobius")
    layer = LAYERS[name](layout, **SMALL, **({"components": 4} if mixture else {}))
    _, q = random_state(layout, 256)
    _, _, log_det = layer(None, q)
    # A maximum-likelihood-like loss for data that favour q_0² (flip-invariant, not uniform);
    # linear in log_det, because the complex-centre mixture starts within ~1e-9 of the identity.
    (-(log_det * q[:, 0, 0] ** 2).mean()).backward()
    grad = layer.conditioner.head.bias.grad
    assert float(grad.abs().max()) > 1e-6
    if mixture:  # log-strengths, or the real parts of the centres
        strengths = grad[:4]
        assert float((strengths - strengths.mean()).abs().max()) > 1e-6 * float(
            strengths.abs().max())


def test_complex_centre_mixture_extends_the_axial_double_mobius_mixture() -> None:
    """Real centres w give the axial double Möbius mixture with λ = (1 + w)/(1 − w) (map and
    log-det to round-off), and with complex centres the pushed-forward density integrates to 1:
    E_uniform[exp(log|det J⁻¹|)] = 1 within 5 standard errors of the Monte Carlo mean."""
    g = torch.Generator().manual_seed(5)
    p = random_unit_quaternions(4000, g)
    axis = torch.nn.functional.normalize(torch.randn(4, generator=g, dtype=torch.float64), dim=0)
    real = 0.9 * (2 * torch.rand(4000, 5, generator=g, dtype=torch.float64) - 1)
    weights = torch.softmax(torch.randn(4000, 5, generator=g, dtype=torch.float64), dim=-1)
    y_complex, ld_complex = axial_circle_mixture(p, axis, torch.complex(real, 0 * real), weights)
    y_real, ld_real = axial_mixture(p, axis, torch.log((1 + real) / (1 - real)), weights)
    assert (y_complex - y_real).abs().max() <= 1e-12
    assert (ld_complex - ld_real).abs().max() <= 1e-10
    centres = torch.complex(torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64),
                            torch.tensor([0.6, 0.2, -0.8], dtype=torch.float64))
    mix = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    _, log_det_inverse = axial_circle_mixture(random_unit_quaternions(200_000, g), axis,
                                              centres, mix, inverse=True)
    density = torch.exp(log_det_inverse)
    error = float(density.std() / math.sqrt(len(density)))
    assert abs(float(density.mean()) - 1.0) <= 5 * error
