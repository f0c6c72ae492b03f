"""Peptide observables (boltzgen.peptides.observables) and figures (boltzgen.peptides.plots):
dihedrals against mdtraj, the φ-state free energy and its errors against analytic values."""

from __future__ import annotations

import math
from pathlib import Path

import mdtraj
import numpy as np
import pytest
from openmm import unit
from scipy.integrate import quad
from scipy.spatial.transform import Rotation

from boltzgen.peptides.observables import (
    backbone_dihedrals,
    delta_f_phi,
    md_state_free_energy,
    mdtraj_backbone_dihedrals,
    ramachandran_free_energy,
    weighted_state_free_energy,
)
from boltzgen.peptides.plots import (
    energy_histogram_plot,
    flow_ramachandran_plot,
    ramachandran_plot,
)


@pytest.fixture(scope="module")
def dipeptide() -> tuple[np.ndarray, np.ndarray, mdtraj.Topology]:
    """openmmtools' alanine dipeptide: 20 frames, the structure and noisy, rotated and shifted
    copies of it (noise 0.03 nm moves φ and ψ by tens of degrees)."""
    from openmmtools.testsystems import AlanineDipeptideVacuum

    test_system = AlanineDipeptideVacuum()
    xyz = np.asarray(test_system.positions.value_in_unit(unit.nanometer))
    rng = np.random.default_rng(0)
    frames = [xyz] + [xyz + rng.normal(0.0, 0.03, xyz.shape) for _ in range(19)]
    rotations = Rotation.random(20, random_state=1).as_matrix()
    moved = np.stack([f @ r.T + rng.normal(0.0, 2.0, 3) for f, r in zip(frames, rotations,
                                                                         strict=True)])
    return np.stack(frames), moved, mdtraj.Topology.from_openmm(test_system.topology)


def _angle_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.angle(np.exp(1j * (a - b))))


def test_dihedrals_agree_with_mdtraj_and_ignore_rigid_motions(dipeptide) -> None:
    frames, moved, topology = dipeptide
    trajectory = mdtraj.Trajectory(frames, topology)
    (phi_atoms,), (psi_atoms,) = mdtraj.compute_phi(trajectory)[0], \
        mdtraj.compute_psi(trajectory)[0]
    phi, psi = backbone_dihedrals(frames, phi_atoms, psi_atoms)
    phi_md, psi_md = mdtraj_backbone_dihedrals(frames, topology)
    assert phi.shape == psi.shape == (20,)
    assert np.ptp(phi) > 0.5 and np.ptp(psi) > 0.5  # the noise spreads the angles
    # mdtraj computes in float32: ~1e-6 rad.
    assert _angle_gap(phi, phi_md).max() < 1e-4 and _angle_gap(psi, psi_md).max() < 1e-4
    phi_moved, psi_moved = backbone_dihedrals(moved, phi_atoms, psi_atoms)
    assert _angle_gap(phi, phi_moved).max() < 1e-9 and _angle_gap(psi, psi_moved).max() < 1e-9
    assert np.all((phi > -np.pi) & (phi <= np.pi))


def test_dihedral_sign_and_the_trans_end_of_the_range() -> None:
    """+60° for a right-handed turn (IUPAC), and the trans dihedral is +π, never −π."""
    c = math.cos(math.pi / 3)
    s = math.sin(math.pi / 3)
    gauche = np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [c, s, 1.0]]])
    trans = np.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, -1.0, 0.0]]])
    (theta,), _ = backbone_dihedrals(gauche, [0, 1, 2, 3], [0, 1, 2, 3])
    assert theta == pytest.approx(math.pi / 3)
    assert backbone_dihedrals(trans, [0, 1, 2, 3], [0, 1, 2, 3])[0][0] == math.pi
    assert backbone_dihedrals(trans[:, ::-1] * [1, -1, 1], [0, 1, 2, 3], [0, 1, 2, 3])[0][0] \
        == math.pi


def test_mdtraj_dihedrals_need_one_phi_and_one_psi() -> None:
    topology = mdtraj.Topology()
    residue = topology.add_residue("UNK", topology.add_chain())
    for _ in range(4):
        topology.add_atom("C", mdtraj.element.carbon, residue)
    with pytest.raises(ValueError, match=r"topology: 0 φ and 0 ψ dihedrals is not allowed"):
        mdtraj_backbone_dihedrals(np.zeros((2, 4, 3)), topology)


