"""A job as a small graph of tasks, declared by the science and run by any executor.

A :class:`TaskSpec` names the actor role that runs it, the function (``"module:name"``, resolved
where it runs, so that a process imports only what its tasks need), plain keyword arguments,
its inputs (other tasks' outputs, by content key) and its **content key**: a hash of exactly
what determines its output. Two tasks with the same key are the same task: an executor runs it
once and hands its output to every task and job that needs it (fan-out); a task may take a
tuple of keys as one input, which arrives as a list of outputs (fan-in). A ``cache`` task's
output is written to ``<work_dir>/tasks/<key>.pkl`` when it is done and read back by later
launches instead of running again.

A ``chunked`` task runs as many pieces: ``split`` turns its inputs into a list of keyword
mappings (one per piece, run on the task's role, e.g. the EnergyEvaluator pool) and ``gather``
turns the pieces' outputs, in order, into the task's output.

Every task function takes a :class:`TaskContext` first: the CPU threads and device its process
holds, an energy function where the task asked for the energy pool, a per-process memo (an
OpenMM Context built once per actor), and a progress callback.

:func:`run_job` runs one job's graph in this process, in order: the notebook path.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boltzgen._files import write_atomically

EnergyFunction = Callable[[Any], tuple[Any, Any]]


@dataclass(frozen=True)
class Chunking:
    """How a task runs as pieces: ``split(**args, **inputs) -> [kwargs, ...]`` (each piece
    is ``function(ctx, **kwargs)``), ``gather(outputs) -> output``; both ``module:name``."""

    split: str
    gather: str


@dataclass(frozen=True)
class TaskSpec:
    """One task of a job's graph (see the module docstring)."""

    key: str
    role: str
    stage: str  # what the task is part of, for progress and records: reference, train, ...
    function: str  # "module:name", called as function(ctx, **args, **inputs)
    args: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    cache: bool = False
    chunked: Chunking | None = None
    # The task's energies go to the energy-evaluator role's actors, which build the energy
    # function from the task's argument ``job`` (:func:`boltzgen.pipeline.job.energy_function`).
    energy_pool: bool = False
    priority: int = 0  # higher runs first among queued tasks of its role
    label: str = ""  # e.g. "MD 150.0 K", for progress displays
    description: str = "task"  # what it is, in messages ("a shared MD run failed in job ...")

    def input_keys(self) -> list[str]:
        keys: list[str] = []
        for value in self.inputs.values():
            keys.extend(value if isinstance(value, tuple) else (value,))
        return keys


@dataclass(frozen=True)
class JobGraph:
    """The tasks of one job (inputs before the tasks that need them) and how its record is
    made: ``outcome`` (``module:name``) called in the driver as ``outcome(**{name: output of
    outcome_inputs[name]})`` returns a :class:`JobOutcome`."""

    tasks: tuple[TaskSpec, ...]
    outcome: str
    outcome_inputs: Mapping[str, str]

    def task(self, key: str) -> TaskSpec:
        return next(t for t in self.tasks if t.key == key)


@dataclass
class JobOutcome:
    """What a finished job records: metrics (numbers), params (strings), series (a metric by
    step), blobs (artifact path -> bytes) and files (artifact directory -> local paths)."""

    metrics: dict[str, float]
    params: dict[str, str]
    series: dict[str, list[float]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class TaskContext:
    """What the process that runs a task gives it."""

    threads: int = 1
    device: str = "cpu"
    energy: EnergyFunction | None = None  # set for ``energy_pool`` tasks by the executor
    memo: dict[str, Any] = field(default_factory=dict)  # lives as long as the process
    progress: Callable[[dict[str, Any]], None] | None = None
    # Ends the process as a kill would (a Ray actor's); None where tasks share the driver's.
    end_process: Callable[[], None] | None = None

    def remember(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per process and key (e.g. an OpenMM Context per system)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def report(self, **progress: Any) -> None:
        if self.progress is not None:
            self.progress(progress)


def resolve(name: str) -> Callable[..., Any]:
    """The function ``module:name``, imported on first use."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


def call_task(ctx: TaskContext, function: str, kwargs: Mapping[str, Any]) -> Any:
    return resolve(function)(ctx, **kwargs)


def cache_path(work_dir: str | Path, key: str) -> Path:
    return Path(work_dir) / "tasks" / f"{key}.pkl"


def load_cached(work_dir: str | Path | None, key: str) -> tuple[bool, Any]:
    """(True, output) if a finished task's output is in the cache, else (False, None)."""
    if work_dir is None:
        return False, None
    path = cache_path(work_dir, key)
    if not path.is_file():
        return False, None
    with path.open("rb") as handle:
        return True, pickle.load(handle)


def store_cached(work_dir: str | Path | None, key: str, output: Any) -> None:
    """Write a task's output to the cache atomically (a reader never sees half of it)."""
    if work_dir is None:
        return
    write_atomically(cache_path(work_dir, key), lambda staging: staging.write_bytes(
        pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL)))


def run_task_here(ctx: TaskContext, task: TaskSpec, inputs: Mapping[str, Any]) -> Any:
    """Run ``task`` in this process with its inputs' outputs given by name (pieces of a
    chunked task one after another)."""
    kwargs = {**task.args, **inputs}
    if task.chunked is None:
        return call_task(ctx, task.function, kwargs)
    pieces = resolve(task.chunked.split)(**kwargs)
    return resolve(task.chunked.gather)([call_task(ctx, task.function, piece)
                                         for piece in pieces])


def gather_inputs(task: TaskSpec, outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The task's inputs by name from the outputs by key (a tuple of keys gives a list)."""
    return {name: ([outputs[k] for k in key] if isinstance(key, tuple) else outputs[key])
            for name, key in task.inputs.items()}


def run_job(graph: JobGraph, ctx: TaskContext | None = None,
            work_dir: str | None = None) -> JobOutcome:
    """Run every task of ``graph`` in this process (reusing and filling the task cache under
    ``work_dir``), then make the job's outcome."""
    ctx = ctx or TaskContext()
    outputs: dict[str, Any] = {}
    for task in topological(graph.tasks):
        found, value = load_cached(work_dir, task.key) if task.cache else (False, None)
        if not found:
            value = run_task_here(ctx, task, gather_inputs(task, outputs))
            if task.cache:
                store_cached(work_dir, task.key, value)
        outputs[task.key] = value
    return resolve(graph.outcome)(**{name: outputs[key]
                                     for name, key in graph.outcome_inputs.items()})


def topological(tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    """Tasks ordered so that each comes after its inputs (a ValueError names a cycle or a
    missing input)."""
    by_key = {task.key: task for task in tasks}
    done: set[str] = set()
    order: list[TaskSpec] = []
    visiting: set[str] = set()

    def visit(task: TaskSpec) -> None:
        if task.key in done:
            return
        if task.key in visiting:
            raise ValueError(f"tasks: a cycle through task {task.key}")
        visiting.add(task.key)
        for key in task.input_keys():
            if key not in by_key:
                raise ValueError(f"tasks: task {task.key} needs {key}, which no task makes")
            visit(by_key[key])
        visiting.discard(task.key)
        done.add(task.key)
        order.append(task)

    for task in tasks:
        visit(task)
    return order
