"""Estimators on Gaussians with exact free energies (reduced units, kT)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzgen.estimators import (
    importance_free_energy,
    importance_free_energy_err_bootstrap,
    kish_ess_fraction,
    kish_ess_fraction_err,
    lbar,
    lbar_err_bootstrap,
    lfep_log_weights,
    mbar_ladder,
)


def test_importance_weighting_known_answer() -> None:
    """A = N(0, 1) normalized (f_A = 0); B = exp(-(x - μ)^2 / (2 σ^2)) unnormalized,
    f_B = -ln(sqrt(2 pi) σ); identity map. σ = 1.2 < sqrt(2) so var(w) is finite and the
    delta-method error is meaningful; pass if within 4 of its own sigma."""
    mu, sigma, n = 0.5, 1.2, 20000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u_a = 0.5 * x**2 + 0.5 * math.log(2 * math.pi)
    u_b = (x - mu) ** 2 / (2 * sigma**2)
    log_w = lfep_log_weights(u_a, torch.zeros_like(x), u_b)
    est = importance_free_energy(log_w)
    exact = -math.log(math.sqrt(2 * math.pi) * sigma)
    assert est.valid and est.n_samples == n and est.n_nonfinite == 0
    assert 0.0 < est.ess < 1.0 and est.delta_f_err > 0
    assert abs(est.delta_f - exact) < 4 * est.delta_f_err, (est, exact)
    # delta_f_err = sqrt((1/ess - 1)/N) = sqrt(var(w) / (N mean(w)^2))
    w = np.exp(log_w)
    assert est.delta_f_err == pytest.approx(math.sqrt(w.var() / (n * w.mean() ** 2)), rel=1e-9)
    assert est.ess == pytest.approx(w.sum() ** 2 / (w**2).sum() / n, rel=1e-9)


def test_identical_weights() -> None:
    est = importance_free_energy(np.full(100, 3.0))
    assert est.valid and est.delta_f == pytest.approx(-3.0, abs=1e-12)
    assert est.delta_f_err == 0.0 and est.ess == pytest.approx(1.0, abs=1e-12)
    assert kish_ess_fraction(np.full(10, -50.0)) == pytest.approx(1.0)


def test_nonfinite_weights_counted() -> None:
    log_w = np.array([0.0, 0.0, np.nan, -np.inf, np.inf])
    est = importance_free_energy(log_w)
    assert est.valid and est.n_samples == 5 and est.n_nonfinite == 3
    assert est.delta_f == pytest.approx(math.log(5) - math.log(2))
    assert est.ess == pytest.approx(0.4)  # (Σw)^2 / Σw^2 / N = 4 / 2 / 5
    none = importance_free_energy(np.array([np.nan, np.inf]))
    assert not none.valid and math.isnan(none.delta_f) and math.isnan(none.delta_f_err)
    assert none.ess == 0.0 and none.n_nonfinite == 2
    with pytest.raises(ValueError, match="log_w: empty"):
        importance_free_energy(np.array([]))
    with pytest.raises(ValueError, match="u_a, logdet, u_b: shapes"):
        lfep_log_weights(np.zeros(3), np.zeros(2), np.zeros(3))


def test_ess_bootstrap_error_matches_the_spread_over_data_sets() -> None:
    """Light-tailed weights (log w ~ N(0, 0.5²), N = 300): the mean bootstrap error of the ESS
    fraction over M = 200 independent data sets is compared with the standard deviation of
    the ESS over those sets. The sample standard deviation of M values has a relative error
    of about 1 / sqrt(2 (M - 1)) = 5 %; the ratio must be 1 within 4 of those (0.8 to 1.2).
    (Heavier tails make the bootstrap err low; the docstring gives the measured ratios.)"""
    rng = np.random.default_rng(7)
    sets = [rng.normal(0.0, 0.5, 300) for _ in range(200)]
    spread = np.std([kish_ess_fraction(lw) for lw in sets], ddof=1)
    bootstrap = np.mean([kish_ess_fraction_err(lw, n_bootstrap=100, seed=i)
                         for i, lw in enumerate(sets)])
    assert 0.8 < bootstrap / spread < 1.2, (bootstrap, spread)
    assert kish_ess_fraction_err(np.zeros(50)) == 0.0  # equal weights: ESS 1 in every resample
    with pytest.raises(ValueError, match="log_w: 1 log weight"):
        kish_ess_fraction_err(np.zeros(1))


def test_lbar_gaussians() -> None:
    """A = N(0, 1), B = N(0, σ^2), both unnormalized: ΔF = f_B - f_A = -ln σ.

    Identity map: statistical agreement within 4 sigma. Scaling map T(x) = σ x with
    log|det J_T| = ln σ: every work equals -ln σ, so BAR is exact (error 0)."""
    sigma, n = 1.5, 4000
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=n), rng.normal(scale=sigma, size=n)

    def u_a(v):
        return 0.5 * v**2

    def u_b(v):
        return 0.5 * v**2 / sigma**2

    exact = -math.log(sigma)
    df, err = lbar(u_b(x) - u_a(x), u_a(y) - u_b(y))
    assert abs(df - exact) < 4 * err and err > 0
    log_s = math.log(sigma)
    w_f = u_b(sigma * x) - u_a(x) - log_s
    w_r = u_a(y / sigma) - u_b(y) + log_s
    df, err = lbar(np.append(w_f, np.inf), np.append(w_r, np.nan))  # non-finite works dropped
    assert df == pytest.approx(exact, abs=1e-10) and err == pytest.approx(0.0, abs=1e-6)
    assert all(math.isnan(v) for v in lbar(np.array([np.nan]), w_r))
    assert np.geterr()["over"] == "warn"  # pymbar's global np.seterr was restored


def test_mbar_ladder_gaussians() -> None:
    """U = x^2 / 2 sampled exactly at T_k: x ~ N(0, T_k), f_k = -ln sqrt(2 pi T_k), so
    f_k - f_0 = -0.5 ln(T_k / T_0) (widths sqrt(T_k)); within 4 bootstrap sigma."""
    temps = [1.0, 2.0, 4.0]
    rng = np.random.default_rng(2)
    energies = [0.5 * rng.normal(scale=math.sqrt(t), size=1500) ** 2 for t in temps]
    state = np.random.get_state()
    df, err = mbar_ladder(energies, temps, n_bootstraps=20, seed=5)
    assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG untouched
    exact = -0.5 * np.log(np.array(temps) / temps[0])
    assert df.shape == err.shape == (3,) and df[0] == 0.0 and err[0] == 0.0
    assert np.all(err[1:] > 0) and np.all(np.abs(df - exact)[1:] < 4 * err[1:]), (df, err, exact)
    df2, err2 = mbar_ladder(energies, temps, n_bootstraps=20, seed=5)
    np.testing.assert_array_equal(err2, err)  # bootstrap reproducible from the seed
    # energy units with k_B: U in kJ/mol, T in K gives the same reduced free energies
    kb = 0.00831446261815324
    df3, _ = mbar_ladder([e * kb * 300 for e in energies], [300 * t for t in temps], kb, 0)
    np.testing.assert_allclose(df3, df, atol=1e-6)
    with pytest.raises(ValueError, match="potentials_per_state: 2 states given for 3"):
        mbar_ladder(energies[:2], temps)


def test_bootstrap_errors_of_lfep_and_lbar_match_their_spread_over_data_sets() -> None:
    """Gaussian works with the exact ΔF: forward W ~ N(ΔF + σ²/2, σ²), reverse −W ~ its
    Crooks partner N(−ΔF + σ²/2, σ²) (σ = 1 kT, N = 200 each). Over R = 120 independent data
    sets the mean bootstrap errors of LFEP and LBAR must lie within 4 standard errors of the
    spread of the estimates (relative SE of an SD from R sets: 1/sqrt(2(R − 1)) = 0.065,
    so 0.74–1.26), and so must the delta-method and asymptotic errors. (20 BAR resamples per
    set: each error is noisy, their mean over 120 sets much less.)"""
    rng = np.random.default_rng(5)
    delta_f, sigma, n = 1.5, 1.0, 200
    lfep, lfep_boot, lfep_delta, bar, bar_boot, bar_asym = [], [], [], [], [], []
    for trial in range(120):
        w_f = rng.normal(delta_f + sigma**2 / 2, sigma, n)
        w_r = rng.normal(-delta_f + sigma**2 / 2, sigma, n)
        estimate = importance_free_energy(-w_f)
        lfep.append(estimate.delta_f)
        lfep_delta.append(estimate.delta_f_err)
        lfep_boot.append(importance_free_energy_err_bootstrap(-w_f, seed=trial))
        value, err = lbar(w_f, w_r)
        bar.append(value)
        bar_asym.append(err)
        bar_boot.append(lbar_err_bootstrap(w_f, w_r, n_bootstraps=20, seed=trial))
    for spread_of, errors in ((lfep, lfep_boot), (lfep, lfep_delta), (bar, bar_boot),
                              (bar, bar_asym)):
        ratio = np.mean(errors) / np.std(spread_of, ddof=1)
        assert 0.74 < ratio < 1.26, ratio
    assert abs(np.mean(bar) - delta_f) < 4 * np.std(bar, ddof=1) / np.sqrt(120)
    with pytest.raises(ValueError, match="log_w"):
        importance_free_energy_err_bootstrap(np.zeros(1))
    assert np.isnan(lbar_err_bootstrap(np.zeros(1), np.zeros(5)))