def test_transitions_are_counted_exactly() -> None:
    phi = np.array([-1.0, -1.0, 1.0, 1.0, -1.0, 2.0, 3.0, -0.5, -0.5, 0.0])
    result = md_state_free_energy(phi, n_bootstrap=10, seed=0)
    # states 0 0 1 1 0 1 1 0 0 0 (φ = 0 is state 0): four changes; P(φ > 0) = 0.4.
    assert result.n_transitions == 4 and result.n_frames == 10
    assert result.p_positive == pytest.approx(0.4)
    assert result.delta_f_kt == pytest.approx(-math.log(0.4 / 0.6))
    assert math.isnan(result.error_kt)  # 10 frames hold fewer than 10 blocks of 3 ⌈g⌉ frames


def test_a_state_never_visited_gives_an_infinite_free_energy_and_no_error() -> None:
    down = md_state_free_energy(-np.ones(100), n_bootstrap=10)
    up = md_state_free_energy(np.full(100, 2.0), n_bootstrap=10)
    assert down.delta_f_kt == math.inf and up.delta_f_kt == -math.inf
    assert math.isnan(down.error_kt) and math.isnan(up.error_kt)
    assert down.n_transitions == 0 and down.block_length == 0


def test_independent_frames_give_the_delta_method_error() -> None:
    """iid Bernoulli(p) states: ΔF = −ln(p / (1 − p)) within 4 bootstrap errors, and the
    bootstrap error within 15 % of the delta-method error sqrt(1 / (N p̂ (1 − p̂))) (the
    bootstrap's own scatter with 400 replicas is 1 / sqrt(2 · 400) = 3.5 %)."""
    n, p = 20_000, 0.3
    rng = np.random.default_rng(11)
    phi = np.where(rng.random(n) < p, 1.2, -1.5)
    result = md_state_free_energy(phi, n_bootstrap=400, seed=3)
    assert abs(result.delta_f_kt + math.log(p / (1 - p))) < 4.0 * result.error_kt
    analytic = math.sqrt(1.0 / (n * result.p_positive * (1.0 - result.p_positive)))
    assert result.error_kt == pytest.approx(analytic, rel=0.15)
    assert result.statistical_inefficiency == pytest.approx(1.0, abs=0.1)


def test_correlated_two_state_chain_gets_the_error_of_its_correlation_time() -> None:
    """A two-state Markov chain, P(0 -> 1) = a, P(1 -> 0) = b per frame: p = a / (a + b) and
    the indicator's autocorrelation is λ^t with λ = 1 − a − b, so g = 1 + 2 Σ λ^t =
    (1 + λ) / (1 − λ) and, by the delta method (dΔF/dp = −1 / (p (1 − p))), the error of ΔF is
    sqrt(g / (N p (1 − p))). Blocks of b frames keep the fraction
    1 − 2λ (1 − λ^b) / (b (1 − λ²)) of the variance of the mean, so the bootstrap error is
    expected at sqrt of that times the analytic one (0.91 here). Tolerance ±0.12 on that
    ratio: 3 times the ~0.04 scatter of the bootstrap (400 replicas, 3.5 %) and of the run's
    own variance estimate (~1700 blocks, ~2 %). The naive iid error is sqrt(g) ≈ 9 times
    smaller."""
    a, b, n = 0.01, 0.015, 400_000
    p, lam = a / (a + b), 1.0 - a - b
    g = (1.0 + lam) / (1.0 - lam)
    rng = np.random.default_rng(5)
    state, pieces, total = int(rng.random() < p), [], 0
    while total < n:  # dwell times are geometric with the leaving probability
        length = int(rng.geometric(b if state else a))
        pieces.append(np.full(length, state))
        total, state = total + length, 1 - state
    phi = np.where(np.concatenate(pieces)[:n] == 1, 1.0, -2.0)
    result = md_state_free_energy(phi, n_bootstrap=400, seed=9)
    analytic = math.sqrt(g / (n * p * (1 - p)))
    naive = math.sqrt(1.0 / (n * p * (1 - p)))
    block = result.block_length
    kept = 1.0 - 2.0 * lam * (1.0 - lam ** block) / (block * (1.0 - lam ** 2))
    assert result.statistical_inefficiency == pytest.approx(g, rel=0.15)
    assert result.error_kt > 5.0 * naive
    assert result.error_kt / analytic == pytest.approx(math.sqrt(kept), abs=0.12)
    assert abs(result.delta_f_kt + math.log(p / (1 - p))) < 4.0 * result.error_kt
    assert result.n_transitions == np.count_nonzero(np.diff(phi > 0))


