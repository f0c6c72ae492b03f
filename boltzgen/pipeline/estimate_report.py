"""What the driver records of a job's estimates: metrics, notes, the estimators' inputs and
figures (written as PNG files by the actor, logged by the driver)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from boltzgen.estimators import normalized_weights
from boltzgen.pipeline.estimation import Estimates, estimate
from boltzgen.pipeline.problem import Problem, check_injected_failure
from boltzgen.pipeline.reference import ReferenceData
from boltzgen.pipeline.sampling import SampleSet
from boltzgen.settings import JobSettings


@dataclass
class EstimateReport:
    """What the driver records of a job's estimates: metrics, notes, and where the figures
    were written (name -> PNG path in the campaign's work directory)."""

    metrics: dict[str, float]
    notes: dict[str, str]
    plots: dict[str, str]
    # The estimators' inputs, kT: "forward_work" w_F = u_B(T x) - u_A(x) - log|det J_T(x)|
    # for x ~ A and "reverse_work" w_R = u_A(T⁻¹ y) - u_B(y) - log|det J_T⁻¹(y)| for held-out
    # y ~ B, so that users can rerun or cross-check LFEP, LBAR and the ESS.
    works: dict[str, np.ndarray] = field(default_factory=dict)


def estimate_and_plot(
    settings: JobSettings | Mapping[str, Any], reference: ReferenceData, samples: SampleSet,
    potentials: Mapping[str, np.ndarray], plot_dir: str
) -> EstimateReport:
    """:func:`estimate`, then :func:`figures` written as PNG files to ``plot_dir`` (runs in an
    actor, so that the driver, the single MLflow writer, only logs the files)."""
    from boltzgen.plots import save_figures

    job = JobSettings.of(settings)
    check_injected_failure(job, "estimate")
    estimates = estimate(job, reference, samples, potentials)
    plots = save_figures(figures(job, reference, samples, estimates), plot_dir)
    plots.update(dihedral_plots(job, reference, samples, estimates, plot_dir))
    works = {"forward_work": -estimates.log_weights}
    if estimates.reverse_work is not None:
        works["reverse_work"] = estimates.reverse_work
    return EstimateReport(metrics=dict(estimates.metrics), notes=dict(estimates.notes),
                          plots=plots, works=works)


def figures(
    job: JobSettings, reference: ReferenceData, samples: SampleSet, estimates: Estimates
) -> dict[str, Any]:
    """Matplotlib figures: log-weight distribution, sampled vs reference marginals, and for
    molecular systems radial distribution functions and potential-energy histograms."""
    from boltzgen.plots import log_weight_histogram, marginals

    problem = Problem.from_settings(job)
    title = f"{problem.system.kind} T={problem.temperature:g}"
    sampled = problem.system.observables(samples.mapped)
    ref_obs = problem.system.observables(reference.target_test)
    log_w = estimates.log_weights
    w = normalized_weights(log_w)
    weights = {}
    for key, values in sampled.items():
        per_sample = len(values) // len(w) if len(w) else 0
        if per_sample and per_sample * len(w) == len(values):
            weights[key] = np.repeat(w, per_sample)
    out = {
        "log_weights.png": log_weight_histogram(log_w, title),
        "marginals.png": marginals(sampled, ref_obs, weights, title),
    }
    layout = problem.system.rigid_layout()
    if layout is not None:
        from boltzgen.plots import axis_direction_maps
        from boltzgen.rigid.quaternions import quaternion_to_matrix

        def axes_of(x: np.ndarray) -> dict[str, np.ndarray]:
            _, q = layout.split(torch.as_tensor(np.array(x, dtype=np.float64)))
            columns = quaternion_to_matrix(q).numpy()  # (N, bodies, 3, 3); column a is R e_a
            return {a: columns[..., i].reshape(-1, 3) for i, a in enumerate("xyz")}

        out["axis_directions.png"] = axis_direction_maps(axes_of(samples.mapped),
                                                         axes_of(reference.target_test), title)
    curves = estimates.structure
    if curves:
        from boltzgen.plots import energy_histograms, radial_distributions

        out["radial_distributions.png"] = radial_distributions(curves, title)
        if estimates.mapped_potential is not None:
            # Every held-out frame where there are such (as for the RDFs), else the
            # decorrelated ones.
            every_base, every_target = reference.base_heldout, reference.target_heldout
            mapped_u, flow_w, base_u = estimates.mapped_potential, w, reference.base_test_potential
            if (estimates.mapped_heldout_potential is not None
                    and estimates.heldout_log_weights is not None and every_base is not None):
                mapped_u = estimates.mapped_heldout_potential
                flow_w = normalized_weights(estimates.heldout_log_weights)
                base_u = every_base.potential
            energies = {"target MD": reference.target_test_potential if every_target is None
                        else every_target.potential,
                        "flow, reweighted": mapped_u, "flow, as drawn": mapped_u}
            if base_u is not None:
                energies["base MD (flow input)"] = base_u
            out["energy_histograms.png"] = energy_histograms(
                energies, {"flow, reweighted": flow_w}, "kJ/mol", title)
    return out


def dihedral_plots(job: JobSettings, reference: ReferenceData, samples: SampleSet,
                   estimates: Estimates, plot_dir: str) -> dict[str, str]:
    """For a system with a backbone (peptides), PNG files in ``plot_dir``: the Ramachandran
    free-energy surface of the MD reference (every frame of the run), the flow's samples as
    drawn and reweighted beside the MD's, and the potential-energy histograms (held-out MD
    frames, flow as drawn, flow reweighted; kJ/mol). Invalid samples (a D amino acid) are
    left out of the flow's panels."""
    from pathlib import Path

    from boltzgen.peptides.plots import (
        energy_histogram_plot,
        flow_ramachandran_plot,
        ramachandran_plot,
    )

    problem = Problem.from_settings(job)
    system = problem.system
    if not system.supports_backbone_dihedrals():
        return {}
    title = f"{getattr(system, 'sequence', system.kind)} T={problem.temperature:g} K"
    frames = reference.target_train
    if reference.target_heldout is not None:
        frames = np.concatenate([frames, reference.target_heldout.frames])
    md = system.backbone_dihedrals(frames)
    # The flow's samples as drawn: every valid one (L, finite coordinates); reweighted: the
    # same with their weights (zero where the energy was not finite).
    kept = system.valid_samples(samples.mapped)
    flow = system.backbone_dihedrals(samples.mapped[kept])
    log_w = estimates.log_weights[kept]
    directory = Path(plot_dir)
    directory.mkdir(parents=True, exist_ok=True)
    out = {"ramachandran_md.png": ramachandran_plot(
               directory / "ramachandran_md.png", *md, f"MD, {title}"),
           "ramachandran_flow.png": flow_ramachandran_plot(
               directory / "ramachandran_flow.png", md, flow, log_w)}
    if estimates.mapped_potential is not None:
        md_u = (reference.target_test_potential if reference.target_heldout is None
                else reference.target_heldout.potential)
        out["energy_histograms.png"] = energy_histogram_plot(
            directory / "energy_histograms.png", md_u, estimates.mapped_potential[kept], log_w)
    return {name: str(path) for name, path in out.items()}
