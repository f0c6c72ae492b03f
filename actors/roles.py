"""The actor roles of a campaign: Ray actors that run any task of a job's graph.

``run_task`` runs one task (or one piece of a chunked task) and returns ``(output, timing)``,
where ``timing`` holds the wall-clock ``start``/``end`` (``time.time()``, seconds) of the work
inside the actor, so that the driver can tell compute time from orchestration time, and the
Ray ``node`` id, host and pid that did it. The task's function is imported where it runs, at
its first use: a process imports only what its tasks need.

Actors keep no job state between calls: a restarted actor (which re-runs ``__init__``) loses
nothing but its memo (OpenMM Contexts, rebuilt on use); a trainer's progress lives in
checkpoint files in the work directory.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray

from actors.progress import ProgressFile

Timing = dict[str, Any]


class TaskWorker:
    """One worker of a role: CPU threads (torch, OpenMM) equal to the CPUs Ray gave it."""

    def __init__(self, cpus: float = 1.0, gpus: float = 0.0) -> None:
        self.threads = max(1, math.ceil(cpus))
        os.environ["OMP_NUM_THREADS"] = str(self.threads)
        # OpenMM's CPU PME kernels ignore the platform's Threads property and start one
        # thread per core of the machine unless this is set (read at the first PME Context):
        # two MD actors on 2 cores then ran 2 x 3 threads, 30 % of the time in the kernel.
        os.environ["OPENMM_CPU_THREADS"] = str(self.threads)
        self.gpus = gpus
        self.memo: dict[str, Any] = {}  # per process: e.g. an OpenMM Context per system

    def ready(self) -> dict[str, Any]:
        """Called by the driver when the actor starts or restarts: it is constructed and its
        imports are done."""
        return {**_where(), "threads": self.threads,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def run_task(self, function: str, args: Mapping[str, Any], inputs: Mapping[str, Any],
                 evaluators: list[Any] | None = None, progress_file: str | None = None
                 ) -> tuple[Any, Timing]:
        """``function(ctx, **args, **inputs)``. ``evaluators``: EnergyEvaluator actors that
        compute every energy the task needs (each batch split evenly over them);
        ``progress_file``: where the task's progress reports go (JSON, for the driver)."""
        from boltzgen.pipeline.graph import TaskContext, call_task

        # Inputs arrive as object refs in the driver's store (a fan-in as a list of them).
        inputs = {name: _fetched(value) for name, value in inputs.items()}
        energy = PooledEnergy(args["job"], evaluators) if evaluators else None
        ctx = TaskContext(threads=self.threads, device=self._device(), energy=energy,
                          memo=self.memo, end_process=_end_process,
                          progress=ProgressFile(progress_file) if progress_file else None)
        if "torch" in sys.modules:  # the torch intra-op pool of this actor's CPUs only
            sys.modules["torch"].set_num_threads(self.threads)
        start = time.time()
        value = call_task(ctx, function, {**args, **inputs})
        return value, {"start": start, "end": time.time(), **_where()}

    def energies_and_forces(self, job: Any, x: np.ndarray
                            ) -> tuple[tuple[np.ndarray, np.ndarray], Timing]:
        """(U (B,), ∇U (B, dim)) in the system's energy units per flow coordinate: a chunk of
        a trainer's batch (:class:`PooledEnergy`)."""
        from boltzgen.pipeline.graph import TaskContext
        from boltzgen.pipeline.job import energy_function

        ctx = TaskContext(threads=self.threads, memo=self.memo)
        start = time.time()
        value = energy_function(ctx, job)(x)
        return value, {"start": start, "end": time.time(), **_where()}

    def _device(self) -> str:
        # Ray sets CUDA_VISIBLE_DEVICES for an actor that holds GPUs; one that asked for none
        # runs on the CPU even where Ray leaves GPUs visible (Ray >= 2.60).
        if self.gpus <= 0:
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _fetched(value: Any) -> Any:
    if isinstance(value, ray.ObjectRef):
        return ray.get(value)
    if isinstance(value, list):
        return [_fetched(item) for item in value]
    return value


