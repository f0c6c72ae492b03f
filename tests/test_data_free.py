"""A data-free job (``reference.sampler: none``): no samples of the target for training, the
flow trained by reverse KL (or adaptive tempering) from the normalized Gaussian base (or the
coarse-grained model's own prior), ΔF by LFEP compared with the double well's exact -ln Z
(quadrature), in process through the job's task graph. The double well's exact sampler gives
held-out samples for the evaluation only."""

from __future__ import annotations

import copy
import math
from pathlib import Path

from typer.testing import CliRunner

from boltzgen import pipeline
from campaign.cli import app
from campaign.plan import make_plan
from campaign.spec import parse_spec
from tests.conftest import TINY_SPEC, write_spec


def _data_free_spec() -> dict:
    data = copy.deepcopy(TINY_SPEC)
    data["reference"] = {"sampler": "none"}
    data["training"] = {"objective": "reverse_kl", "steps": 300, "batch_size": 256,
                        "learning_rate": 0.003}
    return data


def test_data_free_job_estimates_the_exact_free_energy() -> None:
    job = make_plan(parse_spec(_data_free_spec())).jobs[0]
    graph = pipeline.job_graph(job.config_dict, job.job_id, work_dir=None)
    assert not any(task.key.startswith("md-") for task in graph.tasks)
    # Training waits for no reference: the exact samples drawn beside are for the evaluation.
    (train,) = [task for task in graph.tasks if task.stage == "train"]
    assert train.inputs == {}
    outcome = pipeline.run_job(graph)
    metrics = outcome.metrics
    # Target samples reach the evaluation only (NLL, LBAR): training had none.
    assert "nll" in metrics and "delta_f_lbar" in metrics
    assert outcome.params["reference_method"].endswith(
        "no training samples (data-free); held-out samples by the system's exact sampler for "
        "evaluation only")
    # LFEP's delta-method error bar (kT); 4 sigma, plus the O(1/N) bias bound of an
    # importance-sampling log-mean (variance of the weights / 2N, which the ESS bounds).
    ess, n = metrics["ess"], metrics["n_samples"]
    bias = (1 / ess - 1) / (2 * n)
    gap = abs(metrics["delta_f"] - metrics["reference_delta_f"])
    assert math.isfinite(metrics["delta_f_err"]) and ess > 0.1, metrics
    assert gap < 4 * metrics["delta_f_err"] + bias, (gap, metrics["delta_f_err"], bias)


def test_data_free_job_refuses_an_objective_that_trains_on_data(workdir: Path) -> None:
    for training, word in [({"objective": "maximum_likelihood"}, "maximum_likelihood"),
                           ({"objective": "reverse_kl", "warm_start_steps": 10},
                            "warm_start_steps")]:
        data = {**_data_free_spec(), "training": training}
        result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
        assert result.exit_code == 2
        (line,) = [line for line in result.stderr.splitlines() if line.strip()]
        assert line.startswith("error: reference.sampler: ") and word in line, line
    data = {**_data_free_spec(), "base": {"kind": "thermodynamic", "temperature": 2.0}}
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 2 and "draws its training batches from the base" in result.stderr


