"""Run the task graphs of a plan's jobs over a backend (Ray actors, or this process).

Each job's graph comes from the science (:func:`boltzgen.pipeline.job_graph`). Tasks with
the same content key are one task, run once for every job that needs it; a task whose output
is in the work directory's task cache is not run again. A task is queued for its actor role
when its inputs are done, and the backend hands queued tasks to idle workers (higher priority
first, then in order). A chunked task's pieces are queued one by one; their outputs are
gathered in order.

Failures of the machinery (an actor's process or node died, an object was lost) are not the
job's fault: the task goes back to the front of its queue, up to ``fault_tolerance.job_retries``
times per job. An error raised by the science fails the task at once (repeating it would fail
again), and with it every job that needs it. When all of a job's tasks are done the driver
makes the job's outcome (the science's ``outcome`` function) and the recorder writes it.

Timing: every task reports its own start/end; the scheduler records when it queued the task,
submitted it and saw its result. A job's orchestration overhead is the sum over its tasks of
(start − submit) + (seen − end): seconds in which the job's next worker was ready but not
working on it. Queueing behind other jobs is not counted.

Progress: a job's tasks done of total, a running training's step of total with its loss (from
the progress file its worker writes), and an estimate of the time left from the durations of
tasks of the same stage already done; shown live and kept in the job's ``progress`` tag.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from boltzgen.pipeline.graph import (
    JobGraph,
    TaskSpec,
    gather_inputs,
    load_cached,
    resolve,
    store_cached,
)
from campaign.plan import Job, Plan
from campaign.recorder import Recorder

PROGRESS_TAG_EVERY_S = 15.0  # a running job's progress tag is rewritten at most this often


@dataclass
class TaskRecord:
    """One run of a task (or of a piece of one) for a job; times in unix seconds."""

    stage: str
    enqueued: float
    key: str = ""
    submitted: float = math.nan
    start: float = math.nan
    end: float = math.nan
    seen: float = math.nan
    node: str = ""  # Ray node id of the worker that did it
    retry: bool = False  # run again after its worker or node died
    cached: bool = False  # its output came from the work directory's task cache
    piece: int | None = None

    @property
    def overhead(self) -> float:
        return (self.start - self.submitted) + (self.seen - self.end)

    def as_json(self) -> dict[str, Any]:
        """Its fields, null where the task never got that far."""
        return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                for key, value in asdict(self).items()}


@dataclass
class JobRun:
    job: Job
    graph: JobGraph
    run_id: str | None = None
    stage: str = "pending"
    tasks: list[TaskRecord] = field(default_factory=list)
    error: str | None = None
    record_seconds: float = 0.0
    retries: int = 0  # tasks run again after their worker or node died
    done_keys: set[str] = field(default_factory=set)
    running_note: str = ""  # e.g. "train step 120/500, loss 1.234"
    eta_s: float = math.nan
    progress_written: float = 0.0

    @property
    def config(self) -> dict[str, Any]:
        return self.job.config_dict

    def stage_seconds(self, stage: str) -> float:
        done = [t for t in self.tasks if t.stage == stage and math.isfinite(t.end)]
        return max(t.end for t in done) - min(t.start for t in done) if done else math.nan

    @property
    def orchestration_overhead(self) -> float:
        return float(sum(t.overhead for t in self.tasks if math.isfinite(t.seen)))

    def last_stage(self) -> str:
        return self.tasks[-1].stage if self.tasks else "pending"

    def progress_text(self) -> str:
        """``tasks 6/14; MD 150.0 running; about 3 min left``."""
        parts = [f"tasks {len(self.done_keys)}/{len(self.graph.tasks)}"]
        if self.running_note:
            parts.append(self.running_note)
        if math.isfinite(self.eta_s):
            parts.append(f"about {_duration(self.eta_s)} left")
        return "; ".join(parts)


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
    def update(self, run: JobRun) -> None: ...
    def done(self, run: JobRun) -> None: ...
    def stop(self) -> None: ...


@dataclass
class Call:
    """A task (or one piece of it) handed to a backend: run ``function(ctx, **kwargs)`` on a
    worker of ``role``; ``inputs`` are stored outputs (the backend's handles) by name."""

    call_id: int
    role: str
    function: str
    args: dict[str, Any]
    inputs: dict[str, Any]
    energy_pool: bool
    progress_file: str | None
    record: TaskRecord
    key: str
    piece: int | None = None


@dataclass
class Completion:
    """What a backend reports of a call: ``ok`` with the value, ``error`` (raised by the
    task: not retried) or ``lost`` (the worker, its node or the result was lost: retried)."""

    call: Call
    status: str
    value: Any = None
    timing: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    trace: str = ""


class Backend(Protocol):
    """Where tasks run: Ray actors (:class:`campaign.backends.RayBackend`) or this process
    (:class:`campaign.backends.LocalBackend`)."""

    def start(self) -> None: ...
    def can_take(self, role: str) -> bool: ...
    def submit(self, call: Call) -> str: ...
    def wait(self, timeout: float, queued_roles: set[str]) -> list[Completion]: ...
    def keep(self, value: Any) -> Any: ...
    def fetch(self, stored: Any) -> Any: ...
    def busy(self) -> bool: ...


@dataclass
class TaskState:
    spec: TaskSpec
    jobs: list[JobRun] = field(default_factory=list)
    waiting_on: set[str] = field(default_factory=set)
    dependents: list[str] = field(default_factory=list)
    status: str = "waiting"  # waiting, queued, running, done, failed
    stored: Any = None
    pieces_left: int = 0
    piece_values: list[Any] = field(default_factory=list)
    started: float = math.nan


class Scheduler:
    def __init__(self, plan: Plan, backend: Backend, progress: Progress | None = None,
                 marks: dict[str, float] | None = None) -> None:
        self.plan, self.backend = plan, backend
        self.progress = progress or Progress()
        self.marks: dict[str, float] = marks if marks is not None else {}
        self.work_dir = str(plan.spec.work_path())
        self.fault = plan.spec.fault_tolerance
        self.states: dict[str, TaskState] = {}
        self.queues: dict[str, list[tuple[int, int, Call]]] = {}
        self.calls: dict[int, Call] = {}
        self._ids = itertools.count()
        self.recorder: Recorder
        self.durations: dict[str, list[float]] = {}  # stage -> seconds of its finished tasks

    # -- the launch ------------------------------------------------------------------------------
    def run(self, recorder: Recorder) -> LaunchSummary:
        """Run every job not finished before; the recorder writes the launch to MLflow."""
        from campaign.liveness import refuse_if_driven_elsewhere

        self.recorder = recorder
        started = time.time()
        summary = LaunchSummary()
        records = recorder.job_records()
        refuse_if_driven_elsewhere(recorder.tracker, [job.job_id for job in self.plan.jobs])
        todo: list[JobRun] = []
        for job in self.plan.jobs:
            record = records.get(job.job_id)
            if record is not None and record.status == "FINISHED":
                summary.skipped.append(job)
            else:
                todo.append(JobRun(job=job, graph=self.graph(job)))
        if todo:
            self.backend.start()
        summary.parent_run_id = recorder.begin_launch(len(summary.skipped))
        recorder.claim_stale_runs([run.job.job_id for run in todo])
        self.progress.start(len(self.plan.jobs), len(summary.skipped))
        try:
            if todo:
                self._add_jobs(todo)
                self._loop(todo, summary)
        except BaseException:
            recorder.abort_launch(todo)
            raise
        finally:
            self.progress.stop()
        summary.seconds = time.time() - started
        recorder.end_launch(summary, self._timeline())
        return summary

    def graph(self, job: Job) -> JobGraph:
        from boltzgen.pipeline import job_graph

        return job_graph(job.config_dict, job.job_id, self.work_dir,
                         self.fault.checkpoint_every)

    def _add_jobs(self, runs: list[JobRun]) -> None:
        """Register every job's tasks (one state per content key), take cached outputs, queue
        the tasks whose inputs are done."""
        for run in runs:
            for spec in run.graph.tasks:
                state = self.states.get(spec.key)
                if state is None:
                    state = self.states[spec.key] = TaskState(spec=spec)
                    state.waiting_on = set(spec.input_keys())
                    for key in state.waiting_on:
                        self.states[key].dependents.append(spec.key)
                state.jobs.append(run)
        for key, state in self.states.items():
            found, value = (load_cached(self.work_dir, key) if state.spec.cache
                            else (False, None))
            if found:
                state.status, state.stored = "done", self.backend.keep(value)
                for run in state.jobs:
                    run.done_keys.add(key)
                    run.tasks.append(TaskRecord(stage=state.spec.stage, enqueued=time.time(),
                                                key=key, cached=True))
        self._skip_unneeded()
        for state in self.states.values():
            state.waiting_on = {k for k in state.waiting_on if self.states[k].status != "done"}
        for state in list(self.states.values()):
            if state.status == "waiting" and not state.waiting_on:
                self._enqueue(state)

    def _skip_unneeded(self) -> None:
        """A task whose every dependent is done (from the cache) and whose output no outcome
        reads is not run (the MD runs of a cached reference)."""
        read = {key for state in self.states.values() for run in state.jobs
                for key in run.graph.outcome_inputs.values()}
        for key, state in reversed(list(self.states.items())):
            if (state.status == "waiting" and key not in read and state.dependents
                    and all(self.states[d].status == "done" for d in state.dependents)):
                state.status = "done"
                for run in state.jobs:
                    run.done_keys.add(key)

    def _loop(self, todo: list[JobRun], summary: LaunchSummary) -> None:
        open_runs = {id(run): run for run in todo}
        self._close_finished(open_runs, summary)
        while open_runs:
            self._dispatch()
            queued = {role for role, queue in self.queues.items() if queue}
            if not self.backend.busy() and not queued:
                raise RuntimeError("no task is queued or running, yet jobs are open: "
                                   "a task graph names an input that no task makes")
            for completion in self.backend.wait(1.0, queued):
                self._complete(completion)
            self._read_progress()
            self._close_finished(open_runs, summary)

    def _close_finished(self, open_runs: dict[int, JobRun], summary: LaunchSummary) -> None:
        for key, run in list(open_runs.items()):
            if run.stage in ("finished", "failed"):
                del open_runs[key]
                (summary.finished if run.stage == "finished" else summary.failed).append(run)
                self.progress.done(run)

    # -- queues ------------------------------------------------------------------------------------
    def _enqueue(self, state: TaskState, retry_of: Call | None = None) -> None:
        """Queue a task (or, for a chunked task, its pieces) for its role."""
        spec = state.spec
        state.status = "queued"
        if retry_of is not None:
            self._push(self._call(state, retry_of.args, retry_of.piece, retry=True), first=True)
            return
        inputs = gather_inputs(spec, {k: self.states[k].stored for k in spec.input_keys()})
        if spec.chunked is None:
            self._push(self._call(state, dict(spec.args), None, inputs=inputs))
            return
        fetched = {name: ([self.backend.fetch(v) for v in value] if isinstance(value, list)
                          else self.backend.fetch(value)) for name, value in inputs.items()}
        pieces = resolve(spec.chunked.split)(**spec.args, **fetched)
        state.pieces_left, state.piece_values = len(pieces), [None] * len(pieces)
        for index, piece in enumerate(pieces):
            self._push(self._call(state, piece, index))

    def _call(self, state: TaskState, args: dict[str, Any], piece: int | None,
              inputs: dict[str, Any] | None = None, retry: bool = False) -> Call:
        spec = state.spec
        record = TaskRecord(stage=spec.stage, enqueued=time.time(), key=spec.key, retry=retry,
                            piece=piece)
        for run in state.jobs:
            run.tasks.append(record)
        progress_file = (str(Path(self.work_dir) / "progress" / f"{spec.key}.json")
                         if spec.stage == "train" else None)
        if inputs is None:
            inputs = ({} if piece is not None else gather_inputs(
                spec, {k: self.states[k].stored for k in spec.input_keys()}))
        call = Call(call_id=next(self._ids), role=spec.role, function=spec.function, args=args,
                    inputs=inputs, energy_pool=spec.energy_pool, progress_file=progress_file,
                    record=record, key=spec.key, piece=piece)
        self.calls[call.call_id] = call
        return call

    def _push(self, call: Call, first: bool = False) -> None:
        priority = self.states[call.key].spec.priority + (10**6 if first else 0)
        heapq.heappush(self.queues.setdefault(call.role, []),
                       (-priority, call.call_id, call))

    def _dispatch(self) -> None:
        for role, queue in self.queues.items():
            while queue and self.backend.can_take(role):
                call = heapq.heappop(queue)[2]
                state = self.states[call.key]
                if state.status in ("failed", "done") or all(
                        run.stage == "failed" for run in state.jobs):
                    continue  # no job is left that needs it
                state.status = "running"
                if not math.isfinite(state.started):
                    state.started = time.time()
                call.record.submitted = time.time()
                node = self.backend.submit(call)
                for run in state.jobs:
                    if run.stage != state.spec.stage and run.stage not in ("finished", "failed"):
                        run.stage = state.spec.stage
                        self.progress.stage(run)
                        self.recorder.set_tags(run, {"stage": run.stage, "node": node})

    # -- results -----------------------------------------------------------------------------------
    def _complete(self, completion: Completion) -> None:
        call = completion.call
        state = self.states[call.key]
        call.record.seen = time.time()
        if completion.status == "lost":
            self._retry(state, call, completion.message, completion.trace)
            return
        if completion.status == "error":
            self._fail_task(state, completion.message, completion.trace)
            return
        timing = completion.timing
        call.record.start, call.record.end = timing["start"], timing["end"]
        call.record.node = timing.get("node", "")
        self.marks["first_task_start"] = min(self.marks.get("first_task_start", math.inf),
                                             timing["start"])
        self.marks["last_task_end"] = max(self.marks.get("last_task_end", 0.0), timing["end"])
        if state.status == "failed":
            return
        try:
            if call.piece is None:
                self._task_done(state, self.backend.keep(completion.value))
            else:
                state.piece_values[call.piece] = completion.value
                state.pieces_left -= 1
                if state.pieces_left == 0:
                    gathered = resolve(state.spec.chunked.gather)(state.piece_values)
                    state.piece_values = []
                    self._task_done(state, self.backend.keep(gathered))
        except Exception as exc:  # an error in the driver's own bookkeeping for this task
            self._fail_task(state, f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def _task_done(self, state: TaskState, stored: Any) -> None:
        spec = state.spec
        state.status, state.stored = "done", stored
        if spec.cache:
            store_cached(self.work_dir, spec.key, self.backend.fetch(stored))
        if math.isfinite(state.started):
            self.durations.setdefault(spec.stage, []).append(time.time() - state.started)
        for run in state.jobs:
            run.done_keys.add(spec.key)
            if spec.stage == "train":
                run.running_note = ""
        for key in state.dependents:
            dependent = self.states[key]
            dependent.waiting_on.discard(spec.key)
            if dependent.status == "waiting" and not dependent.waiting_on:
                self._enqueue(dependent)
        for run in state.jobs:
            if run.stage in ("finished", "failed"):
                continue
            if len(run.done_keys) == len(run.graph.tasks):
                self._finish_job(run)
            else:
                self._note_progress(run)

    def _finish_job(self, run: JobRun) -> None:
        try:
            values = {name: self.backend.fetch(self.states[key].stored)
                      for name, key in run.graph.outcome_inputs.items()}
            outcome = resolve(run.graph.outcome)(**values)
            if run.run_id is None:
                self.recorder.open_job(run)
            run.eta_s = math.nan
            self.recorder.finish_job(run, outcome)
        except Exception as exc:
            self._fail_job(run, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return
        run.stage = "finished"

    def _retry(self, state: TaskState, call: Call, reason: str, trace: str) -> None:
        """Run ``call`` again, first in its queue, while its jobs' retry budgets last."""
        live = [run for run in state.jobs if run.stage != "failed"]
        if not live or state.status == "failed":
            return
        spent = max(run.retries for run in live)
        if spent >= self.fault.job_retries:
            self._fail_task(state, f"{reason}; gave up after {spent} retries "
                            "(fault_tolerance.job_retries)", trace)
            return
        for run in live:
            run.retries += 1
            self.recorder.set_tags(run, {"retries": str(run.retries),
                                         "last_retry_reason": reason})
        self._push(self._call(state, call.args, call.piece, inputs=call.inputs, retry=True),
                   first=True)

    def _fail_task(self, state: TaskState, message: str, trace: str) -> None:
        """A task failed: so does every job that needs it (a shared task names the job it
        failed in, for the others)."""
        if state.status == "failed":
            return
        state.status = "failed"
        first = next((run for run in state.jobs if run.stage != "failed"), None)
        for run in state.jobs:
            if run is first:
                self._fail_job(run, message, trace)
            elif first is not None:
                self._fail_job(run, f"a shared {state.spec.description} failed in job "
                               f"{first.job.job_id} ({state.spec.label or state.spec.stage}): "
                               f"{message}", trace)

    def _fail_job(self, run: JobRun, message: str, trace: str) -> None:
        if run.stage in ("failed", "finished"):
            return
        run.stage, run.error = "failed", message
        self.recorder.fail_job(run, message, trace)

    # -- progress ----------------------------------------------------------------------------------
    def _read_progress(self) -> None:
        """Training steps from the progress files of running trainings."""
        now = time.time()
        for state in self.states.values():
            if state.status != "running" or state.spec.stage != "train":
                continue
            path = Path(self.work_dir) / "progress" / f"{state.spec.key}.json"
            try:
                report = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if report.get("started", 0) < state.started - 5:
                continue  # left by an earlier launch
            step, steps = int(report["step"]), int(report["steps"])
            note = f"train step {step}/{steps}, loss {report['loss']:.4g}"
            for run in state.jobs:
                run.running_note = note
                elapsed = now - state.started
                run.eta_s = self._eta(run, elapsed * (steps - step) / max(step, 1))
                self.progress.update(run)
                if now - run.progress_written > PROGRESS_TAG_EVERY_S:
                    run.progress_written = now
                    self.recorder.set_tags(run, {"progress": run.progress_text()})

    def _note_progress(self, run: JobRun) -> None:
        run.eta_s = self._eta(run, 0.0)
        self.progress.update(run)
        if run.run_id is not None:
            self.recorder.set_tags(run, {"progress": run.progress_text()})
            run.progress_written = time.time()

    def _eta(self, run: JobRun, running_left: float) -> float:
        """Seconds left for ``run``: the running training's projection plus, for each task
        not done and not running, the mean duration of finished tasks of its stage (NaN
        while some stage has none)."""
        left = running_left
        for spec in run.graph.tasks:
            state = self.states[spec.key]
            if spec.key in run.done_keys or (state.status == "running"
                                             and spec.stage == "train"):
                continue
            seen = self.durations.get(spec.stage)
            if not seen:
                return math.nan
            left += sum(seen) / len(seen)
        return left

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


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
