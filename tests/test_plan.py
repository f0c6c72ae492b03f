"""Plan expansion and content-hash job ids."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from typer.testing import CliRunner

from campaign.cli import app
from campaign.plan import content_hash, make_plan
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
        {"temperature": 3.0, "training.steps": 7},
    ]
    plan = _plan(data)
    assert len(plan.jobs) == 7
    kinds = [job.config.system.kind for job in plan.jobs]
    assert kinds.count("dw4") == 2
    assert len({job.job_id for job in plan.jobs}) == 7
    # a block's fixed value of a path that other blocks vary is shown (compare's column for it
    # is filled); a path no block varies is not
    assert plan.jobs[-1].grid_values == {"temperature": 3.0}
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
    for role in ("energy_evaluator", "reference"):
        data["resources"][role]["gpus"] = 0.5
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 0, result.output


def _spec_file(name: str) -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).parent.parent / "specs" / name).read_text())


def test_top_level_settings_that_the_grid_replaces_are_checked(workdir: Path) -> None:
    # specs/ice-paper.yaml: every grid block names its own system, so no job uses the top-level
    # one; an unknown kind there is refused all the same.
    data = _spec_file("ice-paper.yaml")
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 0, result.output
    data["system"] = {"kind": "nonsense"}
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: system.kind: 'nonsense' is not a known system; "
                                     "choose one of double_well, dw4, tetrahedron_field, ice_xi, "
                                     "peptide, lj, gaussian_mixture")


def test_top_level_needs_to_be_valid_only_with_what_the_grid_adds() -> None:
    # No target temperature and a thermodynamic base without its temperature: the grid gives both.
    incomplete = copy.deepcopy(TINY_SPEC)
    del incomplete["temperature"]
    incomplete["base"] = {"kind": "thermodynamic"}
    incomplete["grid"] = {"temperature": [1.0, 2.0], "base.temperature": [1.5]}
    assert len(_plan(incomplete).jobs) == 2
    # A base, reference and flow that suit only the rigid-body system every block gives, beside a
    # top-level system (valid by itself) that no job uses.
    rigid = copy.deepcopy(TINY_SPEC)
    rigid.update(base={"kind": "uniform"}, reference={"sampler": "exact"},
                 flow={"kind": "rigid_body", "n_blocks": 1, "channels": 8},
                 grid={"system": [{"kind": "tetrahedron_field"}], "temperature": [300.0]})
    assert [job.config.system.kind for job in _plan(rigid).jobs] == ["tetrahedron_field"]
    # A cutoff that the default 16 molecules' box cannot hold, used only with 128 molecules.
    ice = {"name": "ice", "system": {"kind": "ice_xi", "cutoff": 0.5}, "temperature": 100.0,
           "base": {"kind": "thermodynamic", "temperature": 250.0},
           "reference": {"sampler": "md", "ladder_size": 3},
           "flow": {"kind": "rigid_body", "n_blocks": 1, "channels": 8},
           "energy": {"backend": "openmm"}, "grid": {"system.molecules": [128]}}
    assert [job.molecules for job in _plan(ice).jobs] == [128]
    # A section left at its defaults is no setting of the spec: the tetrahedron spec has no
    # top-level flow (the default affine_coupling does not suit its system); its blocks do.
    assert len(_plan(_spec_file("tetrahedron.yaml")).jobs) == 6


def test_grid_is_counted_before_it_is_expanded(workdir: Path) -> None:
    import time

    from campaign.plan import count_jobs

    huge = copy.deepcopy(TINY_SPEC)  # 10 values on each of 7 axes: 10^7 points
    huge["grid"] = {path: [base * (i + 1) for i in range(10)] for path, base in [
        ("temperature", 0.5), ("training.learning_rate", 0.001), ("training.steps", 10),
        ("training.batch_size", 16), ("sampling.n_samples", 100),
        ("sampling.energy_batch_size", 10), ("reference.n_chains", 8)]}
    assert count_jobs(parse_spec(copy.deepcopy(huge))) == 10**7
    path = write_spec(workdir, huge)
    for command in ("validate", "launch"):
        start = time.perf_counter()
        result = CliRunner().invoke(app, [command, str(path)])
        assert time.perf_counter() - start < 5.0
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: grid: 10000000 jobs"), result.stderr
        assert "at most max_jobs = 100000" in result.stderr
    # The limit is a campaign setting, not part of any job: a spec within it keeps its ids.
    data = copy.deepcopy(TINY_SPEC)
    data["grid"] = {"temperature": [1.0, 2.0, 3.0]}
    ids = [job.job_id for job in _plan(data).jobs]
    assert [job.job_id for job in _plan({**data, "max_jobs": 3}).jobs] == ids
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, {**data,
                                                                           "max_jobs": 2}))])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: grid: 3 jobs (each block's product of axis lengths")
    # Points are counted before two blocks' shared points are merged into one job.
    twice = {**data, "grid": [{"temperature": [1.0, 2.0]}, {"temperature": [1.0, 2.0]}]}
    assert count_jobs(parse_spec(copy.deepcopy(twice))) == 4
    assert len(_plan(twice).jobs) == 2


def test_ids_hash_each_jobs_whole_configuration() -> None:
    # Planning assembles a job's canonical JSON from its sections' (each encoded once); the id
    # must stay the hash of the whole resolved configuration, for every spec that ships.
    for path in sorted((Path(__file__).parent.parent / "specs").glob("*.yaml")):
        for job in _plan(_spec_file(path.name)).jobs:
            assert job.job_id == content_hash(job.config.model_dump(mode="json")), path.name


def test_cached_planning_gives_the_plan_of_planning_each_job_whole() -> None:
    from campaign.errors import SpecError

    data = copy.deepcopy(TINY_SPEC)
    data["grid"] = [
        {"temperature": [1.0, 2.0], "flow": [{"kind": "spline_coupling", "hidden": 8},
                                             {"kind": "affine_coupling", "n_layers": 2}]},
        {"system": {"kind": "dw4"}, "base": {"kind": "thermodynamic", "temperature": 1.5},
         "temperature": [1.0, 2.0], "flow.hidden": [8, 16]},
    ]
    cached = make_plan(parse_spec(copy.deepcopy(data)))
    uncached = make_plan(parse_spec(copy.deepcopy(data)), cache=False)
    assert len(cached.jobs) == 8
    assert [(j.job_id, j.grid_values, j.molecules) for j in cached.jobs] == [
        (j.job_id, j.grid_values, j.molecules) for j in uncached.jobs]
    assert cached.spec_hash == uncached.spec_hash
    # A bad flow after good ones of the same system: the same complaint either way.
    data["grid"][0]["flow"].append({"kind": "spline_coupling", "n_layers": 0})
    messages = []
    for cache in (True, False):
        try:
            make_plan(parse_spec(copy.deepcopy(data)), cache=cache)
        except SpecError as err:
            messages.append(str(err))
    assert messages == ["grid[0].flow.n_layers: 0 is not allowed; must be an integer >= 1"] * 2