def test_weighted_free_energy_of_a_von_mises_target() -> None:
    """φ ~ uniform on (−π, π], log w = κ cos(φ − μ) reweights to the von Mises density, whose
    P(φ > 0) is a quadrature; a tenth of the samples dropped (−inf) changes nothing but N.
    Estimate within 4 bootstrap errors; the bootstrap error within 15 % of the delta-method
    error of a ratio of means: with X = w [φ>0], Y = w [φ≤0] (w normalized to mean 1),
    Var(ΔF) ≈ (Var X / E X² + Var Y / E Y² − 2 Cov(X, Y) / (E X E Y)) / N."""
    kappa, mu, n = 2.0, 0.5, 20_000
    rng = np.random.default_rng(2)
    phi = rng.uniform(-np.pi, np.pi, n)
    log_w = kappa * np.cos(phi - mu) + 3.0
    log_w[rng.random(n) < 0.1] = -np.inf
    def density(x: float) -> float:
        return math.exp(kappa * math.cos(x - mu))

    p = quad(density, 0.0, math.pi)[0] / quad(density, -math.pi, math.pi)[0]
    result = weighted_state_free_energy(phi, log_w, n_bootstrap=400, seed=4)
    assert result.n_transitions is None and result.n_frames == n
    assert result.p_positive == pytest.approx(p, abs=4.0 * result.error_kt * p * (1 - p))
    assert abs(result.delta_f_kt + math.log(p / (1 - p))) < 4.0 * result.error_kt
    w = np.exp(log_w - 3.0)
    x, y = w * (phi > 0), w * (phi <= 0)
    cov = np.cov(x, y)
    delta = math.sqrt((cov[0, 0] / x.mean() ** 2 + cov[1, 1] / y.mean() ** 2
                       - 2.0 * cov[0, 1] / (x.mean() * y.mean())) / n)
    assert result.error_kt == pytest.approx(delta, rel=0.15)
    assert 0.0 < result.effective_samples < 0.9 * n


def test_equal_weights_reproduce_the_frame_count_estimate() -> None:
    phi = np.random.default_rng(0).uniform(-np.pi, np.pi, 500)
    weighted = weighted_state_free_energy(phi, np.zeros(500), n_bootstrap=50)
    assert weighted.delta_f_kt == pytest.approx(md_state_free_energy(phi, 50).delta_f_kt)
    assert weighted.delta_f_kt == pytest.approx(delta_f_phi(phi))
    none = weighted_state_free_energy(phi, np.where(phi > 0, -np.inf, 0.0), n_bootstrap=50)
    assert none.delta_f_kt == math.inf and math.isnan(none.error_kt)


def test_ramachandran_free_energy() -> None:
    rng = np.random.default_rng(1)
    phi, psi = rng.uniform(-np.pi, np.pi, 4000), rng.normal(0.0, 0.5, 4000)
    free_energy, edges = ramachandran_free_energy(phi, psi, bins=30)
    assert free_energy.shape == (30, 30) and edges.shape == (31,)
    assert free_energy.min() == 0.0 and np.isinf(free_energy).any()  # ψ never reaches ±π
    # Weight 2 on a sample is the sample counted twice.
    twice, _ = ramachandran_free_energy(np.concatenate([phi, phi[:100]]),
                                        np.concatenate([psi, psi[:100]]), bins=30)
    weights = np.ones(4000)
    weights[:100] = 2.0
    weighted, _ = ramachandran_free_energy(phi, psi, weights, bins=30)
    np.testing.assert_allclose(weighted, twice)
    with pytest.raises(ValueError, match="weights: values in"):
        ramachandran_free_energy(phi, psi, -weights)


def test_plots_write_png_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    phi, psi = rng.uniform(-np.pi, np.pi, 2000), rng.uniform(-np.pi, np.pi, 2000)
    log_w = rng.normal(0.0, 1.0, 2000)
    log_w[:10] = -np.inf
    energy = rng.normal(-100.0, 10.0, 2000)
    paths = [
        ramachandran_plot(tmp_path / "md.png", phi, psi, "MD, 300 K"),
        flow_ramachandran_plot(tmp_path / "flow.png", (phi, psi), (psi, phi), log_w,
                               title="alanine dipeptide"),
        energy_histogram_plot(tmp_path / "energy.png", energy, energy + 5.0, log_w),
    ]
    for path in paths:
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
