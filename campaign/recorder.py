"""The only MLflow writer of a launch: a parent run per launch, a child run per job with its
params, metrics, series, artifacts, stage and progress tags, failures with their tracebacks."""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any

import yaml

from boltzgen.pipeline.graph import JobOutcome
from campaign.plan import Plan
from campaign.tracking import FAILED, FINISHED, KILLED, RUNNING, Tracker

if TYPE_CHECKING:
    from campaign.scheduler import JobRun, LaunchSummary

# Stages whose wall time a finished job records as ``time_<stage>`` (seconds, first start to
# last end of the job's tasks of that stage; NaN where the output came from the task cache).
TIMED_STAGES = ("reference", "train", "sample", "energy", "estimate")


class Recorder:
    def __init__(self, tracker: Tracker, plan: Plan, tags: dict[str, str]) -> None:
        self.tracker, self.plan, self.tags = tracker, plan, tags
        self.parent_run_id: str | None = None

    def job_records(self) -> dict[str, Any]:
        return self.tracker.job_records(job.job_id for job in self.plan.jobs)

    def begin_launch(self, n_skipped: int) -> str:
        self.parent_run_id = self.tracker.start_parent(
            f"launch-{time.strftime('%Y%m%d-%H%M%S')}", self.tags,
            {"campaign": self.plan.spec.name, "n_jobs": len(self.plan.jobs),
             "n_skipped": n_skipped, "spec_hash": self.plan.spec_hash})
        self.tracker.log_text(self.parent_run_id,
                              _yaml(self.plan.spec.model_dump(mode="json")), "resolved_spec.yaml")
        return self.parent_run_id

    def end_launch(self, summary: LaunchSummary, timeline: dict[str, float]) -> None:
        assert self.parent_run_id is not None
        self.tracker.log_metrics(self.parent_run_id, {
            "n_finished": len(summary.finished), "n_failed": len(summary.failed),
            "n_skipped": len(summary.skipped), "time_launch": summary.seconds, **timeline})
        self.tracker.end(self.parent_run_id, FAILED if summary.failed else FINISHED)

    def abort_launch(self, runs: list[JobRun]) -> None:
        """The driver is stopping (an exception, Ctrl-C): open runs end KILLED."""
        for run in runs:
            if run.run_id is not None and run.stage not in ("finished", "failed"):
                self.tracker.end(run.run_id, KILLED)
        if self.parent_run_id is not None:
            self.tracker.end(self.parent_run_id, KILLED)

    def claim_stale_runs(self, job_ids: list[str]) -> None:
        """Child runs left RUNNING by a driver that died will never finish: mark them KILLED
        (their jobs run again here, from their checkpoints and cached task outputs)."""
        for job_runs in self.tracker.job_runs(job_ids).values():
            for old in job_runs:
                if old.info.status == RUNNING:
                    self.tracker.set_tags(old.info.run_id, {
                        "killed_reason": "its driver died; the job was run again by launch "
                        f"{self.parent_run_id}"})
                    self.tracker.end(old.info.run_id, KILLED)

    def open_job(self, run: JobRun) -> None:
        assert self.parent_run_id is not None
        run.run_id = self.tracker.start_child(
            self.parent_run_id, f"{run.job.label} [{run.job.job_id[:8]}]",
            {**self.tags, "job_id": run.job.job_id},
            {**run.job.params, "job_id": run.job.job_id})
        self.tracker.log_text(run.run_id, _yaml(run.job.config_dict), "resolved_spec.yaml")

    def set_tags(self, run: JobRun, tags: dict[str, str]) -> None:
        if run.run_id is None:
            self.open_job(run)
        assert run.run_id is not None
        self.tracker.set_tags(run.run_id, tags)

    def finish_job(self, run: JobRun, outcome: JobOutcome) -> None:
        """Metrics, params, series and artifacts of a finished job, then FINISHED."""
        assert run.run_id is not None
        started = time.time()
        metrics = dict(outcome.metrics)
        for stage in TIMED_STAGES:
            metrics[f"time_{stage}"] = run.stage_seconds(stage)
        metrics["time_orchestration"] = run.orchestration_overhead
        metrics["retries"] = run.retries
        metrics["tasks_from_cache"] = sum(task.cached for task in run.tasks)
        retried = [t.start for t in run.tasks if t.retry and math.isfinite(t.start)]
        if retried:  # when work resumed after the first failure (unix s; for benchmarks)
            metrics["first_retry_start_unix_s"] = min(retried)
        self.tracker.log_metrics(run.run_id, metrics)
        for key, values in outcome.series.items():
            self.tracker.log_series(run.run_id, key, values)
        self.tracker.log_params(run.run_id, outcome.params)
        nodes: dict[str, list[str]] = {}
        for task in run.tasks:
            if task.node and task.node not in nodes.setdefault(task.stage, []):
                nodes[task.stage].append(task.node)
        # Artifacts before the "finished" tag: a plot the driver cannot read (a work directory
        # it does not see) fails the job without leaving it tagged finished.
        for path, data in outcome.blobs.items():
            self.tracker.log_bytes(run.run_id, data, path)
        self.tracker.log_text(run.run_id, json.dumps([task.as_json() for task in run.tasks],
                                                     indent=1), "tasks.json")
        for directory, paths in outcome.files.items():
            for path in paths:
                self.tracker.log_file(run.run_id, path, directory)
        valid = math.isfinite(metrics.get("delta_f", math.nan))
        self.tracker.set_tags(run.run_id, {"estimate_valid": str(valid).lower(),
                                           "stage": "finished", "progress": run.progress_text(),
                                           "nodes": json.dumps(nodes, sort_keys=True)})
        run.record_seconds = time.time() - started
        self.tracker.log_metrics(run.run_id, {"time_record": run.record_seconds})
        self.tracker.end(run.run_id, FINISHED)

    def fail_job(self, run: JobRun, message: str, trace: str) -> None:
        if run.run_id is None:
            self.open_job(run)
        assert run.run_id is not None
        self.tracker.set_tags(run.run_id, {"error": message[:5000],
                                           "failed_stage": run.last_stage()})
        self.tracker.log_text(run.run_id, trace, "traceback.txt")
        self.tracker.end(run.run_id, FAILED)


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)
