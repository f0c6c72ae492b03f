"""The internal-coordinate flow beyond the conformance suite: its layout requirement, inverse
from any orientation, the start, the normalisation from data (fit_to_data), invalid samples,
its own prior, and how the pipeline treats a flow that owns its prior (a normal base keeps it,
training fits it to the target samples once, checkpoints restore it, sampling scores with it).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from boltzgen.flows import InternalCoordinateFlow, build_flow, flow_kinds_for
from boltzgen.internal_coordinates import ZMatrix, log_volume_element
from boltzgen.layouts import Layout, MoleculeLayout, VectorLayout
from boltzgen.priors import GaussianPrior, InternalCoordinatePrior, prior_from_dict
from boltzgen.systems import SYSTEMS
from boltzgen.systems.base import System
from tests.flow_helpers import IC_SMALL, internal_coordinate_targets, randomize

LAYOUT = MoleculeLayout(8, ("C", "C", "N", "O", "H", "H", "H", "H"),
                        ((0, 1), (0, 2), (0, 3), (3, 4), (1, 5), (1, 6), (2, 7)))
ZMAT = ZMatrix.from_layout(LAYOUT)


def fitted_flow(seed: int = 0) -> InternalCoordinateFlow:
    torch.manual_seed(seed)
    flow = build_flow(LAYOUT, {"kind": "internal_coordinates", **IC_SMALL})
    randomize(flow, 0.25, seed)
    flow.fit_to_data(internal_coordinate_targets(LAYOUT, 64, seed=11))
    assert isinstance(flow, InternalCoordinateFlow)
    return flow


def rigidly_moved(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Every configuration (B, 3n) rotated by its own random proper rotation and translated."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(len(x), 3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q = q * torch.sign(torch.det(q))[:, None, None]
    shift = torch.randn(len(x), 1, 3, generator=gen, dtype=torch.float64)
    return (x.reshape(len(x), -1, 3) @ q.transpose(-1, -2) + shift).reshape(x.shape)


# -- building -------------------------------------------------------------------------------


def test_the_flow_needs_a_connected_bond_graph() -> None:
    assert "internal_coordinates" in flow_kinds_for(LAYOUT)
    for layout in (MoleculeLayout(3, ("O", "H", "H")),
                   MoleculeLayout(4, bonds=((0, 1), (2, 3))),
                   MoleculeLayout(2, bonds=((0, 1),))):
        assert "internal_coordinates" not in flow_kinds_for(layout)
        with pytest.raises(ValueError, match=r"^flow\.kind: 'internal_coordinates' needs a "
                           r"molecule of >= 3 atoms whose bonds connect them all \(its Z-matrix "
                           r"comes from the bond graph\), but this system's coordinates are a "
                           r"molecule of \d atoms in Cartesian coordinates; choose one of "
                           r"affine_coupling, spline_coupling, mlp_cnf$"):
            build_flow(layout, {"kind": "internal_coordinates"})
    with pytest.raises(ValueError, match=r"^layout: InternalCoordinateFlow needs a molecule"):
        InternalCoordinateFlow(VectorLayout(9))
    with pytest.raises(ValueError, match=r"^flow\.n_bins: 1 is not allowed"):
        build_flow(LAYOUT, {"kind": "internal_coordinates", "n_bins": 1})
    with pytest.raises(ValueError, match=r"^flow\.hidden: 0 is not allowed"):
        build_flow(LAYOUT, {"kind": "internal_coordinates", "hidden": 0})


def test_three_atoms_have_no_torsion_coupling() -> None:
    """Water-like: latent (r_b, r_c, θ_c) only; bond/angle couplings alone, still invertible."""
    layout = MoleculeLayout(3, ("O", "H", "H"), ((0, 1), (0, 2)))
    flow = randomize(build_flow(layout, {"kind": "internal_coordinates", **IC_SMALL}), 0.25)
    assert flow.latent_dim == 3 and all(not c.torsions for c in flow.couplings)
    z = flow.prior.sample(8, torch.Generator().manual_seed(0))
    x, log_det = flow(z)
    z_back, log_det_inv = flow.inverse(x)
    assert (z_back - z).abs().max() <= 1e-10 and (log_det + log_det_inv).abs().max() <= 1e-10


# -- the map ----------------------------------------------------------------------------------


def test_inverse_takes_any_position_and_orientation() -> None:
    flow = fitted_flow()
    target = internal_coordinate_targets(LAYOUT, 16, seed=3)
    moved = rigidly_moved(target, seed=4)
    z, log_det = flow.inverse(target)
    z_moved, log_det_moved = flow.inverse(moved)
    assert (z_moved - z).abs().max() <= 1e-10 and (log_det_moved - log_det).abs().max() <= 1e-10
    canonical = ZMAT.canonical_frame(moved.reshape(16, 8, 3)).reshape(16, 24)
    assert (flow(z_moved)[0] - canonical).abs().max() <= 1e-10
    # log q is a density of the conformation: the same in every frame
    torch.testing.assert_close(flow.log_prob(moved), flow.log_prob(target), rtol=0, atol=1e-10)


def test_at_the_start_bonds_and_angles_are_denormalised_and_torsions_concentrated() -> None:
    """Zero-initialised conditioners: x = ICs⁻¹(μ + σ u, M_{−ω}(τ')) with the fitted Möbius
    map of each torsion (ω = ρ e^{iμ_τ}), log|det| = Σ ln σ + Σ ln M' + Σ 2 ln r + Σ ln sin θ."""
    from boltzgen.flows.circle import circle_mobius
    from boltzgen.internal_coordinates import wrap_angle

    flow = build_flow(LAYOUT, {"kind": "internal_coordinates", **IC_SMALL})
    flow.fit_to_data(internal_coordinate_targets(LAYOUT, 64, seed=11))
    assert bool((flow.torsion_concentration > 0.05).all())  # a map that is not the identity
    z = flow.prior.sample(32, torch.Generator().manual_seed(1))
    x, log_det = flow(z)
    bonds, angles, torsions = ZMAT.to_internal(x.reshape(32, 8, 3))
    u = z[:, :13]
    torch.testing.assert_close(bonds, flow.bond_mean + flow.bond_std * u[:, :7], rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(angles, flow.angle_mean + flow.angle_std * u[:, 7:], rtol=0,
                               atol=1e-12)
    rho, mu = flow.torsion_concentration, flow.torsion_mean
    omega = torch.stack([rho * torch.cos(mu), rho * torch.sin(mu)], -1)
    concentrated, log_mobius = circle_mobius(z[:, 13:], omega, inverse=True)
    assert wrap_angle(torsions - concentrated).abs().max() <= 1e-12
    want = (torch.log(flow.bond_std).sum() + torch.log(flow.angle_std).sum()
            + log_mobius.sum(-1) + log_volume_element(bonds, angles))
    torch.testing.assert_close(log_det, want, rtol=0, atol=1e-10)


def test_fit_to_data_sets_means_and_floored_deviations_kept_in_the_state() -> None:
    torch.manual_seed(0)
    flow = build_flow(LAYOUT, {"kind": "internal_coordinates", **IC_SMALL})
    assert torch.equal(flow.bond_mean, torch.full((7,), 0.12, dtype=torch.float64))
    assert torch.equal(flow.angle_std, torch.full((6,), 0.1, dtype=torch.float64))
    data = rigidly_moved(internal_coordinate_targets(LAYOUT, 200, seed=5), seed=6)
    flow.fit_to_data(data)
    bonds, angles, _ = ZMAT.to_internal(data.reshape(200, 8, 3))
    torch.testing.assert_close(flow.bond_mean, bonds.mean(0))
    torch.testing.assert_close(flow.bond_std, bonds.std(0, correction=0))
    torch.testing.assert_close(flow.angle_mean, angles.mean(0))
    torch.testing.assert_close(flow.angle_std, angles.std(0, correction=0))
    # Torsions: circular mean μ_τ and ρ = exp(−σ_c), σ_c = sqrt(−2 ln R) the circular standard
    # deviation (R the mean resultant length): a wrapped Cauchy as wide as the data.
    torsions = ZMAT.to_internal(data.reshape(200, 8, 3))[2]
    resultant = torch.polar(torch.ones_like(torsions), torsions).mean(0)
    torch.testing.assert_close(flow.torsion_mean, resultant.angle())
    torch.testing.assert_close(flow.torsion_concentration,
                               torch.exp(-torch.sqrt(-2.0 * torch.log(resultant.abs()))))
    state = flow.state_dict()
    for name in ("bond_mean", "bond_std", "angle_mean", "angle_std", "torsion_mean",
                 "torsion_concentration"):
        assert torch.equal(state[name], getattr(flow, name))
    flow.fit_to_data(data[:1])  # one sample: σ = 0, floored
    assert torch.equal(flow.bond_std, torch.full((7,), 1e-4, dtype=torch.float64))
    assert torch.equal(flow.angle_std, torch.full((6,), 1e-3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"y: shape \(0, 24\) is not allowed; need \(M, 24\)"):
        flow.fit_to_data(data[:0])
    with pytest.raises(ValueError, match=r"y: shape \(3, 21\) is not allowed"):
        flow.fit_to_data(data[:3, :21])


def test_invalid_samples_get_a_nan_log_det_and_are_flagged() -> None:
    """A latent whose bond comes out <= 0 (or angle outside (0, π)) has no density: log|det|
    and log q are NaN (weight zero, counted), the others are untouched."""
    flow = fitted_flow()
    z = flow.prior.sample(4, torch.Generator().manual_seed(2))
    z[1, 0] = -1e4  # far below any spline's bound: r = μ − 1e4 σ < 0
    z[2, 7] = 1e4  # an angle far above π
    assert flow.valid(z).tolist() == [True, False, False, True]
    x, log_det = flow(z)
    assert bool(torch.isfinite(x).all())
    assert torch.isnan(log_det).tolist() == [False, True, True, False]
    log_q = flow.prior.log_prob(z) - log_det
    torch.testing.assert_close(flow.log_prob(x[[0, 3]]), log_q[[0, 3]], rtol=0, atol=1e-9)
    (log_det[[0, 3]].sum()).backward()  # finite gradients despite the invalid rows
    assert all(bool(torch.isfinite(p.grad).all()) for p in flow.parameters()
               if p.grad is not None)


# -- the prior --------------------------------------------------------------------------------


def test_the_prior_is_normal_times_uniform_torsions_and_registered() -> None:
    prior = InternalCoordinatePrior(LAYOUT)
    assert prior.dim == 18 and prior.to_dict() == {"kind": "internal_coordinates"}
    assert isinstance(prior_from_dict(LAYOUT, prior.to_dict()), InternalCoordinatePrior)
    z = prior.sample(4096, torch.Generator().manual_seed(0))
    torsions = z[:, 13:]
    assert bool(((torsions >= -math.pi) & (torsions < math.pi)).all())
    assert abs(float(torsions.mean())) < 0.1 and abs(float(z[:, :13].std()) - 1) < 0.02
    zero = torch.zeros(18, dtype=torch.float64)
    want = -6.5 * math.log(2 * math.pi) - 5 * math.log(2 * math.pi)
    assert abs(float(prior.log_prob(zero)) - want) < 1e-12
    outside = zero.clone()
    outside[-1] = math.pi
    assert float(prior.log_prob(outside)) == -math.inf
    with pytest.raises(ValueError, match=r"prior\.kind: 'internal_coordinates' needs a molecule "
                       r"of >= 3 atoms; this layout is a vector in R\^6"):
        prior_from_dict(VectorLayout(6), {"kind": "internal_coordinates"})


# -- the pipeline -----------------------------------------------------------------------------

BOND_LENGTHS = torch.tensor([0.153, 0.147, 0.143, 0.096, 0.109, 0.109, 0.101],
                            dtype=torch.float64)  # in placement order of ZMAT's bonds


class ToyMolecule(System):
    """LAYOUT with harmonic bonds (reduced units, k = 2 · 10⁴ kT/nm²), for pipeline tests."""

    kind = "toy_molecule"
    estimand_note = "test molecule; Z over the conformations (rigid motions quotiented)"

    def __init__(self) -> None:
        self.dim = LAYOUT.dim

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        self._check_coordinates(x)
        bonds, _, _ = ZMAT.to_internal(x.reshape(*x.shape[:-1], 8, 3))
        return 1e4 * ((bonds - BOND_LENGTHS.to(x)) ** 2).sum(-1)

    def layout(self) -> Layout:
        return LAYOUT


@pytest.fixture
def toy_system() -> Iterator[None]:
    SYSTEMS.register("toy_molecule")(ToyMolecule)
    yield
    SYSTEMS.unregister("toy_molecule")


def job(**sections: Any) -> dict[str, Any]:
    return {"seed": 3, "temperature": 1.0, "system": {"kind": "toy_molecule"},
            "base": {"kind": "normal"}, "flow": {"kind": "internal_coordinates", **IC_SMALL},
            "training": {"objective": "maximum_likelihood", "steps": 4, "batch_size": 16,
                         "learning_rate": 1e-3},
            "sampling": {"n_samples": 32, "energy_batch_size": 32}, **sections}


def reference(m: int = 120) -> Any:
    from boltzgen.pipeline.reference import ReferenceData

    gen = torch.Generator().manual_seed(8)
    bonds = BOND_LENGTHS + 0.005 * torch.randn(m, 7, generator=gen, dtype=torch.float64)
    angles = 1.9 + 0.05 * torch.randn(m, 6, generator=gen, dtype=torch.float64)
    torsions = torch.remainder(2.0 + 0.3 * torch.randn(m, 5, generator=gen,
                                                       dtype=torch.float64) + math.pi,
                               2 * math.pi) - math.pi
    x = rigidly_moved(ZMAT.to_cartesian(bonds, angles, torsions).reshape(m, 24), seed=9).numpy()
    return ReferenceData(target_train=x[:100], target_test=x[100:], target_test_potential=np.zeros(
        m - 100), base_train=None, base_test=None, base_test_potential=None,
        reference_delta_f=None, reference_delta_f_err=None, method="synthetic", ladder=[1.0])


def test_a_normal_base_keeps_the_flows_own_prior(toy_system: None) -> None:
    from boltzgen.pipeline.problem import Problem
    from boltzgen.settings import FlowSettings, JobSettings

    problem = Problem.from_settings(job())
    flow = problem.build_flow(FlowSettings(kind="internal_coordinates", **IC_SMALL))
    assert isinstance(flow.prior, InternalCoordinatePrior) and flow.prior is not \
        problem.base.prior
    assert problem.base.free_energy == 0.0
    coupling = problem.build_flow(FlowSettings(kind="affine_coupling", n_layers=2))
    assert coupling.prior is problem.base.prior  # every other flow: the base's density
    system = ToyMolecule()
    thermodynamic = job(base={"kind": "thermodynamic", "temperature": 2.0})
    complaints = [str(c) for c in JobSettings.of(thermodynamic).complaints(system)]
    assert "base.kind: 'thermodynamic' is not allowed; flow 'internal_coordinates' has a prior " \
        "of its own, which is the base; use 'normal'" in complaints
    complaints = [str(c) for c in JobSettings.of(job(base={"kind": "normal", "scale": 2.0})
                                                 ).complaints(system)]
    assert complaints == ["base.scale: 2.0 is not allowed; flow 'internal_coordinates' has a "
                          "normalized prior of its own, which is the base; leave it at 1"]
    assert not list(JobSettings.of(job()).complaints(system))


def test_training_fits_the_flow_to_the_target_samples_once(toy_system: None, tmp_path,
                                                           monkeypatch) -> None:
    """Maximum likelihood: fit_to_data on the training target samples before the first step
    (μ = their means), not again when training resumes from its progress file, not for a
    job that trains on no target data; the checkpoint restores the flow, its μ, σ and prior,
    which a base's prior passed to load_flow does not replace; sampling scores with it."""
    from boltzgen.pipeline import load_flow
    from boltzgen.pipeline.flow_training import train
    from boltzgen.pipeline.sampling import sample

    calls: list[int] = []
    original = InternalCoordinateFlow.fit_to_data

    def counted(self: InternalCoordinateFlow, y: torch.Tensor) -> None:
        calls.append(len(y))
        original(self, y)

    monkeypatch.setattr(InternalCoordinateFlow, "fit_to_data", counted)
    ref = reference()
    trained = train(job(), ref, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert calls == [100] and len(trained.losses) == 4
    assert all(math.isfinite(loss) for loss in trained.losses)
    state = torch.load(io.BytesIO(trained.checkpoint), weights_only=True)
    assert state["prior"] == {"kind": "internal_coordinates"}
    bonds, angles, _ = ZMAT.to_internal(torch.from_numpy(ref.target_train).reshape(100, 8, 3))
    torch.testing.assert_close(state["state_dict"]["bond_mean"], bonds.mean(0))
    torch.testing.assert_close(state["state_dict"]["angle_std"], angles.std(0, correction=0))
    assert (state["state_dict"]["bond_mean"] - 0.12).abs().max() > 0.01  # moved from default
    # a relaunch resumes from the progress file: no second fit
    again = train(job(), ref, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert calls == [100] and again.resumed_from_step > 0
    # reverse KL without a warm start trains on no target data: no fit
    train(job(training={"objective": "reverse_kl", "steps": 2, "batch_size": 8,
                        "learning_rate": 1e-3}), ref)
    assert calls == [100]
    flow = load_flow(trained.checkpoint, prior=GaussianPrior(LAYOUT))
    assert isinstance(flow.prior, InternalCoordinatePrior) and flow.latent_dim == 18
    torch.testing.assert_close(flow.bond_mean, bonds.mean(0))
    samples = sample(job(), trained, ref)  # x ~ A: the flow's own prior, 18 numbers
    assert samples.mapped.shape == (32, 24) and samples.pulled_back.shape == (20, 18)
    assert samples.u_a.shape == (32,) and np.all(np.isfinite(samples.u_a))
    assert np.all(np.isfinite(samples.logdet)) and np.all(np.isfinite(samples.logdet_inverse))
    u_back = -flow.prior.log_prob(torch.from_numpy(samples.pulled_back)).numpy()
    np.testing.assert_allclose(samples.u_a_pulled_back, u_back, rtol=0, atol=1e-12)
