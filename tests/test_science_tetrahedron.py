"""The tetrahedron in an external field: exact answers checked against independent estimates.

Statistical tolerances are 5 standard errors of the Monte Carlo estimate they test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzgen.rigid.quaternions import multiply, random_unit_quaternions
from boltzgen.systems import make_system
from boltzgen.systems.tetrahedron import TetrahedronInField, octahedral_group_quaternions

T = 300.0


@pytest.fixture(scope="module")
def system() -> TetrahedronInField:
    return make_system({"kind": "tetrahedron_field"})


def test_quadrature_is_converged(system) -> None:
    coarse = TetrahedronInField(quadrature_points=64)
    assert abs(coarse.exact_free_energy(T) - system.exact_free_energy(T)) < 1e-8


def test_quadrature_agrees_with_uniform_monte_carlo(system) -> None:
    n = 1_000_000
    q = random_unit_quaternions(n, torch.Generator().manual_seed(11))
    log_w = -system.potential(q) / (system.boltzmann_constant * T)
    w = torch.exp(log_w - log_w.max())
    f_mc = -(math.log(float(w.mean())) + float(log_w.max()))
    err = float(w.std()) / math.sqrt(n) / float(w.mean())  # delta method, kT
    assert abs(f_mc - system.exact_free_energy(T)) < 5 * err


def test_potential_symmetries_and_floor(system) -> None:
    q = random_unit_quaternions(4096, torch.Generator().manual_seed(12))
    u = system.potential(q)
    assert torch.allclose(system.potential(-q), u, atol=1e-12, rtol=0)
    # the tetrahedral group acts in the body frame: U(q ⊗ g) = U(q) for g in T
    group = torch.as_tensor(octahedral_group_quaternions())
    for g in group[:12]:
        assert torch.allclose(system.potential(multiply(q, g)), u, atol=1e-10, rtol=0)
    assert float(u.min()) >= system.energy_floor()
    minima = system.potential(group)
    assert torch.allclose(minima[:12], minima[0].expand(12))
    assert float(minima[0]) < float(minima[12])  # even set is deeper


def test_modes_are_unequal_sets_with_real_barriers(system) -> None:
    p = system.exact_mode_probabilities(T)
    assert p.shape == (24,) and abs(p.sum() - 1) < 1e-12
    # symmetric modes agree to the accuracy of the quadrature's cell assignment
    assert np.ptp(p[:12]) < 5e-4 and np.ptp(p[12:]) < 5e-4
    assert p[:12].sum() > 0.55 and p[12:].sum() > 0.3
    assert system.barrier_lower_bound_kt(T) > 3.0


def test_exact_sampler_matches_the_mode_weights(system) -> None:
    n = 40000
    samples, proposals = system.exact_samples(n, T, seed=3)
    assert samples.shape == (n, 4) and proposals >= n
    freq = np.bincount(system.mode_index(samples), minlength=24) / n
    exact = system.exact_mode_probabilities(T)
    sigma = np.sqrt(exact * (1 - exact) / n)
    assert np.all(np.abs(freq - exact) < 5 * sigma)
    # and the energy distribution: mean energy of samples vs quadrature-free check by
    # self-normalised importance weighting of uniform samples
    q = random_unit_quaternions(400000, torch.Generator().manual_seed(13))
    u = system.potential(q)
    w = torch.exp(-(u - u.min()) / (system.boltzmann_constant * T))
    mean_u = float((w * u).sum() / w.sum())
    u_samples = system.potential(torch.as_tensor(samples)).numpy()
    se = u_samples.std() / math.sqrt(n)
    ess = float(w.sum() ** 2 / (w * w).sum())
    se_is = float(torch.sqrt((w * (u - mean_u) ** 2).sum() / w.sum() / ess))
    assert abs(u_samples.mean() - mean_u) < 5 * math.hypot(se, se_is)


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(ValueError, match="system.well_width"):
        make_system({"kind": "tetrahedron_field", "well_width": 0.0})
    with pytest.raises(ValueError, match="system.site_distance"):
        make_system({"kind": "tetrahedron_field", "site_distance": -0.1})
