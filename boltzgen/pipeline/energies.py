"""Energy stage: batch energy functions x -> (U, ∇U) by the job's backend (the system's torch
potential or OpenMM) and the autograd bridge that lets training differentiate them. (Which
coordinates the energy stage evaluates is the sampling stage's word: ``energy_requests``.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from boltzgen.openmm_bridge import OpenMMEvaluator
from boltzgen.pipeline.problem import EnergyFunction, check_injected_failure, float64_tensor
from boltzgen.systems import make_system


class BatchEnergy(torch.autograd.Function):
    """U(x) (B,) in energy units from a batch energy function x -> (U, ∇U) (numpy), with
    ∇U as the gradient: how training differentiates energies computed elsewhere (the
    EnergyEvaluator pool's OpenMM Contexts). Non-finite U stay non-finite."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, energy: EnergyFunction) -> torch.Tensor:
        u, grad = energy(x.detach().cpu().numpy())
        ctx.save_for_backward(torch.as_tensor(np.asarray(grad, dtype=np.float64),
                                              device=x.device))
        return torch.as_tensor(np.asarray(u, dtype=np.float64), device=x.device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        # A non-finite U makes the loss non-finite, and training skips that step before any
        # gradient is used; nothing is zeroed here.
        return grad_output[:, None] * grad, None


def make_energy_function(config: Mapping[str, Any], threads: int = 1) -> EnergyFunction:
    """x (B, dim) flow coordinates -> (U (B,) energy units, ∇U (B, dim)) by the job's backend.

    ``energy.backend = torch``: the system's own potential, gradient by autograd.
    ``energy.backend = openmm``: the system's OpenMM form on ``energy.platform`` with
    ``threads`` CPU threads; the Context is built on first use, in the calling process.
    """
    system = make_system(config["system"])
    energy = config.get("energy") or {"backend": "torch"}
    if energy["backend"] == "openmm":
        import openmm

        evaluator = OpenMMEvaluator(openmm.XmlSerializer.serialize(system.openmm_system()),
                                    platform=energy.get("platform", "CPU"), threads=threads)

        def openmm_energy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            u, forces = evaluator.energies_and_forces(system.openmm_positions(x))
            return u, system.flow_gradient(forces, x)

        return openmm_energy

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
