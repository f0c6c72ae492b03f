"""What every stage shares: the job's problem (system, target, base), its seeds, injected
failures, and the batch energy function type."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from boltzgen.bases import BASES, Base
from boltzgen.flows import Flow, build_flow
from boltzgen.settings import FlowSettings, JobSettings, ReferenceSettings
from boltzgen.systems import System, make_system

EnergyFunction = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""x (B, dim) flow coordinates -> (U (B,) energy units, ∇U (B, dim))."""


class InjectedFailure(RuntimeError):
    """Raised on purpose when a job's ``inject_failure`` names the running stage."""


def check_injected_failure(job: JobSettings, stage: str) -> None:
    if job.inject_failure == stage:
        raise InjectedFailure(f"failure injected on purpose in stage '{stage}' (inject_failure)")


def stage_seed(job: JobSettings, stage: str) -> int:
    """A seed per (job settings, stage): reproducible, independent across jobs and stages."""
    return seed_of(f"{json.dumps(job.dump, sort_keys=True, default=str)}|{stage}")


def seed_of(text: str) -> int:
    """A 31-bit seed from the sha256 of ``text`` (the same on every machine)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class Problem:
    """System, target temperature and base state of one job."""

    system: System
    temperature: float
    base: Base

    @classmethod
    def from_settings(cls, settings: JobSettings | Mapping[str, Any]) -> Problem:
        """The job's system, its target temperature and its registered base
        (:data:`boltzgen.bases.BASES`)."""
        job = JobSettings.of(settings)
        system = make_system(job.dump["system"])
        system.set_openmm_platform(job.energy.platform)
        base = BASES.get(job.base.kind).from_settings(job, system)
        return cls(system=system, temperature=float(job.temperature), base=base)

    @property
    def kt(self) -> float:
        """k_B T of the target in the system's energy units."""
        return self.system.boltzmann_constant * self.temperature

    def ladder(self, reference: ReferenceSettings) -> np.ndarray:
        """Temperatures of the replica-exchange ladder, ascending: between the target and a
        base at another temperature, else from the target up by ``hot_temperature_factor``."""
        k = reference.ladder_size
        if self.base.temperature_ladder:
            ends = (self.temperature, self.base.temperature)
        else:
            ends = (self.temperature, self.temperature * reference.hot_temperature_factor)
        return np.sort(np.geomspace(ends[0], ends[1], k)) if k > 1 else np.array([ends[0]])

    def estimand(self) -> str:
        if self.base.temperature_ladder:
            return (
                f"f(T={self.temperature:g}) - f(T_A={self.base.temperature:g}) in kT, "
                f"f = -ln Z; {self.system.estimand_note}"
            )
        return (
            f"-ln Z at T={self.temperature:g} in kT (f of the normalized "
            f"{self.base.description} base is 0); "
            f"{self.system.estimand_note}"
        )

    def build_flow(self, flow: FlowSettings) -> Flow:
        """The flow for the system's layout; with a base that has a normalized density it
        samples directly (normal, uniform), the flow's prior is that base's density, so that
        the flow samples and scores A itself. A flow that owns its prior (``owns_prior``: a
        prior on a latent space of its own) keeps it: A is then that normalized prior."""
        built = build_flow(self.system.layout(), flow.model_dump())
        if self.base.samples_directly and not built.owns_prior:
            built.prior = self.base.prior
        return built


def float64_tensor(array: np.ndarray) -> torch.Tensor:
    """float64 tensor of a copy: arrays that arrive through Ray's object store are read-only."""
    return torch.from_numpy(np.array(array, dtype=np.float64))

