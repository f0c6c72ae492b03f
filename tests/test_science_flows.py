"""Euclidean flows beyond the contract (float64): the spline math, the affine clamp, config
errors, and learning a bimodal marginal.

The contract (round trip, log-det vs autograd Jacobian, gradients, save/load, context, prior)
is tested for every flow kind in tests/test_flow_conformance.py; the spline math has its own
1-D tests here, and a short maximum-likelihood fit checks that the spline flow learns a bimodal
marginal that the affine flow, at the same budget, does not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzgen.flows import (
    EUCLIDEAN_FLOW_KINDS,
    AffineCouplingFlow,
    SplineCouplingFlow,
    build_flow,
    flow_parameter_names,
)
from boltzgen.flows.spline import (
    SplineCoupling,
    _knot_derivatives,
    _knots,
    rational_quadratic_spline,
)
from boltzgen.systems.double_well import DoubleWell2D
from boltzgen.training import train_flow
from tests.flow_helpers import RANDOM_SCALE, SMALL, randomize


def _randomized_flow(kind: str, dim: int, seed: int = 0) -> torch.nn.Module:
    """A small flow with every parameter drawn at random (so it is far from the identity)."""
    return randomize(build_flow(dim, {"kind": kind, **SMALL[kind]}), RANDOM_SCALE[kind], seed)


def _points(dim: int, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn((n, dim), generator=gen, dtype=torch.float64)


# -- affine specifics ----------------------------------------------------------------------


def test_log_scale_is_soft_clamped() -> None:
    flow = AffineCouplingFlow(2, n_layers=1, hidden=4, scale_clamp=0.5)
    with torch.no_grad():
        for p in flow.parameters():
            p.fill_(50.0)
        flow.blocks[0].log_scale.zero_()
        flow.blocks[0].shift.zero_()
    _, logdet = flow(_points(2, 20))
    assert logdet.abs().max() <= 0.5 + 1e-12  # one transformed coordinate, |s| <= clamp


# -- spline specifics ----------------------------------------------------------------------


def _random_spline_params(n: int, n_bins: int, scale: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n, n_bins), (n, n_bins), (n, n_bins - 1)]
    return [scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def test_spline_zero_parameters_are_the_identity() -> None:
    n_bins, bound = 8, 2.0
    raw = [torch.zeros(5, n_bins), torch.zeros(5, n_bins), torch.zeros(5, n_bins - 1)]
    raw = [r.double() for r in raw]
    assert torch.equal(_knot_derivatives(raw[2], 1e-3), torch.ones(5, n_bins + 1).double())
    x = torch.tensor([-3.0, -2.0, -0.3, 1.7, 2.0], dtype=torch.float64)
    for inverse in (False, True):
        y, logabsdet = rational_quadratic_spline(x, *raw, inverse=inverse, tail_bound=bound)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-15)
        torch.testing.assert_close(logabsdet, torch.zeros_like(x), rtol=0, atol=1e-15)


def test_spline_round_trip_derivative_and_tails() -> None:
    """Per-point random splines (K = 7, B = 2) on points covering every bin and both tails."""
    n, n_bins, bound = 4000, 7, 2.0
    params = _random_spline_params(n, n_bins, scale=1.5, seed=11)
    gen = torch.Generator().manual_seed(12)
    x = (torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * 1.5 * bound
    x[:4] = torch.tensor([-bound, bound, -bound - 1e-9, bound + 1e-9])
    x_knots, _ = _knots(params[0], bound, 1e-3)
    inside = x.abs() <= bound
    bins = (x[:, None] >= x_knots[:, 1:-1]).sum(dim=-1)[inside]
    assert set(bins.tolist()) == set(range(n_bins))  # every bin is exercised
    assert (~inside).sum() > n // 5  # and both tails
    assert (x < -bound).any() and (x > bound).any()

    x.requires_grad_(True)
    y, logabsdet = rational_quadratic_spline(x, *params, inverse=False, tail_bound=bound)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    x = x.detach()
    torch.testing.assert_close(logabsdet, torch.log(dydx), rtol=0, atol=1e-10)
    # tails: the identity with log-derivative 0; inside: [-B, B] onto itself
    assert torch.equal(y[~inside], x[~inside]) and torch.equal(logabsdet[~inside], x[~inside] * 0)
    assert y[inside].abs().max() <= bound
    torch.testing.assert_close(y[:2], x[:2], rtol=0, atol=1e-14)  # ±B -> ±B
    torch.testing.assert_close(logabsdet[:2], x.new_zeros(2), rtol=0, atol=1e-12)  # C1 at ±B

    y = y.detach().requires_grad_(True)
    x_back, logabsdet_inv = rational_quadratic_spline(y, *params, inverse=True, tail_bound=bound)
    (dxdy,) = torch.autograd.grad(x_back.sum(), y)
    x_back = x_back.detach()
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    # Bins with slope down to ~2e-3 make |dx/dy| up to ~1e5 here, so the round-trip error is
    # also judged in y units (backward error of the inverse): < 1e-13, some 100 ulps of |y| <= 2.
    assert float(((x_back - x).abs() * torch.exp(logabsdet.detach())).max()) < 1e-13
    torch.testing.assert_close(logabsdet_inv.detach(), -logabsdet.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(logabsdet_inv.detach(), torch.log(dxdy), rtol=0, atol=1e-10)


def test_spline_is_monotone_and_continuous_at_the_knots() -> None:
    n_bins, bound = 6, 1.0
    params = [p[0] for p in _random_spline_params(1, n_bins, scale=2.0, seed=21)]
    grid = torch.linspace(-1.5, 1.5, 20001, dtype=torch.float64)
    y, logabsdet = rational_quadratic_spline(
        grid, *(p.expand(len(grid), -1) for p in params), inverse=False, tail_bound=bound
    )
    assert (y.diff() > 0).all()
    assert torch.isfinite(logabsdet).all()
    x_knots, _ = _knots(params[0], bound, 1e-3)
    y_knots, _ = _knots(params[1], bound, 1e-3)
    eps = 1e-9
    for side in (-eps, 0.0, eps):
        at = x_knots + side
        y_at, ld_at = rational_quadratic_spline(
            at, *(p.expand(len(at), -1) for p in params), inverse=False, tail_bound=bound
        )
        torch.testing.assert_close(y_at, y_knots + side * torch.exp(ld_at), rtol=0, atol=1e-13)
        if side == 0.0:
            expected = torch.log(_knot_derivatives(params[2], 1e-3))  # δ_k at the knots
            torch.testing.assert_close(ld_at, expected, rtol=0, atol=1e-12)


def test_randomized_splines_use_bins_and_tails() -> None:
    """The randomized contract-test flows really leave the identity regime of every coupling."""
    flow = _randomized_flow("spline_coupling", 3)
    bound, n_bins = SMALL["spline_coupling"]["tail_bound"], SMALL["spline_coupling"]["n_bins"]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module: SplineCoupling, args: tuple[torch.Tensor]) -> None:
        (x,) = args
        theta = module.net(x.index_select(-1, module.cond_idx))
        theta = theta.reshape(len(x), module.n_trans, 3 * n_bins - 1)
        seen.append((x.index_select(-1, module.trans_idx), theta.detach()))

    couplings = [b for b in flow.blocks if isinstance(b, SplineCoupling)]
    handles = [b.register_forward_pre_hook(record) for b in couplings]
    with torch.no_grad():
        flow(_points(3, 64))
    for h in handles:
        h.remove()
    assert len(seen) == len(couplings) == SMALL["spline_coupling"]["n_layers"]
    for u, theta in seen:
        inside = u.abs() <= bound
        assert (~inside).any() and inside.float().mean() > 0.5  # tails and interior
        x_knots, widths = _knots(theta[..., :n_bins], bound, 1e-3)
        _, heights = _knots(theta[..., n_bins : 2 * n_bins], bound, 1e-3)
        bins = (u[..., None] >= x_knots[..., 1:-1]).sum(dim=-1)[inside]
        assert set(bins.tolist()) == set(range(n_bins))  # points in every bin
        slopes = heights / widths  # 1 for every bin at the identity
        assert slopes.min() < 0.5 and slopes.max() > 2.0
        derivatives = _knot_derivatives(theta[..., 2 * n_bins :], 1e-3)
        assert derivatives.min() < 0.8 and derivatives.max() > 1.25


def test_spline_checks() -> None:
    with pytest.raises(ValueError, match=r"n_bins: 1 is not allowed"):
        SplineCouplingFlow(2, n_bins=1)
    with pytest.raises(ValueError, match=r"n_bins: 1000 is not allowed"):
        SplineCouplingFlow(2, n_bins=1000)
    with pytest.raises(ValueError, match=r"tail_bound: -1.0 is not allowed"):
        SplineCouplingFlow(2, tail_bound=-1.0)


# -- config --------------------------------------------------------------------------------


def test_build_flow_and_errors() -> None:
    assert EUCLIDEAN_FLOW_KINDS == ["affine_coupling", "spline_coupling", "mlp_cnf"]
    flow = build_flow(3, {"kind": "affine_coupling", "n_layers": 2, "hidden": 8})
    assert isinstance(flow, AffineCouplingFlow) and flow.n_layers == 2
    with pytest.raises(
        ValueError, match=r"flow\.kind: 'glow' is not a known flow.*affine_coupling, spline_coupl"
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


def test_build_spline_flow_and_errors() -> None:
    assert flow_parameter_names("spline_coupling") == [
        "n_layers",
        "hidden",
        "n_hidden_layers",
        "n_bins",
        "tail_bound",
    ]
    flow = build_flow(2, {"kind": "spline_coupling", "n_layers": 4, "n_bins": 8})
    assert isinstance(flow, SplineCouplingFlow) and flow.n_layers == 4 and flow.n_bins == 8
    assert all(p.dtype == torch.float64 for p in flow.parameters())
    with pytest.raises(
        ValueError, match=r"flow\.scale_clamp: not a parameter of flow 'spline_coupling'.*n_bins"
    ):
        build_flow(2, {"kind": "spline_coupling", "scale_clamp": 2.0})
    with pytest.raises(ValueError, match=r"flow\.n_bins: 1 is not allowed"):
        build_flow(2, {"kind": "spline_coupling", "n_bins": 1})
    with pytest.raises(ValueError, match=r"flow\.tail_bound: 'wide' is not a real number"):
        build_flow(2, {"kind": "spline_coupling", "tail_bound": "wide"})
    with pytest.raises(ValueError, match=r"dim: 1 is not allowed"):
        build_flow(1, {"kind": "spline_coupling"})


# -- a bimodal marginal --------------------------------------------------------------------


def _double_well_samples(system: DoubleWell2D, temperature: float, n: int, seed: int):
    """Exact samples of exp(-U/T): x1 by rejection from uniform on [-6, 6], x2 ~ N(0, T).

    Outside [-6, 6] the x1 density is below exp(-(V(6) - V_min)/T) ~ e^-116 at T = 2, so the
    truncation is invisible in float64.
    """
    a, b, c = system.a, system.b, system.c
    roots = np.roots([4.0 * a, 0.0, 2.0 * b, c])
    crit = roots[np.abs(roots.imag) < 1e-9].real
    v_min = float(np.min(a * crit**4 + b * crit**2 + c * crit))
    rng = np.random.default_rng(seed)
    accepted: list[np.ndarray] = []
    while sum(len(chunk) for chunk in accepted) < n:
        x1 = rng.uniform(-6.0, 6.0, 16 * n)
        v = a * x1**4 + b * x1**2 + c * x1
        accepted.append(x1[rng.uniform(size=x1.size) < np.exp(-(v - v_min) / temperature)])
    x1 = np.concatenate(accepted)[:n]
    x2 = math.sqrt(temperature) * rng.standard_normal(n)
    return torch.tensor(np.stack([x1, x2], axis=1))


def test_spline_flow_learns_a_bimodal_marginal_better_than_affine() -> None:
    """Maximum likelihood on exact samples of the double well at T = 2 (x1 bimodal 91 : 9,
    barrier 5.7 kT; x2 independent), same architecture size and budget for both kinds.

    Held-out KL(p || q) is estimated as the mean of log p - log q over 20 000 fresh samples,
    with log p exact (U and f = -ln Z from quadrature) and q the flow with a standard normal
    base. Thresholds: any model whose x1 marginal is a single Gaussian has KL >= 0.858 (KL of
    p(x1) to its moment-matched Gaussian, by quadrature); the spline must get below 0.1 (measured
    ~0.01, train 4000 points), and beat the affine flow (measured KL 0.3 - 0.7 over seeds) by
    more than 0.1 and by more than 5 standard errors of the paired per-sample difference.
    Deterministic for fixed seeds; ~4 s on one thread.
    """
    temperature = 2.0
    system = DoubleWell2D()
    train = _double_well_samples(system, temperature, 4000, seed=0)
    test = _double_well_samples(system, temperature, 20000, seed=1)
    log_p = -system.reduced_energy(test, temperature) + system.exact_free_energy(temperature)

    def u_base(x: torch.Tensor) -> torch.Tensor:  # normalized N(0, I) in 2-D, kT
        return 0.5 * (x**2).sum(dim=-1) + math.log(2.0 * math.pi)

    nll = {}
    for kind in ("affine_coupling", "spline_coupling"):
        torch.manual_seed(0)
        flow = build_flow(2, {"kind": kind, "n_layers": 2, "hidden": 16})
        result = train_flow(
            flow,
            "maximum_likelihood",
            200,
            256,
            1e-2,
            u_a=u_base,
            u_b=u_base,
            sample_a=None,
            data_b=train,
            seed=0,
        )
        assert result.n_skipped == 0
        with torch.no_grad():
            x, logdet_inv = flow.inverse(test)
            nll[kind] = u_base(x) - logdet_inv
    kl_spline = float((nll["spline_coupling"] + log_p).mean())
    kl_affine = float((nll["affine_coupling"] + log_p).mean())
    diff = nll["affine_coupling"] - nll["spline_coupling"]
    stderr = float(diff.std() / math.sqrt(len(diff)))
    assert kl_spline < 0.1, (kl_spline, kl_affine)
    assert kl_affine - kl_spline > max(0.1, 5.0 * stderr), (kl_spline, kl_affine, stderr)
