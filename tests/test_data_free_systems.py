"""The data-free benchmarks' systems: the 20-D Gaussian mixture (normalized, modes of weight
1/3, its seed recorded) and the double well's modes and exact sampler. Statistical checks use
4 sigma of the binomial error sqrt(p (1 − p) / N)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from boltzgen.layouts import VectorLayout
from boltzgen.systems import make_system


def test_mixture_energy_is_minus_the_log_of_an_independently_written_density() -> None:
    system = make_system({"kind": "gaussian_mixture"})
    assert system.dim == 20 and system.layout() == VectorLayout(20, slow_dim=10)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.5, 1.5, size=(50, 20))
    x[:10, :10] = system.centres[0] + 0.1 * rng.standard_normal((10, 10))  # near a mode too
    slow, fast = x[:, :10], x[:, 10:]
    log_slow = np.logaddexp.reduce(
        [multivariate_normal(c, 0.01 * np.eye(10)).logpdf(slow) for c in system.centres],
        axis=0) - math.log(3)
    log_fast = np.array([multivariate_normal(system.coupling @ s, 0.01 * np.eye(10)).logpdf(f)
                         for s, f in zip(slow, fast, strict=True)])
    energy = system.potential(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(energy, -(log_slow + log_fast), rtol=1e-12, atol=1e-9)
    assert system.exact_free_energy(1.0) == 0.0 and system.exact_free_energy(2.0) is None


def test_mixture_modes_have_a_third_each_and_the_seed_fixes_the_system() -> None:
    system = make_system({"kind": "gaussian_mixture"})
    assert system.parameters()["seed"] == 2025
    assert np.all(np.abs(system.centres) <= 1.0)
    assert system.misassignment_bound() < 1e-20
    np.testing.assert_array_equal(system.exact_mode_probabilities(1.0), np.full(3, 1 / 3))
    n = 30_000
    x, proposals = system.exact_samples(n, 1.0, seed=4)
    assert x.shape == (n, 20) and proposals == n
    fractions = np.bincount(system.mode_index(x), minlength=3) / n
    assert np.all(np.abs(fractions - 1 / 3) < 4 * math.sqrt((1 / 3) * (2 / 3) / n)), fractions
    same = make_system({"kind": "gaussian_mixture"})
    other = make_system({"kind": "gaussian_mixture", "seed": 7})
    np.testing.assert_array_equal(same.centres, system.centres)
    assert not np.allclose(other.centres, system.centres)
    with pytest.raises(ValueError, match="temperature: 2.0 is not allowed"):
        system.exact_samples(10, 2.0, seed=0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_double_well_modes_and_exact_sampler(temperature: float) -> None:
    system = make_system({"kind": "double_well"})
    barrier = system.barrier()
    assert abs(4 * 0.25 * barrier**3 - 6 * barrier + 1) < 1e-9  # V'(barrier) = 0
    weights = system.exact_mode_probabilities(temperature)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12) and weights[0] > weights[1] > 0
    n = 40_000
    x, proposals = system.exact_samples(n, temperature, seed=3)
    assert x.shape == (n, 2) and proposals > n
    fraction = float(np.mean(system.mode_index(x) == 1))
    sigma = math.sqrt(weights[1] * weights[0] / n)
    assert abs(fraction - weights[1]) < 4 * sigma, (fraction, weights)
    # x2 ~ N(0, T): its sample variance within 4 sigma (sd of s² is T sqrt(2 / n))
    assert abs(float(np.var(x[:, 1])) - temperature) < 4 * temperature * math.sqrt(2 / n)
