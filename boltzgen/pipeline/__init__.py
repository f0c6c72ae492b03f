"""One free-energy job as stages: reference -> train -> sample -> energy -> estimate.

Each stage is a plain function of the job's resolved configuration (a mapping, as the campaign
spec resolves it) and the previous stages' outputs, so that the same code runs in Ray actors, in
one plain Python process (the benchmark's baseline) and in a notebook.

The estimand is ΔF = f_B − f_A in kT (reduced units), f = −ln Z, with B the system at the job's
``temperature`` and A the base state (docs/architecture.md, Conventions):

* ``base.kind = normal``: A = N(0, scale² I) in flow coordinates, normalized, f_A = 0, so ΔF is
  the absolute reduced free energy −ln ∫ exp(−U(x)/k_B T) dx in flow coordinates;
* ``base.kind = thermodynamic``: A = the same system at ``base.temperature``, so ΔF = f(T) − f(T_A).

A flow T maps A to B. With x ~ A, the LFEP log weights are
log w = u_A(x) + log|det J_T(x)| − u_B(T(x)) and ΔF ≈ ln N − logsumexp(log w)
(Jarzynski-type targeted free-energy perturbation; Wirnsberger et al. 2020). With y ~ B mapped
back by T⁻¹, BAR over both directions gives LBAR. The references are exact (quadrature) where
the system knows its partition function, else MBAR (Shirts & Chodera 2008) over a replica-exchange
MCMC ladder geomspace(T, T_A, K).

The stages live in one module each (``problem``: what they share; ``reference``,
``flow_training``, ``sampling``, ``energies``, ``estimation`` with ``structure``,
``estimate_report``, and ``md_task``: one MD run, importable without PyTorch). ``job`` declares
a job as a graph of tasks over them (``graph``: the task model and
an in-process runner); the campaign's scheduler runs such graphs over Ray actors or in one
process, and :func:`run_job` runs one job's graph here (a notebook):
``run_job(job_graph(config, job_id, work_dir))``.

The names below are imported from their modules on first use (PEP 562), so that importing one
stage module (``boltzgen.pipeline.md_task`` in an actor that only runs MD) does not import every
stage and PyTorch with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from boltzgen.pipeline.energies import BatchEnergy, make_energy_function, potential_energy
    from boltzgen.pipeline.estimate_report import EstimateReport, estimate_and_plot, figures
    from boltzgen.pipeline.estimation import Estimates, estimate
    from boltzgen.pipeline.flow_training import SymmetryImages, TrainedFlow, load_flow, train
    from boltzgen.pipeline.graph import JobGraph, JobOutcome, TaskContext, TaskSpec, run_job
    from boltzgen.pipeline.job import job_graph
    from boltzgen.pipeline.problem import (
        EnergyFunction,
        InjectedFailure,
        Problem,
        check_injected_failure,
        stage_seed,
    )
    from boltzgen.pipeline.reference import (
        HeldOutFrames,
        ReferenceData,
        md_runs,
        run_md_rung,
        run_reference,
    )
    from boltzgen.pipeline.sampling import SampleSet, energy_requests, sample

_EXPORTS: dict[str, str] = {
    "BatchEnergy": "energies",
    "make_energy_function": "energies",
    "potential_energy": "energies",
    "Estimates": "estimation",
    "estimate": "estimation",
    "SymmetryImages": "flow_training",
    "TrainedFlow": "flow_training",
    "load_flow": "flow_training",
    "train": "flow_training",
    "JobGraph": "graph",
    "JobOutcome": "graph",
    "TaskContext": "graph",
    "TaskSpec": "graph",
    "run_job": "graph",
    "job_graph": "job",
    "EnergyFunction": "problem",
    "InjectedFailure": "problem",
    "Problem": "problem",
    "check_injected_failure": "problem",
    "stage_seed": "problem",
    "HeldOutFrames": "reference",
    "ReferenceData": "reference",
    "md_runs": "reference",
    "run_md_rung": "reference",
    "run_reference": "reference",
    "EstimateReport": "estimate_report",
    "estimate_and_plot": "estimate_report",
    "figures": "estimate_report",
    "SampleSet": "sampling",
    "energy_requests": "sampling",
    "sample": "sampling",
}

__all__ = [
    "BatchEnergy", "EnergyFunction", "EstimateReport", "Estimates", "HeldOutFrames",
    "InjectedFailure", "JobGraph", "JobOutcome", "Problem", "ReferenceData", "SampleSet",
    "SymmetryImages", "TaskContext", "TaskSpec", "TrainedFlow", "check_injected_failure",
    "energy_requests", "estimate", "estimate_and_plot", "figures", "job_graph", "load_flow",
    "make_energy_function", "md_runs", "potential_energy", "run_job", "run_md_rung",
    "run_reference", "sample", "stage_seed", "train",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
