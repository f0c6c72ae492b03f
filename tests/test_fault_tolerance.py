"""Fault tolerance with real parts: a trainer process killed mid-training, a driver killed
mid-campaign and launched again, and exact continuation of training from its checkpoint."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from boltzgen import pipeline
from boltzgen.pipeline import flow_training
from campaign.plan import make_plan
from campaign.spec import parse_spec
from tests.conftest import TINY_SPEC, write_spec

CAMPAIGN = str(Path(sys.executable).with_name("campaign"))


def _job_config(data: dict) -> dict:
    return make_plan(parse_spec(data)).jobs[0].config_dict


def test_training_continues_exactly_from_its_checkpoint(tmp_path: Path) -> None:
    """Stopped after 40 of 60 steps (the process 'dies' right after a checkpoint), a second
    call continues from step 40 and ends with bit-identical parameters and losses."""
    data = copy.deepcopy(TINY_SPEC)
    data["training"].update(objective="reverse_kl", steps=60)
    data["reference"].update(n_steps=300, burn_in=100)
    config = _job_config(data)
    reference = pipeline.run_reference(config, None, 1)
    uninterrupted = pipeline.train(config, reference)

    class Died(Exception):
        pass

    save = flow_training._Progress.save

    def save_then_die(self: flow_training._Progress, content: dict) -> None:
        save(self, content)
        if content["state"].step == 40:
            raise Died

    flow_training._Progress.save = save_then_die  # type: ignore[method-assign]
    try:
        with pytest.raises(Died):
            pipeline.train(config, reference, checkpoint_dir=str(tmp_path), checkpoint_every=20)
    finally:
        flow_training._Progress.save = save  # type: ignore[method-assign]
    resumed = pipeline.train(config, reference, checkpoint_dir=str(tmp_path),
                             checkpoint_every=20)
    assert (resumed.resumed_from_step, resumed.steps_run) == (40, 20)
    assert resumed.losses == uninterrupted.losses
    a = torch.load(io.BytesIO(uninterrupted.checkpoint))["state_dict"]
    b = torch.load(io.BytesIO(resumed.checkpoint))["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A progress file of another configuration is not taken up.
    other = _job_config({**data, "seed": 12})
    assert pipeline.train(other, reference, checkpoint_dir=str(tmp_path),
                          checkpoint_every=20).resumed_from_step == 0


def _processes(marker: str | None = None) -> dict[int, str]:
    """pid -> command line; with ``marker``, only processes whose environment contains it (a
    test's own Ray workers inherit its launch's MLFLOW_TRACKING_URI, so another campaign on the
    same machine is left alone)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker is not None and marker.encode() not in (entry / "environ").read_bytes():
                    continue
                table[int(entry.name)] = (entry / "cmdline").read_bytes().replace(
                    b"\0", b" ").decode(errors="replace")
    return table


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launch ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _job_runs(tmp_path: Path, experiment: str) -> dict[str, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], "tags.campaign_role = 'job'",
                                  max_results=1000):
        runs.setdefault(run.data.tags["job_id"], []).append(run)
    return runs


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def _progress_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=False)["state"].step)
    except (OSError, EOFError, RuntimeError, KeyError):
        return 0


