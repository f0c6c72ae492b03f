"""Particle systems (Lennard-Jones cluster, DW4) and the configurational temperature.

The Lennard-Jones potential against values worked out by hand in both pair conventions, its
symmetries, its validation; the configurational temperature k_B T_conf = ⟨|∇U|²⟩ / ⟨∇²U⟩
against exact Gaussian samples and against the project's replica-exchange reference at kT = 1
for DW4 and LJ13 in both conventions, with a negative control (samples of kT = 1.5) that the
check must reject.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch

from boltzgen.mcmc import McmcResult, replica_exchange
from boltzgen.observables import configurational_temperature
from boltzgen.systems import (
    DW4,
    SYSTEMS,
    LennardJonesCluster,
    ParticleSystem,
    make_system,
    system_parameter_names,
)
from boltzgen.systems.particles import cubic_lattice, pair_indices


def _lj_by_hand(x: np.ndarray, epsilon: float, r_m: float, c_osc: float,
                ordered: bool) -> float:
    """U of Cartesian positions x (n, d) written out as loops: the LJ sum over i ≠ j (each pair
    twice) for ordered pairs, over i < j for unordered, plus the trap around the centre."""
    n = len(x)
    pair = 0.0
    for i in range(n):
        for j in range(n):
            if i == j or (not ordered and j < i):
                continue
            d = math.dist(x[i], x[j])
            pair += epsilon * ((r_m / d) ** 12 - 2.0 * (r_m / d) ** 6)
    centre = x.mean(axis=0)
    return pair + c_osc * sum(float(((xi - centre) ** 2).sum()) for xi in x)


@pytest.mark.parametrize("convention", ["ordered_pairs", "unordered_pairs"])
def test_lj_potential_by_hand(convention: str) -> None:
    """Two particles in 3-D at distance d (centred: Σ|x_i − x̄|² = d²/2) and a scalene
    triangle in 2-D away from the origin: U equals the hand formula; the ordered-pairs pair term
    is twice the unordered one and the trap term is the same."""
    params = {"epsilon": 1.3, "r_m": 1.1, "c_osc": 0.7}
    ordered = convention == "ordered_pairs"
    d = 1.25
    two = LennardJonesCluster(n_particles=2, spatial_dim=3, convention=convention, **params)
    x2 = np.array([[0.3, -0.2, 0.5], [0.3 + d, -0.2, 0.5]])
    lj = 1.3 * ((1.1 / d) ** 12 - 2.0 * (1.1 / d) ** 6)
    expected = (2.0 if ordered else 1.0) * lj + 0.7 * d**2 / 2.0
    u2 = float(two.potential(two.from_cartesian(torch.as_tensor(x2))))
    assert u2 == pytest.approx(expected, rel=1e-13)
    assert u2 == pytest.approx(_lj_by_hand(x2, ordered=ordered, **params), rel=1e-13)

    three = LennardJonesCluster(n_particles=3, spatial_dim=2, convention=convention, **params)
    x3 = np.array([[2.0, 1.0], [3.05, 1.1], [2.4, 2.2]])
    u3 = float(three.potential(three.from_cartesian(torch.as_tensor(x3))))
    assert u3 == pytest.approx(_lj_by_hand(x3, ordered=ordered, **params), rel=1e-13)
    trap = _lj_by_hand(x3, 1.3, 1.1, 0.7, ordered=False) - _lj_by_hand(x3, 1.3, 1.1, 0.0,
                                                                         ordered=False)
    unordered_pairs = _lj_by_hand(x3, 1.3, 1.1, 0.0, ordered=False)
    assert u3 == pytest.approx((2.0 if ordered else 1.0) * unordered_pairs + trap, rel=1e-13)


@pytest.mark.parametrize(("convention", "depth"), [("ordered_pairs", 2.0),
                                                   ("unordered_pairs", 1.0)])
def test_lj_pair_minimum(convention: str, depth: float) -> None:
    """Without the trap one pair has its minimum −ε (unordered) / −2ε (ordered) at d = r_m."""
    system = LennardJonesCluster(n_particles=2, spatial_dim=3, convention=convention,
                                 epsilon=0.8, r_m=1.3, c_osc=0.0)

    def energy(d: float) -> float:
        x = torch.tensor([[0.0, 0.0, 0.0], [d, 0.0, 0.0]], dtype=torch.float64)
        return float(system.potential(system.from_cartesian(x)))

    assert energy(1.3) == pytest.approx(-depth * 0.8, rel=1e-14)
    assert energy(1.3 * 0.999) > energy(1.3) < energy(1.3 * 1.001)


def test_lj_invariances() -> None:
    """U of LJ13 is unchanged by a random rotation, a reflection, a permutation of the
    particles and a translation of the Cartesian configuration (mapped back by
    ``from_cartesian``, which drops the centre of mass)."""
    system = LennardJonesCluster()
    g = torch.Generator().manual_seed(3)
    lattice = torch.as_tensor(cubic_lattice(13, 3))
    x = lattice + 0.1 * torch.randn((6, 13, 3), generator=g, dtype=torch.float64)
    u = system.potential(system.from_cartesian(x))
    q, r = torch.linalg.qr(torch.randn((3, 3), generator=g, dtype=torch.float64))
    rotation = q * torch.sign(torch.diagonal(r))
    rotation = rotation * torch.sign(torch.linalg.det(rotation))  # det +1: a proper rotation
    reflection = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    moved = {
        "rotation": x @ rotation.T,
        "reflection": x @ reflection,
        "permutation": x[:, torch.randperm(13, generator=g)],
        "translation": x + torch.tensor([2.5, -1.0, 0.3], dtype=torch.float64),
    }
    for name, y in moved.items():
        torch.testing.assert_close(system.potential(system.from_cartesian(y)), u, rtol=1e-12,
                                   atol=1e-12, msg=name)


def test_lj_coordinates_and_observables() -> None:
    """Helmert coordinates: dim (n − 1) d, |z|² = Σ|x_i − x̄|²; pair distances in row-major
    i < j order; observables of N samples: P N distances and N energies."""
    system = LennardJonesCluster(n_particles=5, spatial_dim=3, convention="unordered_pairs")
    assert system.dim == 12 and isinstance(system, ParticleSystem) and system.n_pairs == 10
    layout = system.layout()
    assert (layout.kind, layout.n_particles, layout.spatial_dim, layout.com_free) == (
        "particles", 5, 3, True)
    g = torch.Generator().manual_seed(0)
    x = torch.as_tensor(cubic_lattice(5, 3)) + 0.1 * torch.randn((4, 5, 3), generator=g,
                                                                  dtype=torch.float64)
    z = system.from_cartesian(x)
    centred = x - x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(system.to_cartesian(z), centred, rtol=0, atol=1e-13)
    torch.testing.assert_close(z.square().sum(-1), centred.square().sum((-1, -2)), rtol=1e-13,
                               atol=0)
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    expected = torch.stack([(x[:, i] - x[:, j]).norm(dim=-1) for i, j in pairs], dim=-1)
    torch.testing.assert_close(system.pair_distances(z), expected, rtol=1e-13, atol=0)
    i, j = pair_indices(5)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == pairs
    obs = system.observables(z.numpy())
    assert obs["pair_distance"].shape == (40,) and obs["energy"].shape == (4,)
    np.testing.assert_allclose(obs["energy"], system.potential(z).numpy())
    assert isinstance(DW4(), ParticleSystem) and DW4().n_pairs == 6


def test_cubic_lattice_start() -> None:
    """The start of the reference chains: centred, no pair closer than the spacing."""
    for n, d in [(4, 2), (13, 3), (55, 3)]:
        sites = cubic_lattice(n, d, spacing=1.1)
        assert sites.shape == (n, d)
        np.testing.assert_allclose(sites.mean(axis=0), 0.0, atol=1e-12)
        distances = np.linalg.norm(sites[:, None] - sites[None], axis=-1)[np.triu_indices(n, 1)]
        assert distances.min() == pytest.approx(1.1)


def test_lj_registry_and_validation() -> None:
    assert SYSTEMS["lj"] is LennardJonesCluster
    assert system_parameter_names("lj") == ["n_particles", "spatial_dim", "convention",
                                            "epsilon", "r_m", "c_osc"]
    system = make_system({"kind": "lj"})
    assert system.parameters() == {"n_particles": 13, "spatial_dim": 3,
                                   "convention": "ordered_pairs", "epsilon": 1.0, "r_m": 1.0,
                                   "c_osc": 0.5}
    assert system.dim == 36 and system.boltzmann_constant == 1.0
    assert system.exact_free_energy(1.0) is None and not system.supports_md()
    note = system.estimand_note
    assert "36-D centre-of-mass-free" in note and "Helmert" in note and "ordered_pairs" in note
    assert "unordered_pairs" in make_system({"kind": "lj", "convention": "unordered_pairs",
                                             "n_particles": 55}).estimand_note
    assert make_system({"kind": "lj", "n_particles": 55}).dim == 162
    assert make_system({"kind": "lj", "c_osc": 0.0}).c_osc == 0.0  # allowed; Z diverges
    with pytest.raises(ValueError, match=r"^system\.convention: 'bogus' is not allowed; "
                                         r"choose one of ordered_pairs, unordered_pairs$"):
        make_system({"kind": "lj", "convention": "bogus"})
    with pytest.raises(ValueError,
                       match=r"^system\.n_particles: 1 is not allowed; need at least 2"):
        make_system({"kind": "lj", "n_particles": 1})
    with pytest.raises(ValueError, match=r"^system\.epsilon: 0\.0 is not allowed; must be > 0"):
        make_system({"kind": "lj", "epsilon": 0})
    with pytest.raises(ValueError, match=r"^system\.r_m: -1\.0 is not allowed; must be > 0"):
        make_system({"kind": "lj", "r_m": -1.0})
    with pytest.raises(ValueError, match=r"^system\.c_osc: -0\.1 is not allowed; must be >= 0"):
        make_system({"kind": "lj", "c_osc": -0.1})


def test_configurational_temperature_of_exact_gaussian_samples() -> None:
    """U = |x|² / (2σ²) in 10-D: exact samples at kT = 1 give T_conf = 1 in expectation
    (|∇U|² = |x|²/σ⁴, ∇²U = 10/σ²); within 4 sigma of the block error. k_B scales it."""
    sigma = 1.7
    x = sigma * np.random.default_rng(5).standard_normal((20_000, 10))

    def potential(y: torch.Tensor) -> torch.Tensor:
        return y.square().sum(-1) / (2.0 * sigma**2)

    t, err = configurational_temperature(potential, x)
    assert 0.0 < err < 0.01
    assert abs(t - 1.0) < 4.0 * err, (t, err)
    # The estimate is exactly Σ|x|² / (N · 10 σ²), the Gaussian's own identity.
    assert t == pytest.approx(float((x**2).sum()) / (x.size * sigma**2), rel=1e-12)
    t2, err2 = configurational_temperature(potential, torch.as_tensor(x), boltzmann_constant=2.0)
    assert (t2, err2) == pytest.approx((t / 2.0, err / 2.0), rel=1e-12)


@pytest.mark.parametrize("n_particles", [13, 55])
def test_configurational_temperature_is_exact_autograd(n_particles: int) -> None:
    """Per sample, |∇U|² / ∇²U equals the autograd Hessian's trace formula, chunked or not,
    up to LJ55 (dim 162); a repeated sample has zero error."""
    system = LennardJonesCluster(n_particles=n_particles)
    g = torch.Generator().manual_seed(1)
    x = torch.as_tensor(cubic_lattice(n_particles, 3)) + 0.05 * torch.randn(
        (3, n_particles, 3), generator=g, dtype=torch.float64)
    z = system.from_cartesian(x)
    hessian = torch.autograd.functional.hessian(system.potential, z[1])
    grad = torch.func.grad(system.potential)(z[1])
    expected = float(grad.square().sum() / torch.trace(hessian))
    t, err = configurational_temperature(system.potential, z[1:2].expand(2, -1), n_blocks=2)
    assert t == pytest.approx(expected, rel=1e-10) and err == pytest.approx(0.0, abs=1e-12)
    whole = configurational_temperature(system.potential, z, n_blocks=3)
    chunked = configurational_temperature(system.potential, z, n_blocks=3, chunk_size=1)
    assert whole == pytest.approx(chunked, rel=1e-12)


def test_lj_potential_under_torch_func() -> None:
    """vmap(hessian(U)) works, and again on a second call (no tensor made inside a transform
    is cached), and equals the autograd Hessian."""
    system = LennardJonesCluster(n_particles=7, spatial_dim=2)
    z = system.from_cartesian(torch.as_tensor(cubic_lattice(7, 2)) + 0.05 * torch.randn(
        (3, 7, 2), generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    hessians = torch.func.vmap(torch.func.hessian(system.potential))
    first, second = hessians(z), hessians(z)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first[2], torch.autograd.functional.hessian(system.potential,
                                                                           z[2]))


def test_configurational_temperature_validation() -> None:
    def potential(y: torch.Tensor) -> torch.Tensor:
        return y.square().sum(-1)

    with pytest.raises(ValueError, match=r"x: shape \(5, 2\) is not allowed"):
        configurational_temperature(potential, np.zeros((5, 2)), n_blocks=20)
    with pytest.raises(ValueError, match=r"n_blocks: 1 is not allowed"):
        configurational_temperature(potential, np.zeros((5, 2)), n_blocks=1)
    with pytest.raises(ValueError, match=r"needs ⟨∇²U⟩ > 0"):
        configurational_temperature(lambda y: y.sum(-1), np.ones((40, 2)))
    with pytest.raises(ValueError, match=r"potential: must map"):
        configurational_temperature(lambda y: y.sum(), np.ones((40, 2)))


# The replica-exchange references: name -> (system config, lattice spacing of the start).
# DW4 starts from a square of side d0 = 4 (every pair near a minimum of its double well),
# LJ13 from a 13-site blob of the cubic lattice at spacing r_m; both slightly perturbed.
REFERENCES = {
    "dw4": ({"kind": "dw4"}, 4.0),
    "lj13_ordered": ({"kind": "lj", "convention": "ordered_pairs"}, 1.0),
    "lj13_unordered": ({"kind": "lj", "convention": "unordered_pairs"}, 1.0),
}
LADDER = [1.0, 1.5, 2.0]
N_CHAINS = 128


@cache
def _reference(name: str) -> McmcResult:
    """Replica exchange at kT = 1, 1.5, 2, 128 chains each: 4000 burn-in steps (the LJ13
    energy settles from the lattice start within ~2000), 4000 production steps, every 40th kept
    (100 frames per chain). The energy decorrelates only over ~650 steps in LJ13, but
    |∇U|² and ∇²U, local quantities, over ~40 (autocorrelation 0.02 at 40 steps, measured);
    the error bars do not rely on either, since the blocks are whole chains (:func:`_t_conf`).
    About 9 s per LJ13 system on one core."""
    config, spacing = REFERENCES[name]
    system = make_system(config)
    g = torch.Generator().manual_seed(11)
    lattice = torch.as_tensor(cubic_lattice(system.n_particles, system.spatial_dim, spacing))
    x0 = system.from_cartesian(lattice + 0.05 * torch.randn((N_CHAINS, *lattice.shape),
                                                            generator=g, dtype=torch.float64))
    return replica_exchange(system.potential, LADDER, x0, n_steps=8000, burn_in=4000,
                            n_chains=N_CHAINS, thin=40, step_size=0.05, seed=11)


def _t_conf(name: str, temperature: float) -> tuple[float, float]:
    """T_conf of one replica's samples, chain after chain (chain-major), in 32 blocks of 4
    whole chains: block means are independent whatever the correlation within a chain (chains
    never interact; replica exchange swaps only between temperatures of one chain index)."""
    system = make_system(REFERENCES[name][0])
    result = _reference(name)
    k = LADDER.index(temperature)
    return configurational_temperature(system.potential,
                                       result.samples[k].reshape(-1, system.dim), n_blocks=32)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_configurational_temperature_of_reference_is_one(name: str) -> None:
    """The kT = 1 replica's samples have T_conf = 1 within 4 sigma, sigma the block-averaged
    (delta-method) error of :func:`configurational_temperature`, and sigma < 0.05 so that the
    check means something. For LJ13 this holds in either pair convention with its own U: the
    convention changes the target, and the reference sampled that target."""
    result = _reference(name)
    assert 0.2 < result.acceptance[0] < 0.6
    t, err = _t_conf(name, 1.0)
    assert err < 0.05, (t, err)
    assert abs(t - 1.0) < 4.0 * err, (t, err)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_configurational_temperature_rejects_the_wrong_temperature(name: str) -> None:
    """Negative control: the kT = 1.5 replica's samples, checked against kT = 1, are rejected
    (T_conf − 1 beyond 4 sigma), and they agree with their own temperature 1.5 within 4 sigma."""
    t, err = _t_conf(name, 1.5)
    assert err < 0.05, (t, err)
    assert abs(t - 1.0) > 4.0 * err, (t, err)
    assert abs(t - 1.5) < 4.0 * err, (t, err)

