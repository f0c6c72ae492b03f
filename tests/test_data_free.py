"""A data-free job (``reference.sampler: none``): no samples of the target, the flow trained
by reverse KL from the normalized Gaussian base, ΔF by LFEP compared with the double well's
exact -ln Z (quadrature), in process through the job's task graph."""

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
    outcome = pipeline.run_job(graph)
    metrics = outcome.metrics
    # Nothing that needs target samples is reported.
    assert "nll" not in metrics and "delta_f_lbar" not in metrics
    assert outcome.params["reference_method"].endswith("no samples (data-free)")
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