def test_killed_trainer_resumes_from_its_checkpoint_and_survives_a_killed_evaluator(
        tmp_path: Path) -> None:
    """Training energies from OpenMM through two EnergyEvaluators. SIGKILL of the trainer
    process once it has checkpointed 2 x checkpoint_every steps: Ray restarts the actor, the
    driver runs the task again, and training continues from the last checkpoint (at most
    checkpoint_every steps are redone, at least 2 x that were kept). Then, while the resumed
    training runs, SIGKILL of an EnergyEvaluator: the trainer carries on with the live one
    (no further retry of the job), and the job finishes."""
    every, steps = 20, 240
    data = copy.deepcopy(TINY_SPEC)
    data["reference"].update(n_steps=300, burn_in=100)
    data["training"].update(objective="reverse_kl", steps=steps, batch_size=256)
    data["energy"] = {"backend": "openmm", "platform": "CPU"}
    data["sampling"].update(n_samples=2000, energy_batch_size=2000)
    data["resources"]["trainer"]["count"] = 1
    data["fault_tolerance"] = {"checkpoint_every": every}
    spec = write_spec(tmp_path, data)
    job_id = make_plan(parse_spec(data)).jobs[0].job_id
    progress = tmp_path / "campaign-work" / "tiny" / "checkpoints" / job_id / "progress.pt"
    proc = subprocess.Popen([CAMPAIGN, "launch", str(spec), "--format", "json"],
                            env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def busy(title: str) -> list[int]:
        own = _processes(_env(tmp_path)["MLFLOW_TRACKING_URI"])
        return [pid for pid, cmd in own.items() if cmd.startswith(title)]

    try:
        _wait_for(lambda: progress.is_file() and _progress_step(progress) >= 2 * every, 240,
                  "two training checkpoints", proc)
        trainers = _wait_for(lambda: busy("ray::TrainerActor.run_task"), 30,
                             "the training process")
        killed_after = _progress_step(progress)
        os.kill(trainers[0], signal.SIGKILL)
        # Two checkpoints past the kill: the restarted trainer is at work.
        _wait_for(lambda: _progress_step(progress) >= killed_after + 2 * every, 240,
                  "training to go on after the restart", proc)
        evaluators = _wait_for(lambda: busy("ray::EnergyEvaluatorActor.energies_and_forces"),
                               30, "an EnergyEvaluator at work for the trainer")
        evaluator_killed_after = _progress_step(progress)
        os.kill(evaluators[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out)["finished"] == [job_id]
    (run,) = _job_runs(tmp_path, "tiny")[job_id]
    metrics, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    # One retry, the trainer's: the evaluator's death cost the job none.
    assert tags["retries"] == "1" and "trainer actor died" in tags["last_retry_reason"]
    assert evaluator_killed_after < steps
    resumed = int(metrics["train_resumed_from_step"])
    assert resumed >= killed_after >= 2 * every
    assert resumed + int(metrics["train_steps_run"]) == steps
    assert resumed % every == 0  # a checkpoint step: the steps redone were fewer than `every`
    print(f"\ntrainer killed after checkpoint step {killed_after}; resumed from step {resumed}, "
          f"ran {int(metrics['train_steps_run'])} more; retries {tags['retries']}; "
          f"EnergyEvaluator killed after step {evaluator_killed_after}, energy chunks sent "
          f"again: {int(metrics['train_energy_chunks_resent'])}")


def test_pooled_energy_evaluates_a_dead_evaluators_chunk_on_a_live_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real EnergyEvaluator actors (OpenMM); one is SIGKILLed while it computes its half of
    a batch. The batch comes back whole, equal to the live evaluator's own answer for it, with
    one chunk sent again; later batches go to the live evaluator alone. (Each half takes
    seconds, so the kill lands mid-call; the campaign-level test above cannot time its kill
    this well and checks only that the job goes on.)"""
    import numpy as np
    import ray

    from actors.roles import PooledEnergy, make_actor

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = _job_config({**TINY_SPEC, "energy": {"backend": "openmm", "platform": "CPU"}})
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        evaluators = [make_actor("energy_evaluator", 0.5, 0.0) for _ in range(2)]
        pids = [ray.get(actor.ready.remote())["pid"] for actor in evaluators]
        x = np.random.default_rng(3).normal(size=(60_000, 2))
        expected_u, expected_grad = ray.get(
            evaluators[0].energies_and_forces.remote(config, x))[0]
        pool = PooledEnergy(config, evaluators)
        result: dict[str, object] = {}

        def call() -> None:
            try:
                result["value"] = pool(x)
            except BaseException as exc:  # noqa: BLE001 -- reported by the assertion below
                result["error"] = exc

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        deadline = time.monotonic() + 60
        title = "ray::EnergyEvaluatorActor.energies_and_forces"
        while not _cmdline(pids[1]).startswith(title):
            assert worker.is_alive() and time.monotonic() < deadline, \
                "the second evaluator was never seen at work on its chunk"
            time.sleep(0.02)
        os.kill(pids[1], signal.SIGKILL)
        worker.join(timeout=120)
        assert not worker.is_alive() and "error" not in result, result.get("error")
        u, grad = result["value"]
        assert pool.resent == 1 and pool.dead == {1}
        np.testing.assert_array_equal(u, expected_u)
        np.testing.assert_array_equal(grad, expected_grad)
        pool(x[:10])
        assert pool.resent == 1
    finally:
        ray.shutdown()


def test_killed_driver_then_relaunch_finishes_every_job_once(tmp_path: Path) -> None:
    """SIGKILL of the driver after one of two jobs finished; the relaunch skips it, marks the
    child runs the dead driver left RUNNING as KILLED, and finishes the other exactly once."""
    data = copy.deepcopy(TINY_SPEC)
    data["reference"].update(n_steps=300, burn_in=100)
    data["training"]["steps"] = 100
    data["sampling"].update(n_samples=2000, energy_batch_size=2000)
    data["grid"] = {"training.learning_rate": [0.002, 0.003]}
    for role in ("trainer", "energy_evaluator"):
        data["resources"][role]["count"] = 1
    spec = write_spec(tmp_path, data)
    job_ids = {job.job_id for job in make_plan(parse_spec(data)).jobs}
    log = tmp_path / "launch.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([CAMPAIGN, "launch", str(spec)], env=_env(tmp_path),
                                cwd=tmp_path, stdout=sink, stderr=sink, text=True)
    try:
        _wait_for(lambda: "finished (1/2 done)" in log.read_text(), 300,
                  "the first finished job", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _job_runs(tmp_path, "tiny")
    finished_before = {j for j, runs in before.items()
                       if any(r.info.status == "FINISHED" for r in runs)}
    left_running = [r.info.run_id for runs in before.values() for r in runs
                    if r.info.status == "RUNNING"]
    assert len(finished_before) == 1 and left_running

    again = subprocess.run([CAMPAIGN, "launch", str(spec), "--format", "json"],
                           env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                           timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert set(summary["skipped"]) == finished_before
    assert set(summary["finished"]) == job_ids - finished_before
    after = _job_runs(tmp_path, "tiny")
    for job_id in job_ids:
        statuses = [r.info.status for r in after[job_id]]
        assert statuses.count("FINISHED") == 1, (job_id, statuses)
        assert "RUNNING" not in statuses
    print(f"\nfinished before the kill: {len(finished_before)}, left RUNNING: "
          f"{len(left_running)}; relaunch: {len(summary['skipped'])} skipped, "
          f"{len(summary['finished'])} finished, {len(summary['failed'])} failed")
    for run_id in left_running:
        killed = next(r for runs in after.values() for r in runs if r.info.run_id == run_id)
        assert killed.info.status == "KILLED"
        assert "its driver died" in killed.data.tags["killed_reason"]
