"""The free-energy job as a task graph: MD runs (shared by content key) -> reference -> train
-> sample -> energy (in pieces over the energy pool) -> estimate, and the job's outcome.

Content keys: an MD run's key is its MD cache key (system and protocol: jobs whose ladders
share a temperature share the run); every other task's output depends on the whole resolved
configuration (its seed is derived from it, :func:`boltzgen.pipeline.problem.stage_seed`), so
its key hashes the stage name with that configuration. The reference and the trained flow are
cached in the work directory (``tasks/<key>.pkl``): a later launch of a job that failed after
them starts from them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen.pipeline.graph import Chunking, JobGraph, JobOutcome, TaskContext, TaskSpec
from boltzgen.pipeline.problem import InjectedFailure
from boltzgen.settings import JobSettings

MODULE = __name__


def stage_key(stage: str, config: Mapping[str, Any]) -> str:
    """Content key of a stage whose output depends on the whole job configuration."""
    text = json.dumps([stage, config], sort_keys=True, separators=(",", ":"), default=str)
    return f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def job_graph(settings: JobSettings | Mapping[str, Any], job_id: str, work_dir: str | None,
              checkpoint_every: int = 0) -> JobGraph:
    """The tasks of one job (``settings``: typed, or a mapping such as a plan's JSON).
    ``work_dir`` holds MD frames, task outputs, checkpoints and figures (None: no caches,
    figures in a temporary directory per estimate)."""
    from boltzgen.pipeline.energy_backends import ENERGY_BACKENDS
    from boltzgen.pipeline.reference import md_protocol, md_runs

    job = JobSettings.of(settings)
    config = job.dump
    # An MD task gets only what its run depends on (and no torch-laden settings classes).
    md = [TaskSpec(key=f"md-{key}", role="reference", stage="reference",
                   # Its own module: an actor that only runs MD does not import PyTorch for it.
                   function="boltzgen.pipeline.md_task:md_run_task",
                   label=_md_label(protocol), description="MD run",
                   args={"system": config["system"], "protocol": protocol,
                         "platform": job.energy.platform, "work_dir": work_dir})
          for key, temperature in md_runs(job)
          for protocol in [md_protocol(job, temperature)]]
    reference = TaskSpec(
        key=stage_key("reference", config), role="reference", stage="reference",
        function=f"{MODULE}:reference_task", args={"job": job, "work_dir": work_dir},
        inputs={"md_runs": tuple(task.key for task in md)} if md else {}, cache=True,
        # A job whose MD is done goes ahead of queued MD runs: it can train while other
        # jobs' MD goes on (behind them it would wait for every MD run of the plan).
        priority=1, label="reference")
    checkpoints = None if work_dir is None else str(Path(work_dir) / "checkpoints" / job_id)
    train = TaskSpec(
        key=stage_key("train", config), role="trainer", stage="train",
        function=f"{MODULE}:train_task", cache=True,
        # A data-free job trains beside its reference (used by the evaluation alone).
        inputs={} if trains_without_reference(job) else {"reference": reference.key},
        args={"job": job, "checkpoint_dir": checkpoints,
              "checkpoint_every": checkpoint_every},
        energy_pool=ENERGY_BACKENDS.get(job.energy.backend).pooled_in_training,
        label="train")
    sample = TaskSpec(
        key=stage_key("sample", config), role="sampler", stage="sample",
        function=f"{MODULE}:sample_task", args={"job": job},
        inputs={"trained": train.key, "reference": reference.key}, label="sample")
    energy = TaskSpec(
        key=stage_key("energy", config), role="energy_evaluator", stage="energy",
        function=f"{MODULE}:energy_piece_task", args={"job": job},
        inputs={"samples": sample.key}, label="energy",
        chunked=Chunking(split=f"{MODULE}:energy_pieces", gather=f"{MODULE}:gather_energies"))
    plots = None if work_dir is None else str(Path(work_dir) / "plots" / job_id)
    estimate = TaskSpec(
        key=stage_key("estimate", config), role="sampler", stage="estimate",
        function=f"{MODULE}:estimate_task", args={"job": job, "plot_dir": plots},
        inputs={"reference": reference.key, "samples": sample.key, "potentials": energy.key},
        label="estimate")
    return JobGraph(
        tasks=(*md, reference, train, sample, energy, estimate),
        outcome=f"{MODULE}:job_outcome",
        outcome_inputs={"reference": reference.key, "trained": train.key,
                        "samples": sample.key, "report": estimate.key})


def trains_without_reference(job: JobSettings) -> bool:
    """Whether training needs nothing of the job's reference: an objective that trains on no
    target samples, from a base the flow samples itself (a data-free job)."""
    from boltzgen.bases import BASES
    from boltzgen.objectives import OBJECTIVES

    return (not OBJECTIVES.get(job.training.objective).needs_target_data(job.training)
            and BASES.get(job.base.kind).samples_directly)


def _md_label(protocol: Any) -> str:
    """"MD 300.0 K", or for replica exchange "MD 300.0 K (replica exchange to 600 K)"."""
    ladder = protocol.replica_temperatures
    return f"MD {protocol.temperature:.1f} K" + (
        f" (replica exchange to {max(ladder):g} K)" if ladder else "")


# -- task functions: (ctx, **args, **inputs) ----------------------------------------------------

def reference_task(ctx: TaskContext, job: JobSettings, work_dir: str | None,
                   md_runs: Sequence[float] = ()) -> Any:
    """Reference data and ΔF (its MD runs, if any, are in the cache by now)."""
    from boltzgen.pipeline.reference import run_reference

    return run_reference(job, work_dir, ctx.threads)


def train_task(ctx: TaskContext, job: JobSettings, checkpoint_dir: str | None,
               checkpoint_every: int, reference: Any = None) -> Any:
    """Fit the flow; energies by ``ctx.energy`` where the executor gave the energy pool
    (``reference``: None for a data-free job, which trains without it)."""
    from boltzgen.pipeline.flow_training import train

    if job.inject_failure == "trainer_process_exit":
        # Die as a killed process would: only an executor whose tasks run in processes of
        # their own (Ray actors) can show how the campaign survives it.
        if ctx.end_process is None:
            raise InjectedFailure("inject_failure 'trainer_process_exit' needs a backend whose "
                                  "tasks run in their own processes (--backend ray)")
        ctx.end_process()

    def report(step: int, steps: int, loss: float) -> None:
        ctx.report(step=step, steps=steps, loss=loss)

    trained = train(job, reference, ctx.device, checkpoint_dir, ctx.energy,
                    checkpoint_every, on_step=report)
    # An energy function over a pool of workers counts the chunks it sent again after a
    # worker died (``resent``); energies computed here have none.
    trained.energy_chunks_resent = int(getattr(ctx.energy, "resent", 0))
    return trained


def sample_task(ctx: TaskContext, job: JobSettings, trained: Any, reference: Any) -> Any:
    from boltzgen.pipeline.sampling import sample

    return sample(job, trained, reference, device=ctx.device)


def energy_function(ctx: TaskContext, settings: JobSettings | Mapping[str, Any]) -> Any:
    """The job's batch energy function, built once per process and system/backend (an
    OpenMM Context per actor)."""
    from boltzgen.pipeline.energies import make_energy_function

    job = JobSettings.of(settings)
    key = json.dumps(["energy", job.dump["system"], job.dump["energy"]], sort_keys=True)
    return ctx.remember(key, lambda: make_energy_function(job, ctx.threads))


def energy_pieces(job: JobSettings, samples: Any) -> list[dict[str, Any]]:
    """The energy stage's pieces: every requested set of coordinates in chunks of
    ``sampling.energy_batch_size`` rows."""
    from boltzgen.pipeline.sampling import energy_requests

    batch = job.sampling.energy_batch_size
    pieces = []
    for name, coords in energy_requests(samples).items():
        chunks = [coords[i:i + batch] for i in range(0, len(coords), batch)] or [coords]
        pieces += [{"job": job, "name": name, "x": chunk} for chunk in chunks]
    return pieces


def energy_piece_task(ctx: TaskContext, job: JobSettings, name: str,
                      x: np.ndarray) -> tuple[str, np.ndarray]:
    """U (energy units) of one chunk of the coordinates called ``name``."""
    from boltzgen.pipeline.energies import potential_energy

    return name, potential_energy(job, x, energy_function(ctx, job))


def gather_energies(pieces: Sequence[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for name, values in pieces:
        parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def estimate_task(ctx: TaskContext, job: JobSettings, reference: Any, samples: Any,
                  potentials: Mapping[str, np.ndarray], plot_dir: str | None) -> Any:
    """Estimates and figures (PNG files in ``plot_dir``, for the driver to log)."""
    import tempfile

    from boltzgen.pipeline.estimate_report import estimate_and_plot

    plot_dir = plot_dir or tempfile.mkdtemp(prefix="boltzgen-plots-")
    return estimate_and_plot(job, reference, samples, potentials, plot_dir)


# -- the outcome ----------------------------------------------------------------------------------

def job_outcome(reference: Any, trained: Any, samples: Any, report: Any) -> JobOutcome:
    """What a finished job records: the estimates, how training went, the energy evaluations,
    the notes that say what each number means, the checkpoint, the works and the figures."""
    from boltzgen.pipeline.sampling import energy_requests

    metrics = dict(report.metrics)
    metrics["train_skipped_steps"] = trained.skipped_steps
    metrics["train_resumed_from_step"] = trained.resumed_from_step
    metrics["train_steps_run"] = trained.steps_run
    metrics["train_energy_chunks_resent"] = trained.energy_chunks_resent
    metrics["flow_parameters"] = trained.n_parameters
    # Configurations whose system energy was computed (OpenMM for molecular systems):
    # in training, and in the energy stage (mapped samples and pulled-back targets).
    estimate_evaluations = sum(len(v) for v in energy_requests(samples).values())
    metrics["energy_evaluations_train"] = trained.energy_evaluations
    metrics["energy_evaluations_estimate"] = estimate_evaluations
    metrics["energy_evaluations"] = trained.energy_evaluations + estimate_evaluations
    # CPU-seconds of the trainer's process (all its threads; energies computed by evaluator
    # actors elsewhere are not in it): the cost of data-free training beside MD's. (getattr:
    # a TrainedFlow cached in a work directory by an older version lacks the newer fields.)
    metrics["time_train_cpu_seconds"] = getattr(trained, "cpu_seconds", math.nan)
    metrics.update(getattr(trained, "summary", {}))  # e.g. the beta a tempering schedule reached
    params = {
        **report.notes,
        "reference_ladder": ",".join(f"{t:.6g}" for t in reference.ladder),
        **({"checkpoint_path": trained.checkpoint_path} if trained.checkpoint_path else {}),
    }
    blobs = {"checkpoint/flow.pt": trained.checkpoint}
    if report.works:
        buffer = io.BytesIO()
        np.savez(buffer, **report.works)
        blobs["works.npz"] = buffer.getvalue()
    series = {"train_loss": trained.losses, **getattr(trained, "series", {})}
    if series.get("tempering_beta"):
        from boltzgen.plots import tempering_schedule

        buffer = io.BytesIO()
        tempering_schedule(series).savefig(buffer, format="png")
        blobs["plots/tempering_schedule.png"] = buffer.getvalue()
    return JobOutcome(metrics=metrics, params=params, series=series,
                      blobs=blobs, files={"plots": list(report.plots.values())})


def valid_estimate(outcome: JobOutcome) -> bool:
    return math.isfinite(outcome.metrics.get("delta_f", math.nan))

