"""Continuous normalizing flows and flow matching (issue: equivariant CNFs on DW4 / LJ13 / LJ55).

The conformance suite (tests/test_flow_conformance.py) covers the flow contract of every CNF
kind; here: the divergences against a brute-force Jacobian, E(n) × S_n equivariance of the
particle fields (and its absence for the MLP baseline), Hutchinson's estimator confined to
training, ODE failures, the couplings of flow matching and a flow-matching fit with a known
answer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzgen.flow_matching import COUPLINGS, FlowMatching, kabsch_rotations
from boltzgen.flows import build_flow
from boltzgen.flows.cnf import ODESolveError
from boltzgen.flows.divergence import DIVERGENCES
from boltzgen.layouts import ParticleLayout
from boltzgen.settings import JobSettings
from boltzgen.systems import make_system
from tests.flow_helpers import randomize

LJ5 = ParticleLayout(5, 3, com_free=True)
SMALL = {"hidden": 8, "n_layers": 2, "atol": 1e-9, "rtol": 1e-9}


def random_flow(kind: str, layout=LJ5, scale: float = 0.3, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return randomize(build_flow(layout, {"kind": kind, **SMALL, **extra}), scale, seed).eval()


def random_orthogonal(d: int, seed: int, reflect: bool) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    if (torch.linalg.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


@pytest.mark.parametrize("kind", ["egnn_cnf", "hollow_cnf", "mlp_cnf"])
def test_every_exact_divergence_equals_the_trace_of_the_jacobian(kind: str) -> None:
    flow = random_flow(kind)
    z = 1.3 * torch.randn(4, LJ5.dim, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    brute = torch.stack([torch.trace(torch.autograd.functional.jacobian(
        lambda p: flow.field(t, p[None])[0], point)) for point in z])
    methods = ["exact_per_dimension", "exact_vectorized"] + (
        ["analytic"] if kind == "hollow_cnf" else [])
    for method in methods:
        v, div = DIVERGENCES.get(method)(flow.field, t, z, False)
        torch.testing.assert_close(div, brute, rtol=0, atol=1e-11)
        torch.testing.assert_close(v, flow.field(t, z), rtol=0, atol=1e-12)
    assert brute.abs().min() > 1e-3  # a field whose divergence is not trivially zero


def moved(layout: ParticleLayout, z: torch.Tensor, rotation: torch.Tensor,
          permutation: torch.Tensor) -> torch.Tensor:
    """The configurations z with every particle rotated and the particles relabelled."""
    x = layout.to_cartesian(z)
    return layout.from_cartesian((x @ rotation.T)[:, permutation])


@pytest.mark.parametrize("kind", ["egnn_cnf", "hollow_cnf"])
@pytest.mark.parametrize("reflect", [False, True])
def test_equivariant_flows_commute_with_rotations_reflections_and_permutations(
        kind: str, reflect: bool) -> None:
    """T(g x) = g T(x) and log|det J_T(g x)| = log|det J_T(x)| for g a rotation (or a
    reflection) and a relabelling of the particles, so log q(g y) = log q(y): the prior is
    invariant under both."""
    flow = random_flow(kind)
    z = torch.randn(6, LJ5.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rotation = random_orthogonal(3, 5, reflect)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    y, log_det = flow(z)
    y_moved, log_det_moved = flow(moved(LJ5, z, rotation, permutation))
    torch.testing.assert_close(y_moved, moved(LJ5, y, rotation, permutation), rtol=0, atol=1e-7)
    torch.testing.assert_close(log_det_moved, log_det, rtol=0, atol=1e-7)
    assert (y - z).abs().max() > 1e-2  # the map is not the identity
    log_q = flow.log_prob(y.detach())
    log_q_moved = flow.log_prob(moved(LJ5, y.detach(), rotation, permutation))
    torch.testing.assert_close(log_q_moved, log_q, rtol=0, atol=1e-6)


def test_the_mlp_baseline_is_not_equivariant() -> None:
    """The negative control: the same check fails for the MLP field."""
    flow = random_flow("mlp_cnf", scale=0.3)
    z = torch.randn(6, LJ5.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rotation = random_orthogonal(3, 5, False)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    y, _ = flow(z)
    y_moved, _ = flow(moved(LJ5, z, rotation, permutation))
    assert (y_moved - moved(LJ5, y, rotation, permutation)).abs().max() > 1e-3


def test_hutchinson_is_for_training_only() -> None:
    """Refused as the divergence of reported likelihoods; as ``training_divergence`` it is
    used in training mode only (eval mode gives the exact log-density), and it is unbiased:
    the mean of 400 estimates is the exact divergence within 4 standard errors."""
    with pytest.raises(ValueError, match=r"flow\.divergence: 'hutchinson' is not allowed; "
                       "reported likelihoods need an exact divergence"):
        build_flow(LJ5, {"kind": "egnn_cnf", "divergence": "hutchinson"})
    exact = random_flow("egnn_cnf")
    noisy = random_flow("egnn_cnf", training_divergence="hutchinson")
    y = torch.randn(3, LJ5.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with exact.sampling_context(), noisy.sampling_context():
        assert torch.equal(noisy.log_prob(y), exact.log_prob(y))
    t = torch.tensor(0.5, dtype=torch.float64)
    z = y.repeat(400, 1)
    _, estimates = DIVERGENCES.get("hutchinson")(exact.field, t, z, False,
                                                 torch.Generator().manual_seed(4))
    _, true = DIVERGENCES.get("exact_per_dimension")(exact.field, t, y, False)
    estimates = estimates.reshape(400, 3)
    error = estimates.std(0) / math.sqrt(400)
    assert ((estimates.mean(0) - true).abs() <= 4 * error).all()


def test_a_failed_solve_names_its_cause() -> None:
    flow = random_flow("egnn_cnf")
    with torch.no_grad():
        flow.field.coordinate_range.fill_(float("nan"))
    with pytest.raises(ODESolveError, match=r"ODE solve failed \(dopri5"):
        flow(torch.zeros(2, LJ5.dim, dtype=torch.float64) + 0.3)


@pytest.mark.parametrize(("settings", "message"), [
    ({"atol": 0.0}, r"flow\.atol: 0\.0 is not allowed; must be > 0"),
    ({"rtol": -1e-4}, r"flow\.rtol: -0\.0001 is not allowed; must be > 0"),
    ({"solver": "rk45"}, r"flow\.solver: 'rk45' is not allowed; choose one of dopri5, rk4"),
    ({"divergence": "analytic"}, r"flow\.divergence: 'analytic' is not allowed; .*: "
                                 r"exact_per_dimension, exact_vectorized$"),
])
def test_bad_solver_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_flow(LJ5, {"kind": "egnn_cnf", **settings})


def test_fixed_step_solver_counts_its_evaluations() -> None:
    flow = random_flow("hollow_cnf", solver="rk4", n_steps=5)
    flow(torch.randn(4, LJ5.dim, dtype=torch.float64))
    assert flow.solve_statistics()["nfe"] == 20  # 4 stages x 5 steps


# -- flow matching ----------------------------------------------------------------------------


def test_kabsch_finds_a_known_rotation() -> None:
    source = torch.randn(7, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    source = source - source.mean(0)
    rotation = random_orthogonal(3, 8, reflect=False)
    found = kabsch_rotations(source, source @ rotation.T)
    torch.testing.assert_close(found, rotation, rtol=0, atol=1e-12)
    # A reflected target is matched by the best proper rotation, never by a reflection.
    mirrored = kabsch_rotations(source, source @ random_orthogonal(3, 8, reflect=True).T)
    assert torch.linalg.det(mirrored) == pytest.approx(1.0)


def test_couplings_shorten_the_pairs_and_keep_the_prior() -> None:
    """Mean |x0 − x1|² over the batch: OT < independent, equivariant OT < OT; the aligned
    prior samples are rotations and relabellings of the drawn ones (same norms: same prior
    density)."""
    layout = ParticleLayout(4, 2, com_free=True)
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(48, layout.dim, generator=gen, dtype=torch.float64)
    x1 = 2.0 * torch.randn(48, layout.dim, generator=gen, dtype=torch.float64)
    cost = {}
    for name in ("independent", "ot", "equivariant_ot"):
        a, b = COUPLINGS.get(name)().pair(x0, x1, layout)
        cost[name] = float(((a - b) ** 2).sum(-1).mean())
        assert torch.equal(torch.sort(b, 0).values, torch.sort(x1, 0).values)  # x1 reordered
        norms = torch.sort(a.norm(dim=-1)).values
        torch.testing.assert_close(norms, torch.sort(x0.norm(dim=-1)).values, rtol=0,
                                   atol=1e-12)
    assert cost["ot"] < cost["independent"] and cost["equivariant_ot"] < cost["ot"]


def test_flow_matching_fits_a_gaussian() -> None:
    """An MLP CNF trained by flow matching (OT coupling) on samples of N(μ, diag(σ²)) in 2-D
    reaches the true mean NLL of held-out samples: |NLL − H| within 0.05 nats plus 4 standard
    errors of the held-out mean (H = the exact entropy, computed on the same samples)."""
    from boltzgen.training import train_flow

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(8)
    mu, sigma = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor(
        [0.5, 1.5], dtype=torch.float64)
    data = mu + sigma * torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    test = mu + sigma * torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    flow = build_flow(2, {"kind": "mlp_cnf", "hidden": 32, "n_layers": 2, "atol": 1e-6,
                          "rtol": 1e-6})
    objective = FlowMatching("ot", 0.0)
    result = train_flow(flow, objective, 600, 128, 5e-3, u_a=lambda x: x, u_b=lambda x: x,
                        sample_a=None, data_b=data, seed=1)
    assert result.losses[-1] < result.losses[0]
    flow.eval()
    with flow.sampling_context():
        log_q = flow.log_prob(test)
    exact = torch.distributions.Normal(mu, sigma).log_prob(test).sum(-1)
    gap = -log_q.mean() - (-exact.mean())
    error = (exact - log_q).std() / math.sqrt(len(test))
    assert abs(float(gap)) <= 0.05 + 4 * float(error)
    stats = flow.solve_statistics()
    assert stats["nfe"] > 0 and stats["path_length"] > 0


def job(system: dict, flow: dict, training: dict) -> JobSettings:
    return JobSettings.of({"seed": 0, "temperature": 1.0, "system": system, "flow": flow,
                           "training": training})


@pytest.mark.parametrize(("system", "flow", "training", "message"), [
    ({"kind": "dw4"}, {"kind": "affine_coupling"}, {"objective": "flow_matching"},
     r"training\.objective: 'flow_matching' is not allowed; it regresses the velocity of a "
     r"continuous flow; flow 'affine_coupling' has none \(use one of egnn_cnf, hollow_cnf, "
     r"mlp_cnf\)"),
    ({"kind": "double_well"}, {"kind": "mlp_cnf"},
     {"objective": "flow_matching", "coupling": "equivariant_ot"},
     r"training\.coupling: 'equivariant_ot' is not allowed; it permutes and rotates particles"),
    ({"kind": "dw4"}, {"kind": "egnn_cnf"},
     {"objective": "maximum_likelihood", "coupling": "ot"},
     r"training\.coupling: 'ot' is not allowed; it pairs prior and data samples for flow "
     r"matching; leave it out for objective 'maximum_likelihood'"),
])
def test_flow_matching_settings_that_do_not_go_together_are_refused(
        system: dict, flow: dict, training: dict, message: str) -> None:
    settings = job(system, flow, training)
    complaints = [str(c) for c in settings.complaints(make_system(system))]
    assert complaints, "expected a complaint"
    assert any(__import__("re").search(message, c) for c in complaints), complaints


def test_an_unknown_coupling_is_refused() -> None:
    with pytest.raises(ValueError, match=r"is not a known coupling; choose one of independent, "
                       r"ot, equivariant_ot"):
        job({"kind": "dw4"}, {"kind": "egnn_cnf"},
            {"objective": "flow_matching", "coupling": "sinkhorn"})


def test_energy_w2_is_w2_not_its_square() -> None:
    """W2 between N(0, 1) and N(μ, 1) is |μ| (not μ²): with 20,000 samples each the
    estimate's standard deviation is about sqrt(2 / n) = 0.01, so 0.05 is 5 sigma; the
    same sample set gives 0 exactly and non-finite energies are left out."""
    from boltzgen.pipeline.distribution_metrics import energy_w2

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, 20000), rng.normal(3.0, 1.0, 20000)
    assert energy_w2(a, b) == pytest.approx(3.0, abs=0.05)
    assert energy_w2(a, a) == 0.0
    assert energy_w2(np.append(a, np.inf), a) == 0.0


def test_capped_energy_w2_reads_the_bulk_and_counts_the_clashes() -> None:
    """Two flows' energies, N(0, 1) as the data, one with 1 % of its samples at 1e10 kT
    (clashes): the plain W2 is about sqrt(0.01) * 1e10 = 1e9 kT; the capped one moves only
    the top 1 % of quantiles, from at least the data's 98th percentile (the clean flow's top
    quantiles, within noise) to the cap u_max, so by the triangle inequality it is at most
    W2_clean + sqrt(0.0101) (u_max - q_0.98) (about 0.2 kT); the clean flow's is sampling noise
    (sd about sqrt(2 / n) = 0.014; 0.1 is 7 sigma); the clash fraction is read back exactly."""
    from boltzgen.pipeline.distribution_metrics import energy_w2, energy_w2_capped

    rng = np.random.default_rng(1)
    data, clean = rng.normal(0.0, 1.0, 10000), rng.normal(0.0, 1.0, 10000)
    clashing = clean.copy()
    clashing[:100] = 1e10
    clashing[100] = np.nan  # a failed energy counts as above the cap too
    assert energy_w2(clashing, data) > 1e8
    w2_clean, above_clean = energy_w2_capped(clean, data)
    w2_clashing, above_clashing = energy_w2_capped(clashing, data)
    assert w2_clean < 0.1
    assert w2_clashing <= w2_clean + np.sqrt(101 / 10000) * (data.max() - np.quantile(data, 0.98))
    assert above_clashing == pytest.approx(101 / 10000 + above_clean, abs=1e-12)
    # a shifted flow is still told apart after capping
    assert energy_w2_capped(clean + 3.0, data)[0] > 1.0


def test_mcmc_reference_caps_its_held_out_set_and_reports_its_temperature() -> None:
    """``reference.max_holdout_samples`` keeps that many held-out samples (the rest of the
    held-out share stays out of training); the reference reports the configurational
    temperature of its target samples (about 1 here, loosely: a short chain)."""
    from boltzgen.pipeline.reference import run_reference

    job = {"seed": 3, "temperature": 1.0, "system": {"kind": "dw4"},
           "base": {"kind": "normal"},
           "reference": {"ladder_size": 2, "hot_temperature_factor": 2.0, "n_chains": 64,
                         "n_steps": 1500, "burn_in": 500, "thin": 10, "step_size": 0.3,
                         "holdout_fraction": 0.5}}
    full = run_reference(job)
    job["reference"]["max_holdout_samples"] = 7
    capped = run_reference(job)
    assert len(capped.target_test) == 7 and len(capped.target_test_potential) == 7
    total = capped.diagnostics["mcmc_target_decorrelated_samples"]
    assert len(capped.target_train) == total - round(0.5 * total)
    t = full.diagnostics["reference_configurational_temperature"]
    err = full.diagnostics["reference_configurational_temperature_err"]
    assert 0 < err < 0.1 and abs(t - 1.0) < 0.3


def test_enumerated_permutations_agree_with_the_hungarian_algorithm() -> None:
    """The small-n shortcut of equivariant OT finds the same optimal assignments."""
    from boltzgen import flow_matching

    gen = torch.Generator().manual_seed(12)
    cost = torch.rand(20, 5, 5, generator=gen, dtype=torch.float64)
    fast = flow_matching.best_permutations(cost)
    limit = flow_matching.ENUMERATED_PERMUTATIONS_UP_TO
    try:
        flow_matching.ENUMERATED_PERMUTATIONS_UP_TO = 0
        slow = flow_matching.best_permutations(cost)
    finally:
        flow_matching.ENUMERATED_PERMUTATIONS_UP_TO = limit
    assert torch.equal(fast, slow)
    assert sorted(fast[0].tolist()) == list(range(5))


def test_a_cnf_job_records_the_particle_metrics_with_their_conventions() -> None:
    """A whole DW4 job in process (MCMC reference, flow matching with equivariant OT, sampling
    with the exact divergence, estimation): every per-job metric the particle benchmarks ask
    for is recorded, finite and within its range, and the conventions are written beside
    them. Tiny and untrained: this checks the bookkeeping, not the quality."""
    from boltzgen.pipeline import job_graph, run_job

    settings = {"seed": 5, "temperature": 1.0, "system": {"kind": "dw4"},
                "base": {"kind": "normal", "scale": 1.0},
                "reference": {"ladder_size": 2, "hot_temperature_factor": 2.0, "n_chains": 32,
                              "n_steps": 600, "burn_in": 200, "thin": 10, "step_size": 0.3,
                              "holdout_fraction": 0.3, "max_holdout_samples": 40},
                "flow": {"kind": "egnn_cnf", "hidden": 8, "n_layers": 2, "solver": "rk4",
                         "n_steps": 4},
                "training": {"objective": "flow_matching", "coupling": "equivariant_ot",
                             "steps": 20, "batch_size": 16, "learning_rate": 0.002},
                "sampling": {"n_samples": 64}}
    result = run_job(job_graph(settings, "cnf-metrics", None))
    m = result.metrics
    assert m["n_samples"] == 64
    assert 1 / 64 - 1e-12 <= m["ess"] <= 1.0
    assert m["nfe"] == 16 and m["nfe_inverse"] == 16  # rk4: 4 stages x 4 steps
    for key in ("nll", "delta_f", "energy_w2", "energy_w2_capped", "distance_w1",
                "path_length", "path_length_inverse", "seconds_per_sample",
                "reference_configurational_temperature"):
        assert math.isfinite(m[key]), key
    assert 0.0 <= m["energy_above_reference_fraction"] <= 1.0
    assert 0.0 <= m["energy_w2_capped"] <= m["energy_w2"] + 1e-12
    assert m["path_length"] > 0 and m["seconds_per_sample"] > 0
    for key in ("nll_convention", "energy_w2_convention", "distance_w1_convention",
                "nfe_convention"):
        assert key in result.params, key
    assert "W2 (not squared), kT" in result.params["energy_w2_convention"]
