"""Scheduling a plan's jobs over Ray actor pools; the only process that writes to MLflow.

Each job goes through the stages reference (MCMC actor) -> train (Trainer) -> sample (Sampler)
-> energy (EnergyEvaluator pool, in chunks) -> estimate (Sampler: estimates, and plots written
to the work directory) -> record (here: MLflow writes). A small
scheduler over ``ray.wait`` hands a stage to an idle actor of its role; jobs interleave, so all
actors stay busy while any job has work for them. Stage results travel between actors as object
references; the driver fetches only what it records.

Failures of the machinery (an actor's process or node died, an object was lost) are not the
job's fault: the task goes back to the front of its queue, up to ``fault_tolerance.job_retries``
times per job, and the actor is probed until Ray has restarted it (``actor_restarts``) or, gone
for good, replaced. Every stage can be repeated: MD writes its cache atomically, trainers
continue from their progress checkpoints, energies are pure, the estimate stage overwrites
whole plot files. Stage results that later stages
need are copied into the driver's object store, so that losing a node loses no result. An error
raised by the science code fails the job at once (repeating it would fail again).

Timing: every stage method reports its own start/end; the driver records when it submitted the
task and when it saw the result. A job's orchestration overhead is the sum, over its tasks, of
(start − submit) + (seen − end): seconds in which the job's next actor was ready but not working
on it. Queueing behind other jobs is not counted (it is waiting for a busy actor, not overhead).
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import yaml

from actors import make_actor
from boltzgen import pipeline
from campaign.plan import Job, Plan
from campaign.tracking import FAILED, FINISHED, KILLED, RUNNING, Tracker

READY_TIMEOUT_S = 300.0


# Errors that say the machinery failed, not the job: worth running the task again.
SYSTEM_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                 ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)


@dataclass
class TaskRecord:
    stage: str
    enqueued: float
    submitted: float = math.nan
    start: float = math.nan
    end: float = math.nan
    seen: float = math.nan
    node: str = ""  # Ray node id of the actor that did the work
    retry: bool = False  # a task run again after its actor or node died

    @property
    def overhead(self) -> float:
        return (self.start - self.submitted) + (self.seen - self.end)

    def as_json(self) -> dict[str, Any]:
        """Its fields, times in unix seconds, null where the task never got that far."""
        return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                for key, value in asdict(self).items()}


@dataclass
class JobRun:
    job: Job
    config: dict[str, Any]
    run_id: str | None = None
    stage: str = "pending"
    reference: Any = None  # ObjectRef of ReferenceData
    trained: Any = None  # ObjectRef of TrainedFlow
    samples: pipeline.SampleSet | None = None
    energy_parts: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    energy_left: int = 0
    tasks: list[TaskRecord] = field(default_factory=list)
    error: str | None = None
    record_seconds: float = 0.0
    md_left: set[str] = field(default_factory=set)  # MD cache keys this job still waits for
    retries: int = 0  # tasks run again after their actor or node died

    def stage_seconds(self, stage: str) -> float:
        done = [t for t in self.tasks if t.stage == stage and math.isfinite(t.end)]
        return max(t.end for t in done) - min(t.start for t in done) if done else math.nan

    @property
    def orchestration_overhead(self) -> float:
        return float(sum(t.overhead for t in self.tasks if math.isfinite(t.seen)))


@dataclass
class Task:
    run: JobRun
    method: str
    args: tuple[Any, ...]
    record: TaskRecord
    on_done: Callable[[JobRun, Any], None]
    fetch: bool  # fetch the result into the driver (else keep the object reference)


@dataclass(frozen=True)
class LivePool:
    """A task argument that stands for the actors of ``role`` alive when the task is sent (a
    task run again after a failure must not carry handles of actors replaced since)."""

    role: str


@dataclass
class LaunchSummary:
    finished: list[JobRun] = field(default_factory=list)
    failed: list[JobRun] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)
    parent_run_id: str | None = None
    seconds: float = 0.0


class Progress:
    """Receives progress events; the CLI subclasses it to draw a display."""

    def start(self, total: int, skipped: int) -> None: ...
    def stage(self, run: JobRun) -> None: ...
    def done(self, run: JobRun) -> None: ...
    def stop(self) -> None: ...


# actor method -> (actor role that runs it, job stage it belongs to)
METHODS = {"run_md": ("mcmc", "reference"), "run_reference": ("mcmc", "reference"),
           "train": ("trainer", "train"),
           "sample": ("sampler", "sample"), "potential": ("energy_evaluator", "energy"),
           "estimate": ("sampler", "estimate")}


class Driver:

    def __init__(self, plan: Plan, progress: Progress | None = None,
                 marks: dict[str, float] | None = None) -> None:
        self.plan = plan
        # Launch timeline (unix seconds): the launcher's marks (process start, Ray up, ...)
        # and the driver's own (actors ready, first task start, last task end).
        self.marks: dict[str, float] = marks if marks is not None else {}
        self._initial_actors = 0
        self.tracker: Tracker  # set by run(): the actors may start before the store is open
        self.tags: dict[str, str] = {}
        self.progress = progress or Progress()
        self.pools: dict[str, list[Any]] = {}
        self.idle: dict[str, collections.deque[Any]] = {}
        self.queues: dict[str, collections.deque[Task]] = {}
        self.in_flight: dict[Any, tuple[Task, Any, Any]] = {}
        self.pending_ready: dict[Any, tuple[str, Any]] = {}
        self.parent_run_id: str | None = None
        self._actors_started = math.inf
        # Shared MD runs (cache key -> the job whose task runs it / the jobs waiting for it).
        self.md_owner: dict[str, JobRun] = {}
        self.md_waiters: dict[str, list[JobRun]] = {}
        self.md_done: set[str] = set()
        self.fault = plan.spec.fault_tolerance
        self.actor_nodes: dict[Any, str] = {}  # actor handle -> Ray node id (from ``ready``)
        self.replacements: collections.Counter[str] = collections.Counter()

    # -- actors --------------------------------------------------------------------------------
    def start_actors(self) -> None:
        self._actors_started = self.marks["actors_requested"] = time.time()
        for role, res in self.plan.resources.items():
            self.pools[role] = []
            self.idle[role] = collections.deque()
            self.queues[role] = collections.deque()
            for _ in range(int(res["count"])):
                self._add_actor(role)
        self._initial_actors = len(self.pending_ready)

    def _add_actor(self, role: str) -> None:
        res = self.plan.resources[role]
        # Ray restarts a dead actor; the driver re-queues the task it was doing to a live
        # actor (counted against the job's retry budget), trainers re-send energy chunks.
        actor = make_actor(role, res["cpus"], res["gpus"],
                           max_restarts=self.fault.actor_restarts)
        self.pools[role].append(actor)
        self._probe(role, actor)

    def _probe(self, role: str, actor: Any) -> None:
        """Take ``actor`` out of service until it answers ``ready`` (again)."""
        self.pending_ready[actor.ready.remote()] = (role, actor)

    def _retire_actor(self, role: str, actor: Any) -> None:
        """An actor that is gone for good: replace it while the role's budget lasts."""
        if actor in self.pools[role]:
            self.pools[role].remove(actor)
        ray.kill(actor, no_restart=True)
        budget = int(self.plan.resources[role]["count"]) * self.fault.actor_restarts
        if self.replacements[role] < budget:
            self.replacements[role] += 1
            self._add_actor(role)

    # -- main loop -----------------------------------------------------------------------------
    def run(self, tracker: Tracker, tags: dict[str, str]) -> LaunchSummary:
        """Run every job not finished before; ``tags`` go on the launch's parent run. Starts
        the actors unless :meth:`start_actors` already did."""
        self.tracker, self.tags = tracker, tags
        started = time.time()
        summary = LaunchSummary()
        records = self.tracker.job_records(job.job_id for job in self.plan.jobs)
        _refuse_if_driven_elsewhere(self.tracker, [job.job_id for job in self.plan.jobs])
        todo = []
        for job in self.plan.jobs:
            record = records.get(job.job_id)
            if record is not None and record.status == FINISHED:
                summary.skipped.append(job)
            else:
                todo.append(JobRun(job=job, config=job.config_dict))
        if todo and not self.pools:  # actor processes start (seconds of imports) while
            self.start_actors()       # MLflow records the launch
        self.parent_run_id = self.tracker.start_parent(
            f"launch-{time.strftime('%Y%m%d-%H%M%S')}", self.tags,
            {"campaign": self.plan.spec.name, "n_jobs": len(self.plan.jobs),
             "n_skipped": len(summary.skipped), "spec_hash": self.plan.spec_hash},
        )
        summary.parent_run_id = self.parent_run_id
        self.tracker.log_text(self.parent_run_id, _yaml(self.plan.spec.model_dump(mode="json")),
                              "resolved_spec.yaml")
        self._claim_stale_runs(todo)
        self.progress.start(len(self.plan.jobs), len(summary.skipped))
        try:
            if todo:
                for run in todo:
                    self._start_job(run)
                self._loop(todo, summary)
        except BaseException:
            for run in todo:
                if run.run_id is not None and run.stage not in ("finished", "failed"):
                    self.tracker.end(run.run_id, KILLED)
            self.tracker.end(self.parent_run_id, KILLED)
            raise
        finally:
            self.progress.stop()
        summary.seconds = time.time() - started
        self.tracker.log_metrics(self.parent_run_id, {
            "n_finished": len(summary.finished), "n_failed": len(summary.failed),
            "n_skipped": len(summary.skipped), "time_launch": summary.seconds,
            **self._timeline()})
        self.tracker.end(self.parent_run_id, FAILED if summary.failed else FINISHED)
        return summary

    def _timeline(self) -> dict[str, float]:
        """Where a launch's fixed cost goes (seconds): from the driver process's start to each
        start-up mark, and from the last task's end to now (the final records)."""
        marks, now = self.marks, time.time()
        out = {f"time_to_{name}": marks[name] - marks["process_start"]
               for name in ("ray_ready", "tracker_ready", "actors_requested",
                            "first_actor_ready", "all_actors_ready", "first_task_start")
               if name in marks and "process_start" in marks}
        if "last_task_end" in marks:
            out["time_after_last_task"] = now - marks["last_task_end"]
        return out

    def _loop(self, todo: list[JobRun], summary: LaunchSummary) -> None:
        open_runs = {id(run) for run in todo}
        while open_runs:
            self._dispatch()
            waiting = list(self.in_flight) + list(self.pending_ready)
            if not waiting:
                raise RuntimeError("no actor is ready and no task is running; check resources")
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in self.pending_ready:
                    self._actor_ready(ref)
                    continue
                task, actor, value_ref = self.in_flight.pop(ref)
                task.record.seen = time.time()
                self._complete(task, actor, ref, value_ref)
                # A shared MD run that fails ends every job waiting for it, not only its own.
                for run in todo:
                    if run.stage in ("finished", "failed") and id(run) in open_runs:
                        open_runs.discard(id(run))
                        (summary.finished if run.stage == "finished" else summary.failed
                         ).append(run)
                        self.progress.done(run)
            self._check_roles_alive()

    def _actor_ready(self, ref: Any) -> None:
        role, actor = self.pending_ready.pop(ref)
        try:
            where = ray.get(ref)
        except ray.exceptions.RayError:
            self._retire_actor(role, actor)
            return
        self.actor_nodes[actor] = where["node"]
        self.idle[role].append(actor)
        self.marks.setdefault("first_actor_ready", time.time())
        if len(self.actor_nodes) == self._initial_actors:
            self.marks.setdefault("all_actors_ready", time.time())

    def _check_roles_alive(self) -> None:
        """A role with queued work but no live actor would stall its jobs forever."""
        for role, queue in self.queues.items():
            if queue and not self.pools[role]:
                raise RuntimeError(f"resources.{role}: no actor of this role could be started")
        if time.time() - self._actors_started > READY_TIMEOUT_S:
            for role, queue in self.queues.items():
                busy = any(METHODS[t.method][0] == role
                           for t, _, _ in self.in_flight.values())
                if queue and not self.idle[role] and not busy:
                    raise RuntimeError(
                        f"resources.{role}: no actor of this role became ready within "
                        f"{READY_TIMEOUT_S:.0f} s; the cluster may lack the CPUs/GPUs asked for")

    def _enqueue(self, run: JobRun, method: str, args: tuple[Any, ...],
                 on_done: Callable[[JobRun, Any], None], fetch: bool,
                 first: bool = False, retry: bool = False) -> None:
        """Queue a task for its role; ``first`` puts it ahead of the queued ones."""
        role, stage = METHODS[method]
        record = TaskRecord(stage=stage, enqueued=time.time(), retry=retry)
        run.tasks.append(record)
        task = Task(run=run, method=method, args=args, record=record, on_done=on_done,
                    fetch=fetch)
        if first:
            self.queues[role].appendleft(task)
        else:
            self.queues[role].append(task)

    def _dispatch(self) -> None:
        for role, queue in self.queues.items():
            while queue and self.idle[role]:
                task = queue.popleft()
                if task.run.stage == "failed":
                    continue
                actor = self.idle[role].popleft()
                if task.run.run_id is None:
                    self._open_child_run(task.run)
                if task.run.stage != task.record.stage:
                    task.run.stage = task.record.stage
                    self.progress.stage(task.run)
                    self.tracker.set_tags(task.run.run_id, {
                        "stage": task.run.stage,
                        "node": self.actor_nodes.get(actor, "")})
                task.record.submitted = time.time()
                args = tuple(list(self.pools[a.role]) if isinstance(a, LivePool) else a
                             for a in task.args)
                value_ref, timing_ref = getattr(actor, task.method).options(
                    num_returns=2).remote(*args)
                self.in_flight[timing_ref] = (task, actor, value_ref)

    def _complete(self, task: Task, actor: Any, timing_ref: Any, value_ref: Any) -> None:
        role = METHODS[task.method][0]
        run = task.run
        try:
            timing = ray.get(timing_ref)
        except SYSTEM_ERRORS as exc:
            self._probe(role, actor)  # back in service once Ray has restarted it
            self._suspect_node(self.actor_nodes.get(actor))
            self._retry(task, f"{role} actor died: {type(exc).__name__}",
                        traceback.format_exc())
            return
        except ray.exceptions.RayTaskError as exc:
            self.idle[role].append(actor)
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, SYSTEM_ERRORS):  # e.g. a trainer's energy evaluator died
                self._retry(task, f"{role} task lost a peer: {type(cause).__name__}: {cause}",
                            str(exc))
            else:
                self._fail(run, f"{type(cause).__name__}: {cause}", str(exc))
            return
        task.record.start, task.record.end = timing["start"], timing["end"]
        self.marks["first_task_start"] = min(self.marks.get("first_task_start", math.inf),
                                             timing["start"])
        self.marks["last_task_end"] = max(self.marks.get("last_task_end", 0.0), timing["end"])
        task.record.node = timing.get("node", "")
        self.idle[role].append(actor)
        if run.stage == "failed":
            return
        try:
            task.on_done(run, ray.get(value_ref) if task.fetch else value_ref)
        except SYSTEM_ERRORS as exc:  # the result was lost with its node
            self._retry(task, f"result of {task.method} lost: {type(exc).__name__}",
                        traceback.format_exc())
        except Exception as exc:  # an error in the driver's own bookkeeping for this job
            self._fail(run, f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def _suspect_node(self, node: str | None) -> None:
        """An actor died: its node may be gone. Idle actors on that node answer ``ready``
        before they get work again, so that retried tasks go to actors that are alive."""
        if not node:
            return
        for role, idle in self.idle.items():
            for actor in [a for a in idle if self.actor_nodes.get(a) == node]:
                idle.remove(actor)
                self._probe(role, actor)

    def _retry(self, task: Task, reason: str, trace: str) -> None:
        """Run ``task`` again (first in its queue) while the job's retry budget lasts."""
        run = task.run
        if run.stage == "failed":
            return
        if run.retries >= self.fault.job_retries:
            self._fail(run, f"{reason}; gave up after {run.retries} retries "
                       f"(fault_tolerance.job_retries)", trace)
            return
        run.retries += 1
        if run.run_id is not None:
            self.tracker.set_tags(run.run_id, {"retries": str(run.retries),
                                               "last_retry_reason": reason})
        self._enqueue(run, task.method, task.args, task.on_done, task.fetch, first=True,
                      retry=True)

    # -- stage transitions ---------------------------------------------------------------------
    def _start_job(self, run: JobRun) -> None:
        """MD ladders first: every distinct MD run of the plan is one task on the MCMC pool,
        shared by the jobs that need it, so ladders of different lengths spread over all MCMC
        actors; a job's reference stage (decorrelation, MBAR, splits) starts once its runs are
        in the cache. Other reference samplers start at once."""
        runs = pipeline.md_runs(run.config)
        if not runs:
            self._enqueue_reference(run)
            return
        run.md_left = set()
        for key, temperature in runs:
            if key in self.md_done:
                continue
            run.md_left.add(key)
            self.md_waiters.setdefault(key, []).append(run)
            if key not in self.md_owner:
                self.md_owner[key] = run
                self._enqueue(run, "run_md",
                              (run.config, temperature, str(self.plan.spec.work_path())),
                              self._md_finisher(key), fetch=True)
        if not run.md_left:
            self._enqueue_reference(run)

    def _md_finisher(self, key: str) -> Callable[[JobRun, Any], None]:
        def finished(_owner: JobRun, _seconds: Any) -> None:
            self.md_done.add(key)
            for waiter in self.md_waiters.pop(key, []):
                waiter.md_left.discard(key)
                if not waiter.md_left and waiter.stage != "failed":
                    self._enqueue_reference(waiter)
        return finished

    def _enqueue_reference(self, run: JobRun) -> None:
        # Ahead of queued MD runs: a job whose ladder is done can train while other jobs'
        # MD goes on (behind them, it would wait for every MD run of the plan).
        self._enqueue(run, "run_reference", (run.config, str(self.plan.spec.work_path())),
                      self._after_reference, fetch=True, first=True)

    def _after_reference(self, run: JobRun, reference: pipeline.ReferenceData) -> None:
        # Held by the driver's object store: a lost worker node does not take it along.
        run.reference = ray.put(reference)
        # OpenMM energies in training go to the EnergyEvaluator pool (each actor keeps its
        # Context); torch potentials are cheaper in the trainer's own process.
        evaluators = (LivePool("energy_evaluator")
                      if run.config["energy"]["backend"] == "openmm" else None)
        self._enqueue(run, "train",
                      (run.config, run.reference,
                       str(self.plan.spec.work_path() / "checkpoints" / run.job.job_id),
                       evaluators, self.fault.checkpoint_every),
                      self._after_train, fetch=True)

    def _after_train(self, run: JobRun, trained: pipeline.TrainedFlow) -> None:
        run.trained = ray.put(trained)
        self._enqueue(run, "sample", (run.config, run.trained, run.reference),
                      self._after_sample, fetch=True)

    def _after_sample(self, run: JobRun, samples: pipeline.SampleSet) -> None:
        run.samples = samples
        batch = int(run.config["sampling"]["energy_batch_size"])
        for key, coords in pipeline.energy_requests(samples).items():
            chunks = [coords[i:i + batch] for i in range(0, len(coords), batch)] or [coords]
            run.energy_parts[key] = [None] * len(chunks)
            for index, chunk in enumerate(chunks):
                run.energy_left += 1
                self._enqueue(run, "potential", (run.config, chunk),
                              self._energy_setter(key, index), fetch=True)

    def _energy_setter(self, key: str, index: int) -> Callable[[JobRun, Any], None]:
        def store(run: JobRun, values: np.ndarray) -> None:
            run.energy_parts[key][index] = values
            run.energy_left -= 1
            if run.energy_left == 0:
                self._after_energy(run)
        return store

    def _after_energy(self, run: JobRun) -> None:
        potentials = {key: np.concatenate(parts) for key, parts in run.energy_parts.items()}
        run.energy_parts = {}
        # Estimates and figures in an actor: the driver's loop stays free to dispatch other
        # jobs' stages (on a cluster it shares the head node with actors).
        plot_dir = str(self.plan.spec.work_path() / "plots" / run.job.job_id)
        self._enqueue(run, "estimate", (run.config, run.reference, run.samples, potentials,
                                        plot_dir), self._after_estimate, fetch=True)

    def _after_estimate(self, run: JobRun, report: pipeline.EstimateReport) -> None:
        started = time.time()
        reference: pipeline.ReferenceData = ray.get(run.reference)
        trained: pipeline.TrainedFlow = ray.get(run.trained)
        self._record(run, reference, report, trained)
        run.record_seconds = time.time() - started
        self.tracker.log_metrics(run.run_id, {"time_record": run.record_seconds})
        self.tracker.end(run.run_id, FINISHED)
        run.stage = "finished"

    # -- MLflow ----------------------------------------------------------------------------------
    def _claim_stale_runs(self, todo: list[JobRun]) -> None:
        """Child runs left RUNNING by a driver that died will never finish: mark them KILLED
        (their jobs run again here, from their checkpoints and cached MD)."""
        runs = self.tracker.job_runs([run.job.job_id for run in todo])
        for job_runs in runs.values():
            for old in job_runs:
                if old.info.status == RUNNING:
                    self.tracker.set_tags(old.info.run_id, {
                        "killed_reason": "its driver died; the job was run again by launch "
                        f"{self.parent_run_id}"})
                    self.tracker.end(old.info.run_id, KILLED)

    def _open_child_run(self, run: JobRun) -> None:
        run.run_id = self.tracker.start_child(
            self.parent_run_id, f"{run.job.label} [{run.job.job_id[:8]}]",
            {**self.tags, "job_id": run.job.job_id},
            {**run.job.params, "job_id": run.job.job_id},
        )
        self.tracker.log_text(run.run_id, _yaml(run.config), "resolved_spec.yaml")

    def _record(self, run: JobRun, reference: pipeline.ReferenceData,
                report: pipeline.EstimateReport, trained: pipeline.TrainedFlow) -> None:
        metrics = dict(report.metrics)
        for stage, key in (("reference", "time_reference"), ("train", "time_train"),
                           ("sample", "time_sample"), ("energy", "time_energy"),
                           ("estimate", "time_estimate")):
            metrics[key] = run.stage_seconds(stage)
        metrics["time_orchestration"] = run.orchestration_overhead
        metrics["train_skipped_steps"] = trained.skipped_steps
        metrics["train_resumed_from_step"] = trained.resumed_from_step
        metrics["train_steps_run"] = trained.steps_run
        metrics["train_energy_chunks_resent"] = trained.energy_chunks_resent
        metrics["retries"] = run.retries
        retried = [t.start for t in run.tasks if t.retry and math.isfinite(t.start)]
        if retried:  # when work resumed after the first failure (unix s; for benchmarks)
            metrics["first_retry_start_unix_s"] = min(retried)
        metrics["flow_parameters"] = trained.n_parameters
        # Configurations whose system energy was computed (OpenMM for molecular systems):
        # in training, and in the energy stage (mapped samples and pulled-back targets).
        estimate_evaluations = sum(len(v) for v in pipeline.energy_requests(run.samples).values())
        metrics["energy_evaluations_train"] = trained.energy_evaluations
        metrics["energy_evaluations_estimate"] = estimate_evaluations
        metrics["energy_evaluations"] = trained.energy_evaluations + estimate_evaluations
        self.tracker.log_metrics(run.run_id, metrics)
        self.tracker.log_series(run.run_id, "train_loss", trained.losses)
        self.tracker.log_params(run.run_id, {
            "estimand": report.notes["estimand"],
            "reference_method": report.notes["reference_method"],
            "estimator": report.notes["estimator"],
            "nll_convention": report.notes["nll_convention"],
            "reference_ladder": ",".join(f"{t:.6g}" for t in reference.ladder),
            **({"checkpoint_path": trained.checkpoint_path} if trained.checkpoint_path else {}),
        })
        valid = math.isfinite(metrics.get("delta_f", math.nan))
        nodes: dict[str, list[str]] = {}
        for task in run.tasks:
            if task.node and task.node not in nodes.setdefault(task.stage, []):
                nodes[task.stage].append(task.node)
        # Artifacts before the "finished" tag: a plot the driver cannot read (a work directory
        # it does not see) fails the job without leaving it tagged finished.
        self.tracker.log_bytes(run.run_id, trained.checkpoint, "checkpoint/flow.pt")
        self.tracker.log_text(run.run_id, json.dumps([task.as_json() for task in run.tasks],
                                                     indent=1), "tasks.json")
        for path in report.plots.values():
            self.tracker.log_file(run.run_id, path, "plots")
        if report.works:
            buffer = io.BytesIO()
            np.savez(buffer, **report.works)
            self.tracker.log_bytes(run.run_id, buffer.getvalue(), "works.npz")
        self.tracker.set_tags(run.run_id, {"estimate_valid": str(valid).lower(),
                                           "stage": "finished",
                                           "nodes": json.dumps(nodes, sort_keys=True)})

    def _fail(self, run: JobRun, message: str, trace: str) -> None:
        if run.stage == "failed":
            return
        run.stage, run.error = "failed", message
        # MD runs this job owned and did not finish will not run: their waiters fail too.
        for key, owner in self.md_owner.items():
            if owner is run and key not in self.md_done:
                for waiter in self.md_waiters.pop(key, []):
                    if waiter is not run:
                        self._fail(waiter, f"a shared MD run failed in job {run.job.job_id}: "
                                   f"{message}", trace)
        if run.run_id is None:
            self._open_child_run(run)
        self.tracker.set_tags(run.run_id, {"error": message[:5000], "failed_stage":
                                           _last_stage(run)})
        self.tracker.log_text(run.run_id, trace, "traceback.txt")
        self.tracker.end(run.run_id, FAILED)


def _refuse_if_driven_elsewhere(tracker: Tracker, job_ids: list[str]) -> None:
    """Two drivers on one campaign would run its jobs twice: refuse to start while a job's
    RUNNING child run belongs to a driver process that is still alive on this host. (A driver
    on another host cannot be checked from here; its runs are taken as abandoned.)"""
    here = socket.gethostname()
    for job_id, runs in tracker.job_runs(job_ids).items():
        for old in runs:
            tags = old.data.tags
            if old.info.status != RUNNING or tags.get("driver_host") != here:
                continue
            pid = int(tags.get("driver_pid", "0") or 0)
            if pid and pid != os.getpid() and _alive(pid):
                raise RuntimeError(
                    f"job {job_id} is being run by another driver (pid {pid} on {here}); "
                    "wait for it or stop it before launching again")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _last_stage(run: JobRun) -> str:
    return run.tasks[-1].stage if run.tasks else "pending"


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)
