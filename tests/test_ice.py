"""Ice XI in TIP4P-Ew: crystal, flow coordinates, OpenMM energies and forces, cached MD."""

from __future__ import annotations

import logging

import mdtraj
import numpy as np
import pytest
import torch

from boltzgen.estimators import mbar_ladder
from boltzgen.md import MDProtocol, cached_md
from boltzgen.openmm_bridge import OpenMMEvaluator
from boltzgen.pipeline import SymmetryImages
from boltzgen.systems.ice import IceXI

logging.getLogger("genice_core").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def ice() -> IceXI:
    return IceXI(molecules=16)


def _perturbed(ice: IceXI, seed: int, scale: float = 0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    layout = ice.rigid_layout()
    positions, q = layout.split(torch.as_tensor(ice.ideal_coordinates())[None])
    positions = ice.box.wrap(positions + scale * torch.randn(positions.shape, generator=g,
                                                             dtype=torch.float64))
    positions[:, 0] = 0.0
    q = q + 2 * scale * torch.randn(q.shape, generator=g, dtype=torch.float64)
    return layout.join(positions, q / torch.linalg.vector_norm(q, dim=-1, keepdim=True))


def test_crystal_matches_the_paper_setup(ice: IceXI) -> None:
    # docs/architecture.md: N16 box 0.89846 × 0.77808 × 0.73358 nm, cutoff = 0.73358 / 2 − 1e-5.
    np.testing.assert_allclose(ice.box.edges, (0.89846, 0.77808, 0.73358), atol=1e-5)
    assert ice.cutoff_nm == pytest.approx(0.36678, abs=1e-5)
    assert ice.dim == 16 * 7 and ice.rigid_layout().pinned_positions == (0,)
    system = ice.openmm_system()
    assert system.getNumParticles() == 64
    assert sum(system.isVirtualSite(i) for i in range(64)) == 16
    nonbonded = next(f for f in system.getForces() if type(f).__name__ == "NonbondedForce")
    assert nonbonded.getNonbondedMethod() == nonbonded.PME
    assert nonbonded.getUseDispersionCorrection() and nonbonded.getUseSwitchingFunction()
    assert nonbonded.getEwaldErrorTolerance() == pytest.approx(1e-4)
    assert nonbonded.getSwitchingDistance().value_in_unit(
        nonbonded.getCutoffDistance().unit) == pytest.approx(0.9 * ice.cutoff_nm)


def test_flow_coordinates_round_trip_through_cartesian(ice: IceXI) -> None:
    x = _perturbed(ice, 0)
    sites = ice.to_cartesian(x).numpy()
    np.testing.assert_allclose(ice.from_cartesian(sites), x.numpy(), atol=1e-12)
    # A rigid translation with every atom wrapped on its own gives the same flow coordinates:
    # the gauge (molecule 0 at the origin) and whole-molecule wrapping undo both.
    edges = np.array(ice.box.edges)
    shifted = np.remainder(sites + np.array([0.31, -0.77, 1.9]), edges)
    back = ice.from_cartesian(shifted)
    positions, q = ice.rigid_layout().split(torch.as_tensor(back - x.numpy()))
    delta = positions.numpy()
    assert np.abs(delta - edges * np.round(delta / edges)).max() < 1e-12
    np.testing.assert_allclose(torch.as_tensor(back)[..., 48:].numpy(),
                               x[..., 48:].numpy(), atol=1e-12)


def test_energy_gradient_from_forces_matches_finite_differences(ice: IceXI) -> None:
    """Directional derivative of U along a path on the manifold (positions and normalized
    quaternions), double-precision Reference platform; central differences with h = 1e-4 have
    a truncation error ~h² |U'''| (about 1e-5 relative here), so 1e-4 relative is the bound."""
    import openmm

    ice._evaluator = OpenMMEvaluator(openmm.XmlSerializer.serialize(ice.openmm_system()),
                                     platform="Reference")
    try:
        x = _perturbed(ice, 1).requires_grad_(True)
        energy = ice.potential(x)
        energy.sum().backward()
        g = torch.Generator().manual_seed(2)
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        layout = ice.rigid_layout()

        def moved(h: float) -> torch.Tensor:
            p, q = layout.split(x.detach() + h * v)
            return layout.join(p, q / torch.linalg.vector_norm(q, dim=-1, keepdim=True))

        h = 1e-4
        numeric = (float(ice.potential(moved(h))) - float(ice.potential(moved(-h)))) / (2 * h)
        p_v, q_v = layout.split(v)
        _, q_x = layout.split(x.detach())
        tangent = layout.join(p_v, q_v - (q_v * q_x).sum(-1, keepdim=True) * q_x)
        analytic = float((x.grad * tangent).sum())
        assert analytic == pytest.approx(numeric, rel=1e-4)
        # The M sites are not degrees of freedom: their forces are already on O, H, H.
        _, forces = ice._evaluator.energies_and_forces(ice.to_cartesian(x.detach()).numpy())
        assert np.all(forces.reshape(16, 4, 3)[:, 3] == 0.0)
    finally:
        ice._evaluator = None


def test_non_finite_coordinates_give_nan_energy(ice: IceXI) -> None:
    x = _perturbed(ice, 3).repeat(2, 1)
    x[1, 5] = float("nan")
    energy = ice.potential(x)
    assert np.isfinite(float(energy[0])) and np.isnan(float(energy[1]))


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"molecules": 20}, ["molecules: 20", "16 n³"]),
    ({"cutoff": 0.5}, ["cutoff: 0.5", "at most 0.36678"]),
    ({"lattice": "Ih"}, ["lattice: 'Ih'", "XI"]),
])
def test_bad_parameters_are_refused(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        IceXI(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_md_is_cached_whole_and_readable_by_mdtraj(ice: IceXI, tmp_path) -> None:
    protocol = MDProtocol(temperature=100.0, equilibration_ps=0.2, production_ps=1.0,
                          frame_interval_ps=0.1, seed=3)
    first = cached_md(ice, protocol, tmp_path)
    assert not first.reused and first.flow_coordinates.shape == (10, ice.dim)
    assert np.all(np.isfinite(first.potential_kj_per_mol))
    second = cached_md(ice, protocol, tmp_path)
    assert second.reused
    np.testing.assert_array_equal(second.flow_coordinates, first.flow_coordinates)
    trajectory = mdtraj.load(f"{first.path}/frames.dcd", top=f"{first.path}/topology.pdb")
    assert trajectory.n_frames == 10 and trajectory.n_atoms == 64
    # The DCD (float32) and the float64 flow coordinates describe the same frames.
    np.testing.assert_allclose(ice.from_cartesian(trajectory.xyz.astype(np.float64)),
                               first.flow_coordinates, atol=2e-5)


def test_md_that_blows_up_fails_and_leaves_no_cache_entry(ice: IceXI, tmp_path) -> None:
    protocol = MDProtocol(temperature=250.0, equilibration_ps=5.0, production_ps=1.0,
                          frame_interval_ps=0.5, timestep_fs=40.0, seed=4)
    with pytest.raises(RuntimeError, match="blew up"):
        cached_md(ice, protocol, tmp_path)
    assert [p.name for p in (tmp_path / "md").iterdir() if not p.name.endswith(".lock")] == []


def test_mbar_far_apart_states() -> None:
    """Free energies hundreds of kT apart (as for ice between temperatures): U = x²/2 + c with
    c = −600 sampled exactly at T_k; f_k − f_0 = −½ ln(T_k/T_0) + c (1/T_k − 1/T_0). pymbar's
    zero start stops at f = 0 here; the answer must be within 4 bootstrap sigma."""
    temps = [1.0, 1.5, 2.5]
    rng = np.random.default_rng(7)
    energies = [0.5 * rng.normal(scale=np.sqrt(t), size=2000) ** 2 - 600.0 for t in temps]
    df, err = mbar_ladder(energies, temps, n_bootstraps=20, seed=1)
    t = np.array(temps)
    exact = -0.5 * np.log(t / t[0]) - 600.0 * (1 / t - 1 / t[0])
    assert np.all(np.abs(df - exact)[1:] < 4 * err[1:]), (df, exact, err)


def test_pooled_energy_gradient_equals_the_local_autograd_one(ice: IceXI) -> None:
    """Training through BatchEnergy (U and ∇U from an energy function, as the EnergyEvaluator
    pool returns them) gives the same values and gradients as autograd through the system's
    own OpenMM potential. Both come from OpenMM's CPU platform, whose forces are single
    precision summed in a thread-dependent order (the two Contexts use different thread counts):
    float32 round-off over ~10² terms bounds the difference by ~1e-5 relative."""
    from boltzgen.pipeline import BatchEnergy, make_energy_function

    config = {"system": {"kind": "ice_xi", "molecules": 16},
              "energy": {"backend": "openmm", "platform": "CPU"}}
    x = _perturbed(ice, 4).repeat(3, 1)
    x[1:] = torch.cat([_perturbed(ice, 5), _perturbed(ice, 6)])
    weights = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    local = x.clone().requires_grad_(True)
    (ice.potential(local) * weights).sum().backward()
    pooled = x.clone().requires_grad_(True)
    u = BatchEnergy.apply(pooled, make_energy_function(config))
    (u * weights).sum().backward()
    np.testing.assert_allclose(u.detach().numpy(), ice.potential(x).detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(pooled.grad.numpy(), local.grad.numpy(), rtol=1e-5, atol=1e-3)


def test_mbar_refuses_a_ladder_without_overlap() -> None:
    """Neighbouring states whose energy ranges are disjoint (N128 ice from 100 K to 250 K in
    one step) are refused at once with what to change, instead of a solver that runs on."""
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="do not overlap.*ladder_size"):
        mbar_ladder([rng.normal(-7600, 10, 50), rng.normal(-7000, 20, 50)], [100.0, 250.0],
                    boltzmann_constant=0.0083144626, n_bootstraps=2)


def test_interleaved_holdout_alternates_blocks_and_keeps_a_gap() -> None:
    """holdout_blocks: blocks alternate through the run, held-out frames are every ceil(g)-th
    and none lies within ceil(g) frames of a training frame; one block is the old time split."""
    from types import SimpleNamespace

    from boltzgen.mcmc import decorrelated
    from boltzgen.md import held_out_blocks
    from boltzgen.pipeline.reference import _time_split

    assert held_out_blocks(10, 0.6) == [False, True, False, True, True, False, True, False,
                                        True, True]
    rng = np.random.default_rng(5)
    u = np.empty(1000)
    u[0] = 0.0
    for i in range(1, len(u)):  # AR(1), correlation time ~ 5 frames
        u[i] = 0.8 * u[i - 1] + rng.normal()
    x = np.arange(len(u), dtype=np.float64)[:, None]  # the frame index as the coordinate
    run = SimpleNamespace(flow_coordinates=x, potential_kj_per_mol=u)
    stride = int(np.ceil(decorrelated(x[None], u[None])[2]))
    assert stride > 1
    train_x, test_x, train_u, test_u, every = _time_split(run, 0.6, blocks=10)
    train, test = train_x[:, 0].astype(int), test_x[:, 0].astype(int)
    np.testing.assert_array_equal(train_u, u[train])
    np.testing.assert_array_equal(test_u, u[test])
    assert len(train) == 400 and set(train // 100) == {0, 2, 5, 7}
    assert set(test // 100) == {1, 3, 4, 6, 8, 9}
    assert np.abs(test[:, None] - train[None, :]).min() >= stride
    assert set(np.diff(test)) >= {stride}
    # Every held-out frame, for averages over correlated frames: the held-out blocks whole,
    # less the ceil(g) frames at each end that touches a training block; the decorrelated
    # test frames are every stride-th of them; one segment label per held-out stretch.
    frames = every.frames[:, 0].astype(int)
    np.testing.assert_array_equal(every.potential, u[frames])
    assert set(frames // 100) == {1, 3, 4, 6, 8, 9}
    np.testing.assert_array_equal(every.frames[every.decorrelated], test_x)
    assert np.abs(frames[:, None] - train[None, :]).min() >= stride
    assert len(frames) == 600 - 7 * stride  # blocks 1, 3-4, 6, 8-9: seven ends touch training
    assert every.statistical_inefficiency == pytest.approx(decorrelated(x[None], u[None])[2])
    assert every.block_frames == 3 * stride
    for label in np.unique(every.segment):  # one contiguous stretch of consecutive frames
        assert set(np.diff(frames[every.segment == label])) == {1}
    old_train, old_test, _, _, old_every = _time_split(run, 0.6, blocks=1)
    np.testing.assert_array_equal(old_train[:, 0], np.arange(400))
    assert old_test[:, 0].min() >= 400
    np.testing.assert_array_equal(old_every.frames[:, 0], np.arange(400, 1000))
    np.testing.assert_array_equal(old_every.frames[old_every.decorrelated], old_test)
    assert set(old_every.segment) == {0}


def _same_configuration(ice: IceXI, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest per-row gap between flow coordinates: positions modulo the box, quaternions up to
    sign (q and -q are the same orientation)."""
    layout = ice.rigid_layout()
    pa, qa = layout.split(torch.as_tensor(a))
    pb, qb = layout.split(torch.as_tensor(b))
    edges = np.array(ice.box.edges)
    delta = (pa - pb).numpy()
    position_gap = np.abs(delta - edges * np.round(delta / edges)).max(axis=(1, 2))
    orientation_gap = (1.0 - np.abs((qa * qb).sum(-1).numpy())).max(axis=1)
    return np.maximum(position_gap, orientation_gap)


def test_space_group_images_keep_the_crystal_its_energy_and_form_a_group(ice: IceXI) -> None:
    """The 8 operations of the N16 crystal (point group 222 times two translations) map the
    ideal crystal onto itself within GenIce's three-decimal rounding, keep U (the PME grid is
    not translation invariant to round-off: about 0.01 kJ/mol was measured, 0.05 kJ/mol =
    0.024 kT at 250 K is allowed), and are closed under composition."""
    ops = ice.crystal_symmetries
    assert len(ops) == 8 and max(op.max_mismatch_nm for op in ops) < 0.003
    ideal = ice.ideal_coordinates()[None]
    assert _same_configuration(ice, ice.symmetry_images(ideal), ideal).max() < 0.003
    x = torch.cat([_perturbed(ice, 1), _perturbed(ice, 2)]).numpy()
    images = ice.symmetry_images(x)
    assert images.shape == (16, ice.dim)
    assert _same_configuration(ice, images[:2], x).max() < 1e-12  # the identity comes first
    # The others move each molecule's displacement (about 0.01 nm) to another molecule.
    assert _same_configuration(ice, images[2:], np.tile(x, (7, 1))).min() > 0.01
    u = ice.potential(torch.as_tensor(images)).numpy().reshape(8, 2)
    assert np.abs(u - u[0]).max() < 0.05
    # Closure: every image of an image is one of the 8 images (same frame).
    twice = ice.symmetry_images(images).reshape(8, 8, 2, ice.dim)
    for frame in range(2):
        for row in twice[:, :, frame].reshape(64, ice.dim):
            gaps = _same_configuration(ice, np.repeat(row[None], 8, 0), images[frame::2])
            assert gaps.min() < 1e-9
    with pytest.raises(ValueError, match="x: shape"):
        ice.symmetry_images(x[:, :5])
    # One operation per row, and training's lazily indexed set of all images, agree with it.
    chosen = ice.symmetry_images(x, np.array([3, 0]))
    assert _same_configuration(ice, chosen, images[[6, 1]]).max() < 1e-12
    lazy = SymmetryImages(ice, torch.as_tensor(x))
    assert lazy.shape == (16, ice.dim) and len(lazy) == 16
    rows = torch.tensor([15, 0, 7, 8])
    assert _same_configuration(ice, lazy[rows].numpy(), images[rows.numpy()]).max() < 1e-12
    with pytest.raises(ValueError, match=r"operations: .* need \(2,\) ints in \[0, 8\)"):
        ice.symmetry_images(x, np.array([8, 0]))


def test_pair_histograms_give_mdtraj_rdf_and_honest_bootstrap_errors(ice: IceXI) -> None:
    """Equal weights reproduce mdtraj.compute_rdf; the bootstrap error of a weighted g(r)
    matches the spread of g over independent sample sets."""
    from boltzgen.observables import PairHistograms

    x = torch.cat([_perturbed(ice, seed, scale=0.02) for seed in range(6)]).numpy()
    hist = ice.pair_histograms(x)
    topology = ice.mdtraj_topology()
    xyz = ice.openmm_positions(ice._as_samples(x))
    traj = mdtraj.Trajectory(xyz, topology, unitcell_lengths=np.tile(ice.box.edges, (6, 1)),
                             unitcell_angles=np.full((6, 3), 90.0))
    for pair, (a, b) in {"O-O": ("O", "O"), "O-H": ("O", "H")}.items():
        pairs = [(i.index, j.index) for i in topology.atoms for j in topology.atoms
                 if i.name == a and j.name.rstrip("0123456789") == b
                 and i.residue.index != j.residue.index and (a != b or i.index < j.index)]
        r, g = mdtraj.compute_rdf(traj, np.array(pairs), r_range=(0, min(ice.box.edges) / 2),
                                  n_bins=60)
        np.testing.assert_allclose(hist[pair].r_nm, r, rtol=1e-12)
        # mdtraj divides by the box volume it stores in float32 (relative error ~1e-7)
        np.testing.assert_allclose(hist[pair].g(), g, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="weights"):
        hist["O-O"].g(np.full(5, 1.0))

    # Frames with a latent z: counts ~ Poisson(λ (1 + 0.3 z)), log w = 0.5 z + N(0, 0.3²)
    # (weights that prefer some frames, light tails). The SD of g over R = 300 independent
    # sets of F = 200 frames has relative standard error 1/sqrt(2(R − 1)) = 0.041; the mean
    # bootstrap error must lie within 4 of those (0.84–1.16) of it, in every occupied shell
    # on average and in the worst shell within 6 (allowing for the largest of 8 shells).
    rng = np.random.default_rng(7)
    rate = np.array([0.5, 2.0, 8.0, 3.0, 1.0, 6.0, 4.0, 0.8])
    estimates, errors = [], []
    for _ in range(300):
        z = rng.normal(size=200)
        counts = rng.poisson(rate * (1.0 + 0.3 * np.clip(z, -3, 3))[:, None]).astype(float)
        w = np.exp(0.5 * z + 0.3 * rng.normal(size=200))
        sets = PairHistograms(r_nm=np.arange(8.0), counts=counts, ideal=np.full(8, 2.0))
        estimates.append(sets.g(w))
        replicas = sets.g_replicas(w, n_bootstraps=200, seed=int(rng.integers(1 << 30)))
        errors.append(replicas.std(axis=0, ddof=1))
    ratio = np.mean(errors, axis=0) / np.std(estimates, axis=0, ddof=1)
    assert 0.84 < ratio.mean() < 1.16, ratio
    assert np.all(np.abs(ratio - 1.0) < 6 * 0.041), ratio


def test_block_bootstrap_of_g_holds_the_spread_of_correlated_frames() -> None:
    """Frames correlated in time: a latent AR(1) z (ρ = 0.8, statistical inefficiency
    g = (1 + ρ)/(1 − ρ) = 9) in 6 stretches of 100 frames, counts and weights driven by z as in
    the test above. Over R = 300 independent sets, the SD of the weighted g has relative
    standard error 0.041. Blocks of 3 ceil(g) = 27 frames keep 84 % of an AR(1) variance of the
    mean (σ ratio 0.92), so the mean block-bootstrap error must lie within 4 standard errors of
    0.92–1 of the true SD, averaged over shells: 0.76–1.16. The ordinary bootstrap, which takes
    the frames as independent, understates it: its ratio must fall at least 0.1 below the
    block bootstrap's (it is ~0.73 here, 0.60 in the most correlated shell)."""
    from boltzgen.observables import PairHistograms

    rng = np.random.default_rng(3)
    rate = np.array([0.5, 2.0, 8.0, 3.0, 1.0, 6.0, 4.0, 0.8])
    segments = np.repeat(np.arange(6), 100)
    rho = 0.8
    block = 3 * int(np.ceil((1 + rho) / (1 - rho)))
    estimates, independent, blocked = [], [], []
    for _ in range(300):
        z = np.empty((6, 100))
        z[:, 0] = rng.normal(size=6)
        for i in range(1, 100):
            z[:, i] = rho * z[:, i - 1] + np.sqrt(1 - rho**2) * rng.normal(size=6)
        z = z.ravel()
        counts = rng.poisson(rate * (1.0 + 0.3 * np.clip(z, -3, 3))[:, None]).astype(float)
        w = np.exp(0.5 * z + 0.3 * rng.normal(size=600))
        sets = PairHistograms(r_nm=np.arange(8.0), counts=counts, ideal=np.full(8, 2.0))
        estimates.append(sets.g(w))
        seed = int(rng.integers(1 << 30))
        independent.append(sets.g_replicas(w, 200, seed).std(axis=0, ddof=1))
        blocked.append(sets.g_replicas(w, 200, seed, segments, block).std(axis=0, ddof=1))
    spread = np.std(estimates, axis=0, ddof=1)
    ratio_blocked = (np.mean(blocked, axis=0) / spread).mean()
    ratio_independent = (np.mean(independent, axis=0) / spread).mean()
    assert 0.76 < ratio_blocked < 1.16, ratio_blocked
    assert ratio_independent < ratio_blocked - 0.1, (ratio_independent, ratio_blocked)
    with pytest.raises(ValueError, match="segments"):  # a label split in two stretches
        sets.g_replicas(w, 10, 0, np.r_[np.zeros(300), np.ones(200), np.zeros(100)], 5)
    with pytest.raises(ValueError, match="block_frames"):
        sets.g_replicas(w, 10, 0, segments, 0)


def test_overlay_statistics_flag_a_difference_and_pass_noise_at_the_stated_rate() -> None:
    """Two independent sets of 200 frames from one distribution: max_z exceeds max_z_noise95
    in a fraction of 300 trials that must lie within 4 binomial standard errors of 5 %
    (sqrt(0.05 · 0.95 / 300) = 0.013, so 0–10 %). One shell's rate raised by 30 % in the
    second set: flagged in nearly every trial."""
    from boltzgen.observables import PairHistograms, overlay_statistics

    rng = np.random.default_rng(11)
    rate = np.array([0.5, 2.0, 8.0, 3.0, 1.0, 6.0, 4.0, 0.8])
    shifted = rate * np.where(np.arange(8) == 2, 1.3, 1.0)

    def frames(rates: np.ndarray) -> PairHistograms:
        z = rng.normal(size=200)
        counts = rng.poisson(rates * (1.0 + 0.3 * np.clip(z, -3, 3))[:, None]).astype(float)
        return PairHistograms(r_nm=np.arange(8.0), counts=counts, ideal=np.full(8, 2.0))

    def overlay(a: PairHistograms, w: np.ndarray, b: PairHistograms, seed: int) -> dict:
        # 200 replicas (the pipeline uses 2000): the rate is a property of the method.
        return overlay_statistics(a.g(w), a.g_replicas(w, 200, seed), b.g(),
                                  b.g_replicas(None, 200, seed + 1))

    same, different = 0, 0
    for trial in range(300):
        a, b = frames(rate), frames(rate)
        w = np.exp(0.3 * rng.normal(size=200))
        stats = overlay(a, w, b, trial)
        assert stats["shells"] == 8 and 1.5 < stats["max_z_noise95"] < 4.0
        same += stats["max_z"] > stats["max_z_noise95"]
        stats = overlay(a, w, frames(shifted), trial)
        different += stats["max_z"] > stats["max_z_noise95"]
    assert 0.0 <= same / 300 <= 0.10, same
    assert different / 300 > 0.9, different
