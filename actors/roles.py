"""The four actor roles of a campaign.

Every stage method returns ``(result, timing)`` where ``timing`` holds the wall-clock
``start``/``end`` (``time.time()``, seconds) of the work inside the actor, so that the driver can
tell compute time from orchestration time. Actors keep no job state between calls: a restarted
actor (which re-runs ``__init__``) loses nothing.
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
        self.gpus = gpus

    def ready(self) -> dict[str, Any]:
        """Called once by the driver: the actor is constructed and its imports are done."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "threads": self.threads,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    @staticmethod
    def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, Timing]:
        start = time.time()
        result = fn(*args)
        return result, {"start": start, "end": time.time()}


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
              checkpoint_dir: str | None = None, evaluators: list[Any] | None = None
              ) -> tuple[pipeline.TrainedFlow, Timing]:
        """``evaluators``: EnergyEvaluator actors that compute every training energy (each
        batch split evenly over them); without them the system's potential runs here."""
        # Ray sets CUDA_VISIBLE_DEVICES for an actor that holds GPUs; one that asked for none
        # trains on the CPU even where Ray leaves GPUs visible (Ray >= 2.60).
        device = "cuda" if self.gpus > 0 and torch.cuda.is_available() else "cpu"
        energy = pooled_energy(config, evaluators) if evaluators else None
        return self._timed(pipeline.train, config, reference, device, checkpoint_dir, energy)


def pooled_energy(config: Mapping[str, Any], evaluators: list[Any]) -> pipeline.EnergyFunction:
    """A batch energy function x -> (U, ∇U) that splits x evenly over ``evaluators`` (Ray
    handles of EnergyEvaluatorActor) and gathers their answers in order."""

    def energy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chunks = [c for c in np.array_split(x, min(len(evaluators), len(x))) if len(c)]
        refs = [ev.energies_and_forces.remote(config, chunk)
                for ev, chunk in zip(evaluators, chunks, strict=False)]
        parts = [value for value, _timing in ray.get(refs)]
        return (np.concatenate([u for u, _ in parts]), np.concatenate([g for _, g in parts]))

    return energy


class SamplerActor(_StageWorker):
    """Draws base samples, maps them through a trained flow, and pulls target samples back."""

    def sample(self, config: Mapping[str, Any], trained: pipeline.TrainedFlow,
               reference: pipeline.ReferenceData) -> tuple[pipeline.SampleSet, Timing]:
        return self._timed(pipeline.sample, config, trained, reference)


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


def make_actor(role: str, cpus: float, gpus: float, name: str | None = None) -> Any:
    """Create one Ray actor of ``role`` holding ``cpus`` CPUs and ``gpus`` GPUs."""
    cls = ROLE_CLASSES[role]
    remote_cls = ray.remote(cls)
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if name:
        options["name"] = name
    return remote_cls.options(**options).remote(cpus=cpus, gpus=gpus)