def test_tempered_coarse_grained_job_records_its_schedule_and_estimates_the_free_energy(
) -> None:
    """The coarse-grained latent model trained by adaptive tempering from beta0 = 0.01: the
    schedule reaches beta = 1 and is recorded (series per accepted step, a plot, the beta
    reached); ΔF within 4 sigma (+ the O(1/N) bias bound) of the exact value; the double well's
    two modes reweighted within 4 sigma of their exact weights."""
    data = _data_free_spec()
    data["base"] = {"kind": "normal", "scale": 1.0}
    data["flow"] = {"kind": "coarse_grained", "n_layers": 2, "hidden": 32}
    data["training"] = {"objective": "adaptive_tempering", "steps": 2000, "batch_size": 256,
                        "learning_rate": 0.003,
                        "tempering": {"beta0": 0.01, "delta": 0.2, "steps_per_level": 60,
                                      "final_steps": 200, "check_samples": 1024}}
    job = make_plan(parse_spec(data)).jobs[0]
    outcome = pipeline.run_job(pipeline.job_graph(job.config_dict, job.job_id, work_dir=None))
    metrics, series = outcome.metrics, outcome.series
    assert metrics["tempering_beta_reached"] == 1.0
    levels = int(metrics["tempering_levels"])
    assert levels >= 2 and len(series["tempering_beta"]) == levels
    assert series["tempering_beta"][-1] == 1.0
    assert all(value <= 0.2 for value in series["tempering_kl_increase_nats"])
    assert outcome.blobs["plots/tempering_schedule.png"].startswith(b"\x89PNG")
    # steps: every level's 60 (the last cut at the step that reached 1), then 200 at beta = 1
    assert metrics["train_steps_run"] == series["tempering_at_step"][-1] + 1 + 200
    ess, n = metrics["ess"], metrics["n_samples"]
    bias = (1 / ess - 1) / (2 * n)
    gap = abs(metrics["delta_f"] - metrics["reference_delta_f"])
    assert ess > 0.5 and gap < 4 * metrics["delta_f_err"] + bias, (gap, metrics)
    assert metrics["mode_weight_error_reweighted"] < 4 * metrics["mode_weight_error_noise"] / (
        ess ** 0.5), metrics
    assert metrics["energy_evaluations_train"] == (
        256 * metrics["train_steps_run"] + 1024 * levels)


def test_bad_tempering_and_coarse_grained_settings_are_refused(workdir: Path) -> None:
    """One line naming the field, the value and what is allowed; exit code 2."""
    good = _data_free_spec()
    good["base"] = {"kind": "normal", "scale": 1.0}
    good["flow"] = {"kind": "coarse_grained"}
    good["training"] = {"objective": "adaptive_tempering", "steps": 100,
                        "tempering": {"beta0": 0.01, "steps_per_level": 10}}
    assert CliRunner().invoke(app, ["validate", str(write_spec(workdir, good))]).exit_code == 0
    cases = [
        (("training", "tempering", "beta0", 0), "training.tempering.beta0: 0 is not allowed; "
         "must be a number in (0, 1]"),
        (("training", "tempering", "beta0", 1.5), "training.tempering.beta0: 1.5 is not "
         "allowed; must be a number in (0, 1]"),
        (("training", "tempering", "delta", 0), "training.tempering.delta: 0 is not allowed; "
         "must be a finite number > 0"),
        (("training", "tempering", "delta", -0.1), "training.tempering.delta: -0.1"),
        (("training", "tempering", "shrink", 1.0), "training.tempering.shrink: 1.0 is not "
         "allowed; must be a number strictly between 0 and 1"),
        (("training", "tempering", "shrink", 0), "training.tempering.shrink: 0"),
        (("training", "tempering", "steps_per_level", 500),
         "training.tempering.steps_per_level: 500 is not allowed; must be at most "
         "training.steps (100)"),
        (("flow", "slow_dim", 2), "flow.slow_dim: 2 is not allowed; the system declares 1 slow "
         "variable(s), so 1 .. 1"),
        (("system", "kind", "dw4"), "flow.kind: 'coarse_grained' needs a system that declares "
         "slow variables"),
        (("flow", "fast_linear", True), "flow.fast_linear: True is not allowed for a vector; "
         "its linear map W already mixes the fast variables"),
        (("training", "forward_kl_weight", 0), "training.forward_kl_weight: 0 is not allowed; "
         "must be a finite number > 0"),
        (("training", "forward_kl_weight", -1.0), "training.forward_kl_weight: -1.0"),
    ]
    for (section, *path, value), message in cases:
        data = copy.deepcopy(good)
        target = data[section]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
        assert result.exit_code == 2, (message, result.output)
        (line,) = [line for line in result.stderr.splitlines() if line.strip()]
        assert line.startswith(f"error: {message}"), line
    data = copy.deepcopy(good)
    data["training"] = {"objective": "reverse_kl", "tempering": {"beta0": 0.1}}
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 2 and "training.tempering: 'set' is not allowed" in result.stderr
    data = copy.deepcopy(TINY_SPEC)
    data["training"] = {"objective": "maximum_likelihood", "forward_kl_weight": 10.0}
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 2 and (
        "error: training.forward_kl_weight: 10.0 is not allowed; it weights the reweighted "
        "forward KL of reverse-KL training; leave it out for objective 'maximum_likelihood'"
        in result.stderr), result.output
