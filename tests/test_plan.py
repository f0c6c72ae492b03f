"""Plan expansion and content-hash job ids."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from typer.testing import CliRunner

from campaign.cli import app
from campaign.plan import make_plan
from campaign.spec import parse_spec
from tests.conftest import TINY_SPEC, write_spec


def _plan(data: dict):
    return make_plan(parse_spec(copy.deepcopy(data)))


def test_ids_are_stable_and_known() -> None:
    first = [job.job_id for job in _plan(TINY_SPEC).jobs]
    second = [job.job_id for job in _plan(TINY_SPEC).jobs]
    assert first == second
    # The id is sha256 of canonical JSON, so it is the same on every machine and Python. If this
    # changes, a default or the config layout changed, and every stored job will be redone.
    assert first == ["07e17abdec731013"]


def test_id_changes_with_any_setting_but_not_with_resources() -> None:
    base = _plan(TINY_SPEC).jobs[0].job_id
    for path, value in [("training.steps", 301), ("seed", 12), ("temperature", 1.0000001),
                        ("flow.hidden", 33), ("sampling.n_samples", 4001)]:
        data = copy.deepcopy(TINY_SPEC)
        node = data
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
        assert _plan(data).jobs[0].job_id != base, path
    moved = copy.deepcopy(TINY_SPEC)
    moved["resources"]["trainer"] = {"count": 8, "cpus": 4, "gpus": 0.5}
    moved["tracking"] = {"experiment": "elsewhere"}
    assert _plan(moved).jobs[0].job_id == base
    # An explicit default is the same job as an omitted one.
    explicit = copy.deepcopy(TINY_SPEC)
    explicit["training"]["final_learning_rate"] = None
    assert _plan(explicit).jobs[0].job_id == base


def test_grid_product_blocks_and_fixed_values() -> None:
    data = copy.deepcopy(TINY_SPEC)
    data["grid"] = [
        {"temperature": [1.0, 2.0], "training.objective": ["maximum_likelihood", "reverse_kl"]},
        {"system": {"kind": "dw4"}, "base": {"kind": "thermodynamic", "temperature": 1.5},
         "temperature": [1.0, 2.0]},
        {"temperature": 1.0},  # the same job as the first block's first point: runs once
    ]
    plan = _plan(data)
    assert len(plan.jobs) == 6
    kinds = [job.config.system.kind for job in plan.jobs]
    assert kinds.count("dw4") == 2
    assert len({job.job_id for job in plan.jobs}) == 6
    dw4 = [job for job in plan.jobs if job.config.system.kind == "dw4"][0]
    assert dw4.config.base.temperature == 1.5
    # a block's fixed component (here its base) is shown: it tells the blocks' jobs apart
    assert dw4.grid_values == {"base": {"kind": "thermodynamic", "temperature": 1.5},
                               "temperature": 1.0}
    assert dw4.label == "dw4 base=thermodynamic temperature=1.0"


def test_dry_run_json_prints_plan_and_starts_nothing(workdir: Path) -> None:
    import ray

    data = copy.deepcopy(TINY_SPEC)
    data["grid"] = {"temperature": [1.0, 2.0, 3.0]}
    path = write_spec(workdir, data)
    result = CliRunner().invoke(app, ["launch", str(path), "--dry-run", "--format", "json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["params"]["temperature"] for r in records] == [1.0, 2.0, 3.0]
    for record in records:
        assert set(record) >= {"job_id", "params", "resources"}
        assert record["resources"]["trainer"] == {"count": 2, "cpus": 0.5, "gpus": 0.0}
        assert record["params"]["training.objective"] == "maximum_likelihood"
    assert not ray.is_initialized()
    assert not (workdir / "mlflow.db").exists()


def test_dry_run_shows_each_jobs_asks_and_refuses_what_no_node_holds(workdir: Path) -> None:
    path = write_spec(workdir, TINY_SPEC)
    result = CliRunner().invoke(app, ["launch", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "      train     trainer           cpus=0.5 gpus=0" in result.stdout
    asks = json.loads(CliRunner().invoke(
        app, ["launch", str(path), "--dry-run", "--format", "json"]).stdout)[0]["asks"]
    assert asks["energy"] == {"role": "energy_evaluator", "cpus": 0.25, "gpus": 0.0,
                              "openmm_platform": None}
    too_big = copy.deepcopy(TINY_SPEC)
    too_big["resources"]["trainer"]["cpus"] = 1000
    result = CliRunner().invoke(app, ["launch", str(write_spec(workdir, too_big, "big.yaml")),
                                      "--dry-run"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: resources.trainer.cpus: 1000")


def test_gpu_openmm_platform_needs_gpu_actors(workdir: Path) -> None:
    import yaml

    data = yaml.safe_load((Path(__file__).parent.parent / "specs" / "ice.yaml").read_text())
    data["energy"]["platform"] = "CUDA"
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: resources.energy_evaluator.gpus: 0.0 is not allowed;"
                                    " energy.platform 'CUDA'")
    for role in ("energy_evaluator", "mcmc"):
        data["resources"][role]["gpus"] = 0.5
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 0, result.output
