"""Objectives and training: a small flow from NormalBase to a 2-D Gaussian target."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from boltzgen.bases import NormalBase
from boltzgen.estimators import importance_free_energy, lfep_log_weights
from boltzgen.flows import AffineCouplingFlow, SplineCouplingFlow
from boltzgen.objectives import (
    ReverseKL,
    maximum_likelihood_loss,
    reverse_kl_loss,
)
from boltzgen.training import train_flow

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 2.0], dtype=torch.float64)
# B: unnormalized N(MU, diag SIGMA^2); f_B = -ln(2 pi σ1 σ2) = -ln(2 pi) in kT; f_A = 0.
F_B = -math.log(2 * math.pi * float(SIGMA.prod()))
ENTROPY_B = 1.0 + math.log(2 * math.pi) + math.log(float(SIGMA.prod()))  # -E_B[log p_B]


def u_b(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (((y - MU) / SIGMA) ** 2).sum(dim=-1)


def _data(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return MU + SIGMA * torch.randn((n, 2), generator=gen, dtype=torch.float64)


def test_reverse_kl_training_reduces_loss_and_estimates_free_energy() -> None:
    base = NormalBase(2)
    gen = torch.Generator().manual_seed(0)
    flow = AffineCouplingFlow(2, n_layers=2, hidden=16)
    result = train_flow(
        flow,
        "reverse_kl",
        80,
        64,
        2e-2,
        u_a=base.reduced_energy,
        u_b=u_b,
        sample_a=lambda n: base.sample(n, gen),
        data_b=None,
    )
    assert len(result.losses) == 80 and result.seconds > 0 and result.n_skipped == 0
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < first - 0.5, (first, last)
    # the LFEP loss is an upper bound on ΔF (up to sampling noise), and IS recovers ΔF
    assert last > F_B - 0.05
    with torch.no_grad():
        x = base.sample(4000, gen)
        y, logdet = flow(x)
        est = importance_free_energy(lfep_log_weights(base.reduced_energy(x), logdet, u_b(y)))
    assert est.valid and abs(est.delta_f - F_B) < 4 * est.delta_f_err + 1e-12, (est, F_B)


def test_maximum_likelihood_training_reduces_nll() -> None:
    base = NormalBase(2)
    data = _data(1000)
    losses = []
    initial = AffineCouplingFlow(2, n_layers=2, hidden=16).state_dict()
    for _ in range(2):
        flow = AffineCouplingFlow(2, n_layers=2, hidden=16)
        flow.load_state_dict(initial)  # conditioner init draws from torch's global RNG
        result = train_flow(
            flow,
            "maximum_likelihood",
            80,
            64,
            2e-2,
            u_a=base.reduced_energy,
            u_b=u_b,
            sample_a=None,
            data_b=data,
            seed=3,
        )
        losses.append(result.losses)
    assert losses[0] == losses[1]  # minibatches reproducible from the seed
    first, last = np.mean(losses[0][:10]), np.mean(losses[0][-10:])
    assert last < first - 0.3 and abs(last - ENTROPY_B) < 0.3, (first, last, ENTROPY_B)


def test_losses_at_identity_match_formulas() -> None:
    """At initialisation T = id, log det = 0: losses reduce to plain energy differences."""
    base = NormalBase(2)
    flow = AffineCouplingFlow(2, n_layers=2, hidden=4)
    x = _data(50)
    rkl = reverse_kl_loss(flow, x, base.reduced_energy, u_b)
    torch.testing.assert_close(rkl, (u_b(x) - base.reduced_energy(x)).mean())
    nll = maximum_likelihood_loss(flow, x, base.reduced_energy)
    torch.testing.assert_close(nll, base.reduced_energy(x).mean())


def test_nonfinite_terms_are_excluded_without_nan_gradients() -> None:
    base = NormalBase(2)
    flow = AffineCouplingFlow(2, n_layers=2, hidden=4)

    def u_b_walls(y: torch.Tensor) -> torch.Tensor:
        """A steep wall: exp overflows to +inf (with an infinite slope) for y1 > ~1.9."""
        return u_b(y) + torch.exp(800.0 * (y[:, 0] - 1.0))

    x = _data(200)
    keep = torch.isfinite(u_b_walls(x))  # the flow is the identity at initialisation
    assert 0 < int((~keep).sum()) < 20
    loss = reverse_kl_loss(flow, x, base.reduced_energy, u_b_walls)
    expected = reverse_kl_loss(flow, x[keep], base.reduced_energy, u_b_walls)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the naive masked mean would have propagated 0 * inf = NaN into the gradients
    flow.zero_grad()
    y, logdet = flow(x)
    terms = u_b_walls(y) - logdet - base.reduced_energy(x)
    torch.where(torch.isfinite(terms), terms, 0.0).sum().backward()
    assert any(torch.isnan(p.grad).any() for p in flow.parameters() if p.grad is not None)

    def nan_energy(y: torch.Tensor) -> torch.Tensor:
        return y[:, 0] * math.nan

    assert math.isnan(float(reverse_kl_loss(flow, x, base.reduced_energy, nan_energy)))
    before = [p.detach().clone() for p in flow.parameters()]
    gen = torch.Generator().manual_seed(0)
    result = train_flow(
        flow,
        "reverse_kl",
        3,
        8,
        1e-2,
        u_a=base.reduced_energy,
        u_b=nan_energy,
        sample_a=lambda n: base.sample(n, gen),
        data_b=None,
    )
    assert result.n_skipped == 3 and all(math.isnan(v) for v in result.losses)
    assert all(torch.equal(a, b) for a, b in zip(before, flow.parameters(), strict=True))


def test_train_flow_errors() -> None:
    base = NormalBase(2)
    flow = AffineCouplingFlow(2, n_layers=1, hidden=4)
    common = dict(u_a=base.reduced_energy, u_b=u_b)
    with pytest.raises(ValueError, match="objective: 'kl'.*reverse_kl, maximum_likelihood"):
        train_flow(flow, "kl", 1, 4, 1e-3, sample_a=None, data_b=None, **common)
    with pytest.raises(ValueError, match="sample_a: None"):
        train_flow(flow, "reverse_kl", 1, 4, 1e-3, sample_a=None, data_b=None, **common)
    with pytest.raises(ValueError, match="data_b: None"):
        train_flow(flow, "maximum_likelihood", 1, 4, 1e-3, sample_a=None, data_b=None, **common)
    with pytest.raises(ValueError, match="learning_rate: -1.0"):
        train_flow(flow, "maximum_likelihood", 1, 4, -1.0, sample_a=None, data_b=_data(5), **common)


def test_reweighted_forward_kl_adds_the_importance_weighted_likelihood() -> None:
    """At T = id the forward term is Σ w̄_i u_A(x_i), w̄ = softmax(u_A − u_B) (self-normalized
    importance weights of B against A); its gradient is −Σ w̄_i ∇ log q(y_i), y_i held fixed."""
    base = NormalBase(2)
    flow = AffineCouplingFlow(2, n_layers=2, hidden=4)
    x = _data(50)
    loss = reverse_kl_loss(flow, x, base.reduced_energy, u_b, forward_kl_weight=0.5)
    u_a_x = base.reduced_energy(x)
    weights = torch.softmax(u_a_x - u_b(x), 0)
    torch.testing.assert_close(
        loss, (u_b(x) - u_a_x).mean() + 0.5 * (weights * u_a_x).sum())
    loss.backward()
    got = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    expected = reverse_kl_loss(flow, x, base.reduced_energy, u_b)
    x_back, logdet_inverse = flow.inverse(x)
    (expected + 0.5 * (weights * (base.reduced_energy(x_back) - logdet_inverse)).sum()).backward()
    for a, p in zip(got, flow.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_reweighted_forward_kl_corrects_mode_weights_reverse_kl_leaves() -> None:
    """Two well-separated modes of equal weight (x1 = ±2.5, sd 0.3); a flow fitted by maximum
    likelihood to data with weights 0.8 / 0.2. Reverse KL alone drives the weights further from
    1/2 (its optimum weights each mode by how well the flow fits its shape, and it reaches
    them only through the few samples between the modes); with the reweighted forward KL
    (weight 100) they go to 1/2. Fraction of 4000 draws: sd 0.008; the training's own noise
    (IS weights of 512 samples) moved it by up to 0.08 between checks 50 steps apart."""
    def u_two_modes(y: torch.Tensor) -> torch.Tensor:
        return (torch.minimum((y[:, 0] - 2.5) ** 2, (y[:, 0] + 2.5) ** 2) / (2 * 0.09)
                + 0.5 * y[:, 1] ** 2)

    gen = torch.Generator().manual_seed(5)
    n = 4000
    sign = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.8, 1.0, -1.0)
    data = torch.stack([2.5 * sign + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64),
                        torch.randn(n, generator=gen, dtype=torch.float64)], 1)
    base = NormalBase(2)
    torch.manual_seed(0)
    start = SplineCouplingFlow(2, n_layers=4, hidden=16)
    train_flow(start, "maximum_likelihood", 400, 256, 1e-2, u_a=base.reduced_energy,
               u_b=u_two_modes, sample_a=None, data_b=data, seed=1)

    def right_mode_fraction(flow: SplineCouplingFlow) -> float:
        with torch.no_grad():
            y, _ = flow(base.sample(n, torch.Generator().manual_seed(9)))
        return float((y[:, 0] > 0).double().mean())

    assert abs(right_mode_fraction(start) - 0.8) < 0.05
    fractions = {}
    for weight in (None, 100.0):
        flow = copy.deepcopy(start)
        sampler = torch.Generator().manual_seed(2)
        train_flow(flow, ReverseKL(weight), 300, 512, 5e-3, u_a=base.reduced_energy,
                   u_b=u_two_modes, sample_a=lambda m, g=sampler: base.sample(m, g),
                   data_b=None)
        fractions[weight] = right_mode_fraction(flow)
    assert fractions[None] > 0.9, fractions
    assert abs(fractions[100.0] - 0.5) < 0.1, fractions
