"""A toy kind of job that no file outside the science package and this test knows: three data
tasks shared by every job (fan-out), one task that needs all three (fan-in, cached), a task per
job, and a chunked task over the energy pool. Every run of a task appends a line to
``<work_dir>/runs.log`` so that tests can count them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from boltzgen.pipeline.graph import Chunking, JobGraph, JobOutcome, TaskContext, TaskSpec

MODULE = __name__


def _log(work_dir: str, line: str) -> None:
    with open(Path(work_dir) / "runs.log", "a") as handle:
        handle.write(line + "\n")


def toy_graph(config: dict[str, Any], job_id: str, work_dir: str) -> JobGraph:
    data = [TaskSpec(key=f"data-{i}", role="reference", stage="reference",
                     function=f"{MODULE}:data", args={"i": i, "work_dir": work_dir})
            for i in range(3)]
    combine = TaskSpec(key="combine", role="trainer", stage="train", function=f"{MODULE}:combine",
                       inputs={"parts": tuple(t.key for t in data)}, args={"work_dir": work_dir},
                       cache=True)
    temperature = float(config["temperature"])
    own = TaskSpec(key=f"own-{job_id}", role="sampler", stage="sample", function=f"{MODULE}:own",
                   inputs={"total": combine.key},
                   args={"temperature": temperature, "work_dir": work_dir})
    pieces = TaskSpec(key=f"pieces-{job_id}", role="energy_evaluator", stage="energy",
                      function=f"{MODULE}:piece", inputs={"value": own.key},
                      args={"work_dir": work_dir},
                      chunked=Chunking(split=f"{MODULE}:split", gather=f"{MODULE}:gather"))
    return JobGraph(tasks=(*data, combine, own, pieces), outcome=f"{MODULE}:outcome",
                    outcome_inputs={"value": own.key, "pieces": pieces.key})


def data(ctx: TaskContext, i: int, work_dir: str) -> int:
    _log(work_dir, f"data-{i}")
    return i * i


def combine(ctx: TaskContext, parts: list[int], work_dir: str) -> int:
    _log(work_dir, "combine")
    return sum(parts)  # 0 + 1 + 4


def own(ctx: TaskContext, total: int, temperature: float, work_dir: str) -> float:
    _log(work_dir, f"own-{temperature}")
    if (Path(work_dir) / f"fail-{temperature}").exists():
        raise RuntimeError(f"asked to fail at temperature {temperature}")
    return total * temperature


def split(value: float, work_dir: str) -> list[dict[str, Any]]:
    return [{"x": value + k, "work_dir": work_dir} for k in range(3)]


def piece(ctx: TaskContext, x: float, work_dir: str) -> float:
    _log(work_dir, "piece")
    return 2 * x


def gather(values: list[float]) -> float:
    return float(sum(values))


def outcome(value: float, pieces: float) -> JobOutcome:
    return JobOutcome(metrics={"toy_value": value, "toy_pieces": pieces}, params={})
