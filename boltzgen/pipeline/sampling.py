"""Sampling stage: base samples pushed through the trained flow, held-out target samples pulled
back through its inverse, with the log-determinants the estimators need."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from boltzgen.bases import AnalyticBase
from boltzgen.pipeline.flow_training import TrainedFlow, load_flow
from boltzgen.pipeline.problem import Problem, check_injected_failure, float64_tensor, stage_seed
from boltzgen.pipeline.reference import ReferenceData


@dataclass
class SampleSet:
    """Base samples pushed forward, target samples pulled back (flow coordinates)."""

    u_a: np.ndarray  # u_A(x), kT, for x ~ A
    mapped: np.ndarray  # y = T(x)
    logdet: np.ndarray  # log|det J_T(x)|
    pulled_back: np.ndarray  # T⁻¹(y_B) for held-out y_B ~ B
    logdet_inverse: np.ndarray  # log|det J_T⁻¹(y_B)|
    u_a_pulled_back: np.ndarray | None  # u_A(T⁻¹ y_B) in kT where A is analytic, else None
    seconds: float
    # An MD base: every held-out base frame (ReferenceData.base_heldout) mapped, for
    # structural observables, and which of its rows ``mapped`` is; None otherwise.
    mapped_heldout: np.ndarray | None = None
    logdet_heldout: np.ndarray | None = None
    u_a_heldout: np.ndarray | None = None  # u_A in kT of those base frames
    heldout_rows: np.ndarray | None = None


def sample(
    config: Mapping[str, Any],
    trained: TrainedFlow,
    reference: ReferenceData,
    batch_size: int = 8192,
    device: str = "cpu",
) -> SampleSet:
    """Draw x ~ A (fresh for a normal base, held-out MCMC for a thermodynamic one) and map
    them through the flow on ``device`` (the arrays returned are on the CPU)."""
    check_injected_failure(config, "sample")
    start = time.perf_counter()
    problem = Problem.from_config(config)
    flow = load_flow(trained.checkpoint).to(device)
    n = int(config["sampling"]["n_samples"])
    if isinstance(problem.base, AnalyticBase):
        generator = torch.Generator().manual_seed(stage_seed(config, "sample"))
        x = problem.base.sample(n, generator)
        u_a = problem.base.reduced_energy(x)
    else:
        x = float64_tensor(reference.base_test[:n])
        u_a = float64_tensor(reference.base_test_potential[:n]) / (
            problem.system.boltzmann_constant * problem.base.temperature
        )
    y_b = float64_tensor(reference.target_test)
    every = None if isinstance(problem.base, AnalyticBase) else reference.base_heldout
    heldout: dict[str, Any] = {}
    with torch.no_grad():
        if every is not None:
            # Every held-out base frame once; the decorrelated ones are rows of it.
            mapped_every, logdet_every = _batched(flow.forward, float64_tensor(every.frames),
                                                  batch_size, device)
            rows = every.decorrelated[:n]
            mapped, logdet = mapped_every[rows], logdet_every[rows]
            heldout = {"mapped_heldout": mapped_every.numpy(),
                       "logdet_heldout": logdet_every.numpy(),
                       "u_a_heldout": every.potential / (problem.system.boltzmann_constant
                                                         * problem.base.temperature),
                       "heldout_rows": rows}
        else:
            mapped, logdet = _batched(flow.forward, x, batch_size, device)
        back, logdet_inv = _batched(flow.inverse, y_b, batch_size, device)
        u_a_back = (
            problem.base.reduced_energy(back).numpy()
            if isinstance(problem.base, AnalyticBase)
            else None
        )
    return SampleSet(
        u_a=u_a.detach().numpy(),
        mapped=mapped.numpy(),
        logdet=logdet.numpy(),
        pulled_back=back.numpy(),
        logdet_inverse=logdet_inv.numpy(),
        u_a_pulled_back=u_a_back,
        seconds=time.perf_counter() - start,
        **heldout,
    )


def _batched(fn: Any, x: torch.Tensor, batch_size: int, device: str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` over ``x`` in batches on ``device``; the results back on the CPU."""
    outs, logdets = [], []
    for chunk in torch.split(x, batch_size):
        out, logdet = fn(chunk.to(device))
        outs.append(out.cpu())
        logdets.append(logdet.cpu())
    return torch.cat(outs), torch.cat(logdets)


def energy_requests(samples: SampleSet) -> dict[str, np.ndarray]:
    """Coordinates whose potential energy the energy stage must evaluate: the mapped samples,
    or every mapped held-out base frame where the mapped samples are rows of those
    (:func:`estimate` takes their energies from it); T⁻¹(y_B) for a thermodynamic base."""
    if samples.mapped_heldout is not None and samples.heldout_rows is not None:
        requests = {"mapped_heldout": samples.mapped_heldout}
    else:
        requests = {"mapped": samples.mapped}
    if samples.u_a_pulled_back is None:  # a thermodynamic base needs U at T⁻¹(y_B) too
        requests["pulled_back"] = samples.pulled_back
    return requests


