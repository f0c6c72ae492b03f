"""Replica-exchange MCMC on a Gaussian with exact moments, and decorrelation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pymbar import timeseries

from boltzgen.mcmc import decorrelated, replica_exchange

SIGMA = np.array([1.0, 2.0])  # widths at T = 1 (reduced units)


def _gaussian_potential(x: torch.Tensor) -> torch.Tensor:
    """U(x) = Σ_i x_i^2 / (2 σ_i^2) in kT units at T = 1; at temperature T, x_i ~ N(0, σ_i^2 T)."""
    return 0.5 * (x**2 / x.new_tensor(SIGMA) ** 2).sum(dim=-1)


def _standard_error(series: np.ndarray) -> tuple[float, float]:
    """Mean of an observable over (n_chains, n_frames) and its standard error.

    SE = sqrt(var * g / (n_chains * n_frames)) with g the largest per-chain statistical
    inefficiency of this observable's own time series (chains are independent).
    """
    g = max(timeseries.statistical_inefficiency(chain) for chain in series)
    return float(series.mean()), math.sqrt(series.var() * g / series.size)


@pytest.fixture(scope="module")
def gaussian_run():
    return replica_exchange(
        _gaussian_potential,
        temperatures=[1.0, 2.0],
        x0=torch.zeros(2, dtype=torch.float64),
        n_steps=3000,
        burn_in=500,
        n_chains=32,
        thin=2,
        step_size=0.5,
        exchange_every=5,
        seed=7,
    )


def test_moments_match_exact_values(gaussian_run) -> None:
    """Means 0 and variances σ_i^2 T within 4 standard errors.

    Tolerance: each estimate is a time average over 32 independent chains; its standard error
    is sqrt(var g / N) with g the observable's own statistical inefficiency (so correlation is
    accounted for). |estimate - exact| < 4 SE fails with probability ~6e-5 per comparison for a
    correct sampler (8 comparisons). The variance is estimated as the mean of x_i^2 (exact mean
    0), whose exact value is σ_i^2 T.
    """
    run = gaussian_run
    rows = []
    for k, temperature in enumerate(run.temperatures):
        for i in range(2):
            x = run.samples[k, :, :, i]
            for name, series, exact in (
                ("mean", x, 0.0),
                ("var", x**2, SIGMA[i] ** 2 * temperature),
            ):
                est, se = _standard_error(series)
                rows.append((temperature, i, name, est, exact, se, abs(est - exact) / se))
    table = "\n".join(
        f"T={t} x{i + 1} {n}: estimate {e:.4f} exact {x:.4f} se {s:.4f} z {z:.2f}"
        for t, i, n, e, x, s, z in rows
    )
    assert all(row[-1] < 4.0 for row in rows), table


def test_diagnostics_and_shapes(gaussian_run) -> None:
    run = gaussian_run
    assert run.samples.shape == (2, 32, 1250, 2) and run.potentials.shape == (2, 32, 1250)
    np.testing.assert_allclose(run.potentials, _gaussian_potential(torch.as_tensor(run.samples)))
    assert run.exchange_acceptance.shape == (1,)
    assert 0.0 < run.exchange_acceptance[0] < 1.0
    assert np.all((run.acceptance > 0.3) & (run.acceptance < 0.5))  # adapted toward 0.4
    assert run.step_sizes.shape == (2,) and run.step_sizes[1] > run.step_sizes[0]
    xs, us, g = decorrelated(run.samples[1], run.potentials[1])
    stride = math.ceil(g)
    assert g >= 1.0 and xs.shape == (32 * math.ceil(1250 / stride), 2) and us.shape == xs.shape[:1]
    np.testing.assert_array_equal(xs[: math.ceil(1250 / stride)], run.samples[1, 0, ::stride])


def test_reproducible_and_single_temperature() -> None:
    kwargs = dict(x0=torch.zeros(4, 2, dtype=torch.float64), n_steps=60, burn_in=20, n_chains=4)
    a = replica_exchange(_gaussian_potential, [1.0], seed=3, **kwargs)
    b = replica_exchange(_gaussian_potential, [1.0], seed=3, **kwargs)
    c = replica_exchange(_gaussian_potential, [1.0], seed=4, **kwargs)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.array_equal(a.samples, c.samples)
    assert a.exchange_acceptance.shape == (0,) and a.samples.shape == (1, 4, 40, 2)


def test_decorrelated_recovers_ar1_inefficiency() -> None:
    """AR(1) with coefficient ρ has g = (1 + ρ)/(1 - ρ) = 9 for ρ = 0.8; estimate within 25 %."""
    rng = np.random.default_rng(0)
    rho, n_chains, n_frames = 0.8, 4, 20000
    series = np.empty((n_chains, n_frames))
    series[:, 0] = rng.normal(size=n_chains)
    noise = rng.normal(size=(n_chains, n_frames)) * math.sqrt(1 - rho**2)
    for t in range(1, n_frames):
        series[:, t] = rho * series[:, t - 1] + noise[:, t]
    xs, us, g = decorrelated(series[..., None], series)
    assert abs(g - 9.0) < 0.25 * 9.0
    assert xs.shape == (n_chains * math.ceil(n_frames / math.ceil(g)), 1)
    # a stuck chain (constant potential) keeps a single frame
    _, us_stuck, g_stuck = decorrelated(np.zeros((2, 10, 1)), np.ones((2, 10)))
    assert g_stuck == 10.0 and us_stuck.shape == (2,)


def test_input_errors() -> None:
    x0 = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="strictly ascending"):
        replica_exchange(_gaussian_potential, [2.0, 1.0], x0, n_steps=10, burn_in=0, n_chains=2)
    with pytest.raises(ValueError, match=r"temperatures\[0\]: -1.0"):
        replica_exchange(_gaussian_potential, [-1.0], x0, n_steps=10, burn_in=0, n_chains=2)
    with pytest.raises(ValueError, match="x0: shape"):
        replica_exchange(
            _gaussian_potential, [1.0], torch.zeros(3, 2, dtype=torch.float64), 10, 0, n_chains=2
        )
    with pytest.raises(ValueError, match="keeps no frame"):
        replica_exchange(_gaussian_potential, [1.0], x0, n_steps=10, burn_in=10, n_chains=2)
    with pytest.raises(ValueError, match="x0: the potential is not finite"):
        replica_exchange(lambda x: x.new_full(x.shape[:-1], math.inf), [1.0], x0, 10, 0, n_chains=2)
    with pytest.raises(ValueError, match="potentials: shape"):
        decorrelated(np.zeros((2, 10, 1)), np.zeros((2, 9)))
