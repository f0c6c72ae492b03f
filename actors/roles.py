"""The four actor roles of a campaign.

Every stage method returns ``(result, timing)`` where ``timing`` holds the wall-clock
``start``/``end`` (``time.time()``, seconds) of the work inside the actor, so that the driver can
tell compute time from orchestration time, and the Ray ``node`` id, host and pid that did it.
Actors keep no job state between calls: a restarted actor (which re-runs ``__init__``) loses
nothing; a trainer's progress lives in checkpoint files in the work directory.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import ray
import torch

from boltzgen import pipeline

Timing = dict[str, float]


class _StageWorker:
    """Common set-up: torch threads equal to the CPUs Ray gave this actor."""

    def __init__(self, cpus: float = 1.0, gpus: float = 0.0) -> None:
        self.threads = max(1, math.ceil(cpus))
        torch.set_num_threads(self.threads)
        os.environ["OMP_NUM_THREADS"] = str(self.threads)
        # OpenMM's CPU PME kernels ignore the platform's Threads property and start one
        # thread per core of the machine unless this is set (read at the first PME Context):
        # two MD actors on 2 cores then ran 2 x 3 threads, 30 % of the time in the kernel.
        os.environ["OPENMM_CPU_THREADS"] = str(self.threads)
        self.gpus = gpus

    def ready(self) -> dict[str, Any]:
        """Called by the driver when the actor starts or restarts: it is constructed and its
        imports are done."""
        return {**_where(), "threads": self.threads,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    @staticmethod
    def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, Timing]:
        start = time.time()
        result = fn(*args)
        return result, {"start": start, "end": time.time(), **_where()}


def _where() -> dict[str, Any]:
    """The Ray node, host and process this code runs in."""
    return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid()}


class McmcActor(_StageWorker):
    """Reference data: replica-exchange MCMC or OpenMM MD over a temperature ladder, and the
    MBAR (or exact) reference ΔF."""

    def run_md(self, config: Mapping[str, Any], temperature: float, work_dir: str
               ) -> tuple[float, Timing]:
        """One MD run of a job's ladder into the cache (seconds it took; 0 if cached)."""
        return self._timed(pipeline.run_md_rung, config, temperature, work_dir, self.threads)

    def run_reference(self, config: Mapping[str, Any], work_dir: str | None = None
                      ) -> tuple[pipeline.ReferenceData, Timing]:
        return self._timed(pipeline.run_reference, config, work_dir, self.threads)


class TrainerActor(_StageWorker):
    """Fits a flow (PyTorch)."""

    def train(self, config: Mapping[str, Any], reference: pipeline.ReferenceData,
              checkpoint_dir: str | None = None, evaluators: list[Any] | None = None,
              checkpoint_every: int = 0) -> tuple[pipeline.TrainedFlow, Timing]:
        """``evaluators``: EnergyEvaluator actors that compute every training energy (each
        batch split evenly over them); without them the system's potential runs here.
        Progress is saved to ``checkpoint_dir`` every ``checkpoint_every`` steps and picked up
        again by the next call for the same job (after this actor died, or the driver)."""
        # Ray sets CUDA_VISIBLE_DEVICES for an actor that holds GPUs; one that asked for none
        # trains on the CPU even where Ray leaves GPUs visible (Ray >= 2.60).
        device = "cuda" if self.gpus > 0 and torch.cuda.is_available() else "cpu"
        if config.get("inject_failure") == "trainer_process_exit":
            # Die as a killed process would (no exception reaches Ray): Ray restarts the actor
            # and the driver retries the job's task, until the retry budget is spent.
            os._exit(1)
        energy = PooledEnergy(config, evaluators) if evaluators else None
        trained, timing = self._timed(pipeline.train, config, reference, device, checkpoint_dir,
                                      energy, checkpoint_every)
        # Chunks re-sent in this call (a trainer restarted after its own death starts at 0).
        trained.energy_chunks_resent = energy.resent if energy else 0
        return trained, timing


class PooledEnergy:
    """A batch energy function x -> (U, ∇U) that splits x evenly over ``evaluators`` (Ray
    handles of EnergyEvaluatorActor) and gathers their answers in order.

    A chunk whose evaluator died is evaluated again on one that still answers (energies are
    pure functions; ``resent`` counts such chunks); the dead one is left out of later batches
    (Ray restarts it for the driver's later work). Only when every evaluator is gone does the
    call fail.
    """

    def __init__(self, config: Mapping[str, Any], evaluators: list[Any]) -> None:
        self.config = config
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
        refs = [self.evaluators[i].energies_and_forces.remote(self.config, c)
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
                        self.config, chunk)
                    self.resent += 1
            parts.append(value)
        return (np.concatenate([u for u, _ in parts]), np.concatenate([g for _, g in parts]))


class SamplerActor(_StageWorker):
    """Draws base samples, maps them through a trained flow, and pulls target samples back;
    then turns the pooled energies into estimates and figures."""

    def sample(self, config: Mapping[str, Any], trained: pipeline.TrainedFlow,
               reference: pipeline.ReferenceData) -> tuple[pipeline.SampleSet, Timing]:
        return self._timed(pipeline.sample, config, trained, reference)

    def estimate(self, config: Mapping[str, Any], reference: pipeline.ReferenceData,
                 samples: pipeline.SampleSet, potentials: Mapping[str, np.ndarray],
                 plot_dir: str) -> tuple[pipeline.EstimateReport, Timing]:
        """ΔF estimates, ESS and diagnostics from the pooled energies; figures written as PNG
        files to ``plot_dir`` (in the work directory, for the driver to log)."""
        return self._timed(pipeline.estimate_and_plot, config, reference, samples, potentials,
                           plot_dir)


class EnergyEvaluatorActor(_StageWorker):
    """Potential energies and forces of batches of configurations (one of a pool).

    Owns its energy functions (an OpenMM Context for the OpenMM backend), built once per
    system/backend and kept for later batches.
    """

    def __init__(self, cpus: float = 1.0, gpus: float = 0.0) -> None:
        super().__init__(cpus, gpus)
        self._functions: dict[str, pipeline.EnergyFunction] = {}

    def _function(self, config: Mapping[str, Any]) -> pipeline.EnergyFunction:
        key = json.dumps([config["system"], config.get("energy")], sort_keys=True)
        if key not in self._functions:
            self._functions[key] = pipeline.make_energy_function(config, self.threads)
        return self._functions[key]

    def potential(self, config: Mapping[str, Any], x: np.ndarray) -> tuple[np.ndarray, Timing]:
        return self._timed(pipeline.potential_energy, config, x, self._function(config))

    def energies_and_forces(self, config: Mapping[str, Any], x: np.ndarray
                            ) -> tuple[tuple[np.ndarray, np.ndarray], Timing]:
        """(U (B,), ∇U (B, dim)) in the system's energy units per flow coordinate."""
        return self._timed(self._function(config), x)


ROLE_CLASSES: dict[str, type[_StageWorker]] = {
    "mcmc": McmcActor,
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
