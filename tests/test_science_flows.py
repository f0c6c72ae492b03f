"""Flow contract tests (float64): round trip, log-det vs autograd Jacobian, gradients, config."""

from __future__ import annotations

import pytest
import torch

from boltzgen.flows import FLOW_KINDS, AffineCouplingFlow, build_flow

DIMS = [2, 3, 6]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomized_flow(dim: int, seed: int = 0) -> AffineCouplingFlow:
    """A small flow with every parameter drawn at random (so it is far from the identity)."""
    flow = AffineCouplingFlow(dim, n_layers=4, hidden=16, n_hidden_layers=2, scale_clamp=2.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow


def _points(dim: int, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn((n, dim), generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("dim", DIMS)
def test_identity_at_initialisation(dim: int) -> None:
    flow = AffineCouplingFlow(dim, n_layers=3, hidden=8)
    x = _points(dim, 10)
    y, logdet = flow(x)
    assert y.dtype == torch.float64 and logdet.shape == (10,)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    torch.testing.assert_close(logdet, x.new_zeros(10), rtol=0, atol=0)


@pytest.mark.parametrize("dim", DIMS)
def test_round_trip_and_inverse_logdet(dim: int) -> None:
    flow = _randomized_flow(dim)
    x = _points(dim, 64)
    y, logdet = flow(x)
    x_back, logdet_inv = flow.inverse(y)
    assert not torch.allclose(y, x)  # the randomized flow is not the identity
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=0, atol=1e-10)
    # and the other way round
    y2, ld2 = flow(flow.inverse(x)[0])
    torch.testing.assert_close(y2, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld2, -flow.inverse(x)[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dim", DIMS)
def test_logdet_matches_autograd_jacobian(dim: int) -> None:
    flow = _randomized_flow(dim, seed=3)
    for x in _points(dim, 3, seed=4):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(flow(x[None])[1][0], logabsdet, rtol=0, atol=1e-10)
        y = flow(x[None])[0][0]
        jac_inv = torch.autograd.functional.jacobian(lambda v: flow.inverse(v[None])[0][0], y)
        torch.testing.assert_close(
            flow.inverse(y[None])[1][0], torch.linalg.slogdet(jac_inv)[1], rtol=0, atol=1e-10
        )


@pytest.mark.parametrize("dim", DIMS)
def test_gradients_reach_every_parameter(dim: int) -> None:
    flow = _randomized_flow(dim, seed=5)
    x = _points(dim, 32)
    y, logdet = flow(x)
    x_back, logdet_inv = flow.inverse(x)
    ((y**2).sum() + logdet.sum() + (x_back**3).sum() + logdet_inv.sum()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_batch_shapes_and_state_dict_round_trip() -> None:
    flow = _randomized_flow(3, seed=6)
    x = _points(3, 12).reshape(3, 4, 3)
    y, logdet = flow(x)
    assert y.shape == (3, 4, 3) and logdet.shape == (3, 4)
    clone = AffineCouplingFlow(3, n_layers=4, hidden=16, n_hidden_layers=2, scale_clamp=2.0)
    clone.load_state_dict(flow.state_dict())
    y2, logdet2 = clone(x)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(logdet2, logdet, rtol=0, atol=0)


def test_log_scale_is_soft_clamped() -> None:
    flow = AffineCouplingFlow(2, n_layers=1, hidden=4, scale_clamp=0.5)
    with torch.no_grad():
        for p in flow.parameters():
            p.fill_(50.0)
        flow.blocks[0].log_scale.zero_()
        flow.blocks[0].shift.zero_()
    _, logdet = flow(_points(2, 20))
    assert logdet.abs().max() <= 0.5 + 1e-12  # one transformed coordinate, |s| <= clamp


def test_input_checks() -> None:
    flow = AffineCouplingFlow(2, n_layers=2, hidden=4)
    with pytest.raises(TypeError, match="float64"):
        flow(torch.zeros(3, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"x: shape \(3, 5\)"):
        flow(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="n_layers"):
        AffineCouplingFlow(2, n_layers=2.5)


def test_build_flow_and_errors() -> None:
    assert FLOW_KINDS == ["affine_coupling"]
    flow = build_flow(3, {"kind": "affine_coupling", "n_layers": 2, "hidden": 8})
    assert isinstance(flow, AffineCouplingFlow) and flow.n_layers == 2
    with pytest.raises(
        ValueError, match=r"flow\.kind: 'glow' is not a known flow.*affine_coupling"
    ):
        build_flow(3, {"kind": "glow"})
    with pytest.raises(ValueError, match=r"flow\.kind: missing"):
        build_flow(3, {"n_layers": 2})
    with pytest.raises(ValueError, match=r"flow\.depth: not a parameter.*n_layers, hidden"):
        build_flow(3, {"kind": "affine_coupling", "depth": 2})
    with pytest.raises(ValueError, match=r"flow\.n_layers: 0 is not allowed"):
        build_flow(3, {"kind": "affine_coupling", "n_layers": 0})
    with pytest.raises(ValueError, match=r"flow\.scale_clamp: 'big' is not a real number"):
        build_flow(3, {"kind": "affine_coupling", "scale_clamp": "big"})
    with pytest.raises(ValueError, match=r"dim: 1 is not allowed"):
        build_flow(1, {"kind": "affine_coupling"})
