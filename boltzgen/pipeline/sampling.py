"""Sampling stage: base samples pushed through the trained flow, held-out target samples pulled
back through its inverse, with the log-determinants the estimators need."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from boltzgen.pipeline.flow_training import TrainedFlow, load_flow
from boltzgen.pipeline.problem import Problem, check_injected_failure, float64_tensor, stage_seed
from boltzgen.pipeline.reference import ReferenceData
from boltzgen.settings import JobSettings


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
    # A continuous flow's NFE and path length (forward, and ``_inverse`` for the held-out
    # data), and seconds per forward sample with its log-likelihood (empty: none measured).
    flow_statistics: dict[str, float] = field(default_factory=dict)


def sample(
    settings: JobSettings | Mapping[str, Any],
    trained: TrainedFlow,
    reference: ReferenceData,
    batch_size: int = 8192,
    device: str = "cpu",
) -> SampleSet:
    """Draw x ~ A (fresh for a normal base, held-out MCMC for a thermodynamic one) and map
    them through the flow on ``device`` (the arrays returned are on the CPU)."""
    job = JobSettings.of(settings)
    check_injected_failure(job, "sample")
    start = time.perf_counter()
    problem = Problem.from_settings(job)
    analytic = problem.base.samples_directly
    flow = load_flow(trained.checkpoint, problem.base.prior if analytic else None).to(device)
    n = job.sampling.n_samples
    if analytic:  # x ~ A drawn by the flow's prior, which is A's density
        generator = torch.Generator().manual_seed(stage_seed(job, "sample"))
        x = flow.prior.sample(n, generator)
        u_a = flow.prior.reduced_energy(x)
    else:
        x = float64_tensor(reference.base_test[:n])
        u_a = float64_tensor(reference.base_test_potential[:n]) / (
            problem.system.boltzmann_constant * problem.base.temperature
        )
    y_b = float64_tensor(reference.target_test)
    every = None if problem.base.samples_directly else reference.base_heldout
    heldout: dict[str, Any] = {}
    statistics: dict[str, float] = {}
    with flow.sampling_context():  # no_grad unless the flow needs autograd to map
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
            flow.reset_statistics()
            forward_start = time.perf_counter()
            mapped, logdet = _batched(flow.forward, x, batch_size, device)
            statistics = _statistics(flow.solve_statistics(), "",
                                     (time.perf_counter() - forward_start) / max(1, len(x)))
        flow.reset_statistics()
        back, logdet_inv = _batched(flow.inverse, y_b, batch_size, device)
        statistics.update(_statistics(flow.solve_statistics(), "_inverse", None))
        u_a_back = flow.prior.reduced_energy(back).detach().numpy() if analytic else None
    return SampleSet(
        u_a=u_a.detach().numpy(),
        mapped=mapped.numpy(),
        logdet=logdet.numpy(),
        pulled_back=back.numpy(),
        logdet_inverse=logdet_inv.numpy(),
        u_a_pulled_back=u_a_back,
        seconds=time.perf_counter() - start,
        flow_statistics=statistics,
        **heldout,
    )


def _statistics(solves: dict[str, float], suffix: str, seconds_per_sample: float | None
                ) -> dict[str, float]:
    """A flow's solve statistics as metrics (``nfe``, ``path_length`` of the forward map;
    ``nfe_inverse``, ``path_length_inverse`` of the held-out data's inverse map) and the
    wall-clock seconds per forward sample with its log-likelihood."""
    out = {f"{k}{suffix}": v for k, v in solves.items() if k != "solves"}
    if seconds_per_sample is not None:
        out["seconds_per_sample"] = seconds_per_sample
    return out


def _batched(fn: Any, x: torch.Tensor, batch_size: int, device: str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` over ``x`` in batches on ``device``; the results back on the CPU."""
    if len(x) == 0:  # nothing to map (a data-free job has no target samples to pull back)
        return x.new_zeros(x.shape), x.new_zeros(x.shape[:1])
    outs, logdets = [], []
    for chunk in torch.split(x, batch_size):
        out, logdet = fn(chunk.to(device))
        outs.append(out.detach().cpu())
        logdets.append(logdet.detach().cpu())
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


