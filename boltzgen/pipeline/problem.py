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

from boltzgen.bases import NormalBase, ThermodynamicBase, UniformBase
from boltzgen.flows import build_flow
from boltzgen.systems import System, make_system

EnergyFunction = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""x (B, dim) flow coordinates -> (U (B,) energy units, ∇U (B, dim))."""


class InjectedFailure(RuntimeError):
    """Raised on purpose when a job's ``inject_failure`` names the running stage."""


def check_injected_failure(config: Mapping[str, Any], stage: str) -> None:
    if config.get("inject_failure") == stage:
        raise InjectedFailure(f"failure injected on purpose in stage '{stage}' (inject_failure)")


def stage_seed(config: Mapping[str, Any], stage: str) -> int:
    """A seed per (job configuration, stage): reproducible, independent across jobs and stages."""
    return seed_of(f"{json.dumps(config, sort_keys=True, default=str)}|{stage}")


def seed_of(text: str) -> int:
    """A 31-bit seed from the sha256 of ``text`` (the same on every machine)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class Problem:
    """System, target temperature and base state of one job."""

    system: System
    temperature: float
    base: NormalBase | UniformBase | ThermodynamicBase

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Problem:
        system = make_system(config["system"])
        system.set_openmm_platform((config.get("energy") or {}).get("platform", "CPU"))
        base_cfg = config["base"]
        if base_cfg["kind"] == "normal":
            base: NormalBase | UniformBase | ThermodynamicBase = NormalBase(system.dim,
                                                                            base_cfg["scale"])
        elif base_cfg["kind"] == "uniform":
            base = UniformBase(system)
        else:
            base = ThermodynamicBase(system, base_cfg["temperature"])
        return cls(system=system, temperature=float(config["temperature"]), base=base)

    @property
    def kt(self) -> float:
        """k_B T of the target in the system's energy units."""
        return self.system.boltzmann_constant * self.temperature

    def ladder(self, reference: Mapping[str, Any]) -> np.ndarray:
        """Temperatures of the replica-exchange ladder, ascending."""
        k = int(reference["ladder_size"])
        if isinstance(self.base, ThermodynamicBase):
            ends = (self.temperature, self.base.temperature)
        else:
            ends = (self.temperature, self.temperature * reference["hot_temperature_factor"])
        return np.sort(np.geomspace(ends[0], ends[1], k)) if k > 1 else np.array([ends[0]])

    def estimand(self) -> str:
        if isinstance(self.base, ThermodynamicBase):
            return (
                f"f(T={self.temperature:g}) - f(T_A={self.base.temperature:g}) in kT, "
                f"f = -ln Z; {self.system.estimand_note}"
            )
        base = "Gaussian" if isinstance(self.base, NormalBase) else "uniform"
        return (
            f"-ln Z at T={self.temperature:g} in kT (f of the normalized {base} base is 0); "
            f"{self.system.estimand_note}"
        )

    def build_flow(self, flow_config: Mapping[str, Any]) -> torch.nn.Module:
        return build_flow(self.system.dim, flow_config, layout=self.system.rigid_layout())


def float64_tensor(array: np.ndarray) -> torch.Tensor:
    """float64 tensor of a copy: arrays that arrive through Ray's object store are read-only."""
    return torch.from_numpy(np.array(array, dtype=np.float64))

