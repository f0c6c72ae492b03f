"""Energy stage: batch energy functions x -> (U, ∇U) by the job's backend (the system's torch
potential or OpenMM). (Which coordinates the energy stage evaluates is the sampling stage's
word: ``energy_requests``.) Training differentiates them through
:class:`boltzgen.openmm_bridge.BatchEnergy`, the one torch <-> OpenMM bridge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from boltzgen.openmm_bridge import BatchEnergy, openmm_energy_function
from boltzgen.pipeline.problem import EnergyFunction, check_injected_failure, float64_tensor
from boltzgen.systems import make_system

__all__ = ["BatchEnergy", "make_energy_function", "potential_energy"]


def make_energy_function(config: Mapping[str, Any], threads: int = 1) -> EnergyFunction:
    """x (B, dim) flow coordinates -> (U (B,) energy units, ∇U (B, dim)) by the job's backend.

    ``energy.backend = torch``: the system's own potential, gradient by autograd (a system
    whose potential is OpenMM in this process, ice, runs it on ``energy.platform``).
    ``energy.backend = openmm``: the system's OpenMM form on ``energy.platform`` with
    ``threads`` CPU threads; the Context is built on first use, in the calling process.
    """
    system = make_system(config["system"])
    energy = config.get("energy") or {"backend": "torch"}
    platform = energy.get("platform", "CPU")
    if energy["backend"] == "openmm":
        return openmm_energy_function(system, platform, threads)
    system.set_openmm_platform(platform)

    def torch_energy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xt = float64_tensor(x).requires_grad_(True)
        u = system.potential(xt)
        (grad,) = torch.autograd.grad(u.sum(), xt)
        return u.detach().numpy(), grad.numpy()

    return torch_energy


def potential_energy(config: Mapping[str, Any], x: np.ndarray,
                     energy_function: EnergyFunction | None = None) -> np.ndarray:
    """U(x) in the system's energy units for a batch of flow coordinates (energy stage)."""
    check_injected_failure(config, "energy")
    return (energy_function or make_energy_function(config))(x)[0]
