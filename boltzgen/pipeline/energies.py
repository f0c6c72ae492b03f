"""Energy stage: batch energy functions x -> (U, ∇U) by the job's backend (the system's torch
potential or OpenMM). (Which coordinates the energy stage evaluates is the sampling stage's
word: ``energy_requests``.) Training differentiates them through
:class:`boltzgen.openmm_bridge.BatchEnergy`, the one torch <-> OpenMM bridge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from boltzgen.openmm_bridge import BatchEnergy
from boltzgen.pipeline.problem import EnergyFunction, check_injected_failure
from boltzgen.settings import EnergySettings, JobSettings
from boltzgen.systems import make_system

__all__ = ["BatchEnergy", "make_energy_function", "potential_energy"]


def make_energy_function(settings: JobSettings | Mapping[str, Any], threads: int = 1
                         ) -> EnergyFunction:
    """x (B, dim) flow coordinates -> (U (B,) energy units, ∇U (B, dim)) by the job's
    registered energy backend (:data:`boltzgen.pipeline.energy_backends.ENERGY_BACKENDS`):
    ``torch``, the system's own potential with autograd; ``openmm``, the system's OpenMM form
    on ``energy.platform`` with ``threads`` CPU threads (the Context is built on first use, in
    the calling process)."""
    from boltzgen.pipeline.energy_backends import ENERGY_BACKENDS

    # Only the system and energy sections matter: a mapping may hold just those two.
    if isinstance(settings, JobSettings):
        system_settings, energy = settings.dump["system"], settings.energy
    else:
        system_settings = settings["system"]
        energy = EnergySettings.model_validate(settings.get("energy") or {})
    system = make_system(system_settings)
    return ENERGY_BACKENDS.get(energy.backend).make(system, energy, threads)


def potential_energy(settings: JobSettings | Mapping[str, Any], x: np.ndarray,
                     energy_function: EnergyFunction | None = None) -> np.ndarray:
    """U(x) in the system's energy units for a batch of flow coordinates (energy stage)."""
    job = JobSettings.of(settings)
    check_injected_failure(job, "energy")
    return (energy_function or make_energy_function(job))(x)[0]
