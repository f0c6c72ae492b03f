"""Any task graph the science declares runs through the campaign's scheduler, on both backends,
with no change to ``campaign/`` or ``actors/``: a toy kind of job (``tests/graph_toy.py``) whose
data tasks every job shares (fan-out), whose combine task needs all of them (fan-in, cached),
with a task per job and a chunked task over the energy pool. Shared tasks run once per launch;
a relaunch after a failure reruns only what the failed job still needs (the cached task and
the tasks that only fed it are not run again)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from campaign.backends import LocalBackend, RayBackend
from campaign.plan import Job, make_plan
from campaign.recorder import Recorder
from campaign.scheduler import Scheduler
from campaign.spec import parse_spec
from campaign.tracking import Tracker
from tests import graph_toy
from tests.conftest import TINY_SPEC

ROOT = Path(__file__).resolve().parent.parent


class ToyScheduler(Scheduler):
    def graph(self, job: Job):  # the toy kind of job instead of the free-energy one
        return graph_toy.toy_graph(job.config_dict, job.job_id, self.work_dir)


def _plan(tmp_path: Path):
    data = copy.deepcopy(TINY_SPEC)
    data["grid"] = {"temperature": [1.0, 2.0, 3.0]}
    data["work_dir"] = str(tmp_path / "work")
    return make_plan(parse_spec(data))


def _launch(plan, backend_name: str, tmp_path: Path):
    backend = LocalBackend(plan) if backend_name == "local" else RayBackend(plan)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "toy")
    recorder = Recorder(tracker, plan, {"campaign": "toy", "driver_host": "test",
                                        "driver_pid": str(os.getpid())})
    return ToyScheduler(plan, backend).run(recorder), tracker


def _runs(work: Path) -> list[str]:
    return (work / "runs.log").read_text().split()


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_fan_in_fan_out_shared_once_cached_across_launches(
        backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(tmp_path)
    work = Path(plan.spec.work_path())
    work.mkdir(parents=True)
    (work / "fail-2.0").touch()  # the job at temperature 2 fails in its own task
    if backend == "ray":
        import ray

        monkeypatch.setenv("PYTHONPATH", str(ROOT))  # actors import tests.graph_toy
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary, tracker = _launch(plan, backend, tmp_path)
        first = _runs(work)
        assert len(summary.finished) == 2 and len(summary.failed) == 1
        assert "asked to fail at temperature 2.0" in summary.failed[0].error
        # Shared tasks once for three jobs; the fan-in saw all three parts.
        assert sorted(r for r in first if r.startswith(("data", "combine"))) == [
            "combine", "data-0", "data-1", "data-2"]
        assert first.count("piece") == 2 * 3
        values = {run.job.config.temperature: run for run in summary.finished}
        records = tracker.job_records(run.job.job_id for run in summary.finished)
        for run in values.values():
            assert run.progress_text().startswith("tasks 6/6")
            assert records[run.job.job_id].status == "FINISHED"
        client = tracker.client
        for temperature, run in values.items():
            metrics = client.get_run(run.run_id).data.metrics
            assert metrics["toy_value"] == 5 * temperature
            assert metrics["toy_pieces"] == 2 * (3 * 5 * temperature + 3)

        (work / "fail-2.0").unlink()
        summary, _ = _launch(plan, backend, tmp_path)
        again = _runs(work)[len(first):]
        assert [run.job.config.temperature for run in summary.finished] == [2.0]
        assert len(summary.skipped) == 2
        # Only the failed job's own tasks ran: combine came from the cache, the data tasks
        # that only fed it were not needed.
        assert sorted(again) == ["own-2.0", "piece", "piece", "piece"]
        (run,) = summary.finished
        assert sum(task.cached for task in run.tasks) == 1
    finally:
        if backend == "ray":
            import ray

            ray.shutdown()