def _end_process() -> None:
    """Die as a killed process would (no exception reaches Ray): Ray restarts the actor and
    the driver retries the task, until the job's retry budget is spent."""
    os._exit(1)


def _where() -> dict[str, Any]:
    """The Ray node, host and process this code runs in."""
    return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid()}


class PooledEnergy:
    """A batch energy function x -> (U, ∇U) that splits x evenly over ``evaluators`` (Ray
    handles of energy-evaluator actors) and gathers their answers in order.

    A chunk whose evaluator died is evaluated again on one that still answers (energies are
    pure functions; ``resent`` counts such chunks); the dead one is left out of later batches
    (Ray restarts it for the driver's later work). Only when every evaluator is gone does the
    call fail.
    """

    def __init__(self, job: Any, evaluators: list[Any]) -> None:
        self.job = job  # the science's job settings, from which each evaluator builds U
        self.evaluators = evaluators
        self.dead: set[int] = set()
        self.resent = 0

    def _live(self) -> list[int]:
        return [i for i in range(len(self.evaluators)) if i not in self.dead]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        live = self._live()
        if not live:
            raise RuntimeError("every EnergyEvaluator this trainer was given has died")
        chunks = [c for c in np.array_split(x, min(len(live), len(x))) if len(c)]
        owners = live[:len(chunks)]
        refs = [self.evaluators[i].energies_and_forces.remote(self.job, c)
                for i, c in zip(owners, chunks, strict=True)]
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for index, chunk in enumerate(chunks):
            while True:
                try:
                    value, _timing = ray.get(refs[index])
                    break
                except ray.exceptions.RayActorError:
                    self.dead.add(owners[index])
                    live = self._live()
                    if not live:
                        raise
                    owners[index] = live[index % len(live)]
                    refs[index] = self.evaluators[owners[index]].energies_and_forces.remote(
                        self.job, chunk)
                    self.resent += 1
            parts.append(value)
        return (np.concatenate([u for u, _ in parts]), np.concatenate([g for _, g in parts]))


class ReferenceSamplerActor(TaskWorker):
    """Reference data: MD runs, replica-exchange MCMC, exact sampling, the reference ΔF."""


class TrainerActor(TaskWorker):
    """Fits flows (PyTorch; CUDA when it holds a GPU)."""


class SamplerActor(TaskWorker):
    """Draws samples from trained flows; turns pooled energies into estimates and figures."""


class EnergyEvaluatorActor(TaskWorker):
    """Potential energies and forces of batches of configurations (one of a pool), with its
    energy functions (an OpenMM Context for the OpenMM backend) built once and kept."""


ROLE_CLASSES: dict[str, type[TaskWorker]] = {
    "reference": ReferenceSamplerActor,
    "trainer": TrainerActor,
    "sampler": SamplerActor,
    "energy_evaluator": EnergyEvaluatorActor,
}


def make_actor(role: str, cpus: float, gpus: float, name: str | None = None,
               max_restarts: int = 0) -> Any:
    """Create one Ray actor of ``role`` holding ``cpus`` CPUs and ``gpus`` GPUs.

    ``max_restarts``: times Ray restarts the actor after its process or node died (on any node
    with room). A call in flight then is not re-run by Ray (``max_task_retries`` 0): a call
    queued for an actor whose node is gone would wait for a restart that may never find room,
    so callers re-send it to a live actor. Actors of a role are spread over the cluster's
    nodes, so that losing one node leaves every role with actors elsewhere.
    """
    cls = ROLE_CLASSES[role]
    remote_cls = ray.remote(cls)
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus,
                               "max_restarts": max_restarts, "max_task_retries": 0,
                               "scheduling_strategy": "SPREAD"}
    if name:
        options["name"] = name
    return remote_cls.options(**options).remote(cpus=cpus, gpus=gpus)
