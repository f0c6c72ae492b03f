"""Estimate stage: LFEP and LBAR ΔF (kT) with errors, Kish ESS forward and backward, NLL and
forward KL where defined, ΔF under each estimator's name in total and per molecule, and the
structural observables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from boltzgen.estimators import (
    importance_free_energy,
    importance_free_energy_err_bootstrap,
    kish_ess_fraction,
    kish_ess_fraction_err,
    lbar,
    lbar_err_bootstrap,
    lfep_log_weights,
    normalized_weights,
)
from boltzgen.layouts import MoleculeLayout
from boltzgen.pipeline.distribution_metrics import distribution_metrics
from boltzgen.pipeline.problem import Problem, stage_seed
from boltzgen.pipeline.reference import ReferenceData
from boltzgen.pipeline.sampling import SampleSet
from boltzgen.pipeline.states import flow_state_metrics
from boltzgen.pipeline.structure import Curve, structure_curves
from boltzgen.settings import JobSettings
from boltzgen.systems.particles import ParticleSystem


@dataclass
class Estimates:
    metrics: dict[str, float]
    log_weights: np.ndarray
    notes: dict[str, str]
    mapped_potential: np.ndarray | None = None  # U(T(x)) in the system's energy units
    # The same for every held-out base frame, and its LFEP log weights (where mapped).
    mapped_heldout_potential: np.ndarray | None = None
    heldout_log_weights: np.ndarray | None = None
    reverse_work: np.ndarray | None = None  # kT, per held-out target sample (LBAR's input)
    # Pair type -> sample set -> (r nm, g(r), its error), for systems with pair histograms.
    structure: dict[str, dict[str, Curve]] = field(default_factory=dict)


def estimate(
    settings: JobSettings | Mapping[str, Any],
    reference: ReferenceData,
    samples: SampleSet,
    potentials: Mapping[str, np.ndarray],
) -> Estimates:
    """LFEP and LBAR ΔF (kT) with 1-sigma errors, Kish ESS fraction, NLL where defined."""
    job = JobSettings.of(settings)
    problem = Problem.from_settings(job)
    if "mapped" not in potentials and samples.heldout_rows is not None:
        potentials = {**potentials,
                      "mapped": np.asarray(potentials["mapped_heldout"])[samples.heldout_rows]}
    u_b_mapped = potentials["mapped"] / problem.kt
    log_w = lfep_log_weights(samples.u_a, samples.logdet, u_b_mapped)
    valid = None
    if problem.system.checks_validity():
        # Invalid samples (a D amino acid) lie outside the target: weight zero, counted.
        valid = problem.system.valid_samples(samples.mapped)
        log_w = np.where(valid, log_w, -np.inf)
    metrics = _forward_metrics(log_w)
    if valid is not None:
        metrics.update(_validity_metrics(valid, log_w))
    if reference.reference_delta_f is not None:
        metrics["reference_delta_f"] = reference.reference_delta_f
        metrics["reference_delta_f_err"] = float(reference.reference_delta_f_err or 0.0)
    reverse_work = _backward_metrics(problem, reference, samples, potentials, metrics)
    metrics.update(_mode_metrics(problem, reference, samples.mapped, log_w, valid))
    forward_work = u_b_mapped - samples.logdet - samples.u_a
    metrics.update(_lbar_metrics(forward_work, reverse_work))
    metrics.update(_named_free_energies(problem, reference, metrics))
    every_potential = potentials.get("mapped_heldout")  # present where samples has those
    every_log_w = None
    if every_potential is not None:
        every_log_w = lfep_log_weights(samples.u_a_heldout, samples.logdet_heldout,
                                       np.asarray(every_potential) / problem.kt)
    structure, structure_metrics = structure_curves(problem, reference, samples, log_w, every_log_w,
                                              stage_seed(job, "observables"))
    metrics.update(structure_metrics)
    metrics.update(flow_state_metrics(problem.system, samples.mapped, log_w,
                                      stage_seed(job, "states")))
    if reference.target_test_potential is not None and len(reference.target_test):
        metrics.update(distribution_metrics(
            u_b_mapped, np.asarray(reference.target_test_potential) / problem.kt,
            _observables(problem, samples.mapped), _observables(problem, reference.target_test)))
    metrics.update(samples.flow_statistics)
    layout = problem.system.layout()
    if isinstance(layout, MoleculeLayout):
        metrics["atoms"] = float(layout.n_atoms)
    metrics.update(reference.diagnostics)
    metrics = {k: float(v) for k, v in metrics.items()}
    return Estimates(metrics=metrics, log_weights=log_w, notes=_notes(problem, reference, metrics),
                     mapped_potential=np.asarray(potentials["mapped"]), structure=structure,
                     reverse_work=reverse_work,
                     mapped_heldout_potential=None if every_potential is None
                     else np.asarray(every_potential),
                     heldout_log_weights=every_log_w)


def _observables(problem: Problem, x: np.ndarray) -> dict[str, np.ndarray]:
    """The pair distances of a particle system (what ``distance_w1`` compares); nothing for
    other systems, whose full observables (dihedrals, RDFs) are not computed here."""
    system = problem.system
    if not len(x) or not isinstance(system, ParticleSystem):
        return {}
    with torch.no_grad():
        distances = system.pair_distances(torch.as_tensor(np.asarray(x, dtype=np.float64)))
    return {"pair_distance": distances.reshape(-1).numpy()}


def _forward_metrics(log_w: np.ndarray) -> dict[str, float]:
    """LFEP ΔF = ln N − logsumexp(log w) (kT) with its delta-method and bootstrap errors, the
    Kish ESS fraction and the training-loss bound E[−log w] >= ΔF."""
    lfep = importance_free_energy(log_w)
    return {
        "delta_f": lfep.delta_f,
        "delta_f_err": lfep.delta_f_err,
        "ess": lfep.ess,
        "ess_err": kish_ess_fraction_err(log_w) if len(log_w) >= 2 else float("nan"),
        "delta_f_err_bootstrap": importance_free_energy_err_bootstrap(log_w)
        if len(log_w) >= 2 else float("nan"),
        "n_samples": float(lfep.n_samples),
        "n_nonfinite": float(lfep.n_nonfinite),
        "training_loss_bound": float(np.mean(-log_w[np.isfinite(log_w)]))
        if np.isfinite(log_w).any()
        else float("nan"),
    }


def _validity_metrics(valid: np.ndarray, log_w: np.ndarray) -> dict[str, float]:
    """``valid_fraction`` and ``n_invalid`` of the flow's samples, and the Kish ESS among the
    valid ones (invalid samples dropped before the ESS, as the valid fraction reports them):
    ``ess`` = (Σ w)² / (N_valid Σ w²) over valid samples. ΔF keeps every sample's count N
    (an invalid one contributes w = 0), which is what makes ln N − logsumexp(log w) the free
    energy of the valid region."""
    kept = log_w[valid]
    out = {"valid_fraction": float(valid.mean()) if len(valid) else float("nan"),
           "n_invalid": float((~valid).sum())}
    if np.isfinite(kept).any():
        out["ess"] = kish_ess_fraction(kept)
        out["ess_err"] = kish_ess_fraction_err(kept) if len(kept) >= 2 else float("nan")
    return out


def _backward_metrics(problem: Problem, reference: ReferenceData, samples: SampleSet,
                      potentials: Mapping[str, np.ndarray], metrics: dict[str, float]
                      ) -> np.ndarray:
    """Add what held-out target samples y ~ B pulled back by T⁻¹ give (NLL in nats and the
    forward KL for a normalized base, the backward Kish ESS) to ``metrics``; return their
    reverse works u_A(T⁻¹ y) − log|det J_T⁻¹(y)| − u_B(y) (kT)."""
    if samples.u_a_pulled_back is not None:
        u_a_back = samples.u_a_pulled_back
        if len(u_a_back):  # none in a data-free job
            # −log q(y) = u_A(T⁻¹ y) − log|det J_T⁻¹(y)| for a normalized base.
            terms = u_a_back - samples.logdet_inverse
            metrics["nll"] = float(np.mean(terms))
            # A flow with a bounded latent (the coarse-grained model's box) gives zero density
            # outside its support: nll is then +inf, and this says for how many samples.
            metrics["nll_outside_support_fraction"] = float(np.mean(np.isposinf(terms)))
    else:
        u_a_back = potentials["pulled_back"] / (
            problem.system.boltzmann_constant * problem.base.temperature
        )
    u_b_test = reference.target_test_potential / problem.kt
    if "nll" in metrics and reference.reference_delta_f is not None:
        # KL(p_B || q) = E_B[log p_B − log q], log p_B(y) = −u_B(y) + f_B on the base's
        # normalized measure (f_A = 0, so f_B is the reference ΔF); paired per test sample.
        kl_terms = -u_b_test + reference.reference_delta_f + (u_a_back - samples.logdet_inverse)
        finite = np.isfinite(kl_terms)
        if finite.sum() >= 2:
            metrics["forward_kl"] = float(np.mean(kl_terms[finite]))
            metrics["forward_kl_err"] = float(np.std(kl_terms[finite], ddof=1)
                                              / np.sqrt(finite.sum()))
    reverse_work = u_a_back - samples.logdet_inverse - u_b_test
    if np.isfinite(reverse_work).any():
        # Backward weights w(y) ∝ p_A(T⁻¹ y)|det J_T⁻¹(y)| / p_B(y) = exp(−reverse work), y ~ B.
        metrics["ess_backward"] = kish_ess_fraction(-reverse_work)
        if len(reverse_work) >= 2:
            metrics["ess_backward_err"] = kish_ess_fraction_err(-reverse_work)
    return reverse_work


def _lbar_metrics(forward_work: np.ndarray, reverse_work: np.ndarray) -> dict[str, float]:
    """LBAR ΔF (kT) from both directions' works, with its error and bootstrap error."""
    if len(reverse_work) < 2 or np.isfinite(forward_work).sum() < 2:
        return {}
    lbar_f, lbar_err = lbar(forward_work, reverse_work)
    metrics = {"delta_f_lbar": lbar_f, "delta_f_lbar_err": lbar_err}
    if np.isfinite(lbar_f):
        metrics["delta_f_lbar_err_bootstrap"] = lbar_err_bootstrap(forward_work, reverse_work)
    return metrics


def _notes(problem: Problem, reference: ReferenceData, metrics: Mapping[str, float]
           ) -> dict[str, str]:
    """What the numbers mean: the estimand, the reference's method, the estimator, the NLL's
    convention and, where recorded, those of the distribution metrics and the solver's
    statistics (``<metric>_convention``); every note becomes a param of the job's run."""
    return {
        "estimand": problem.estimand(),
        "reference_method": reference.method,
        "estimator": "LFEP: ln N - logsumexp(u_A + log|det J| - u_B); error by the delta "
        "method sqrt((1/ESS_fraction - 1)/N)",
        "nll_convention": f"mean -log q(y) in nats over held-out reference samples of the "
        f"target ({reference.method.split(';')[-1].strip()}), density on the base's measure: "
        f"{problem.system.estimand_note}; forward_kl = nll - entropy of the target (nats)"
        if "nll" in metrics
        else "not defined",
        **({"energy_w2_convention": "W2 (not squared), kT, between the reduced energies of "
            "the flow's samples as drawn and of held-out reference samples; energy_w2_capped: "
            "the same after capping every energy at the largest held-out reference energy "
            "u_max; energy_above_reference_fraction: the fraction of flow samples above u_max"}
           if "energy_w2" in metrics else {}),
        **({"distance_w1_convention": "W1 between the pooled interatomic distances of the "
            "flow's samples as drawn and of held-out reference samples (system length units)"}
           if "distance_w1" in metrics else {}),
        **({"nfe_convention": "vector-field evaluations per ODE solve at the flow's solver "
            "tolerance (mean over solves; divergence passes not counted); path_length = mean over "
            "samples of the integral of |v| dt (flow-coordinate units); seconds_per_sample = "
            "wall-clock seconds per sample with its exact log-likelihood"}
           if "nfe" in metrics else {}),
    }


def _named_free_energies(problem: Problem, reference: ReferenceData, metrics: dict[str, float]
                         ) -> dict[str, float]:
    """ΔF by estimator under its own name, in kT for the whole system and, for a molecular
    system, ``..._per_molecule`` (kT per molecule), each with its 1-sigma ``_err``:
    ``delta_f_lfep`` (= ``delta_f``; error by the delta method), ``delta_f_lbar`` (pymbar's
    asymptotic error), ``delta_f_mbar`` (the reference where it is MBAR over a temperature
    ladder; bootstrap error); LFEP and LBAR also with ``_err_bootstrap``, the standard
    deviation over bootstrap resamples of their samples."""
    out = {"delta_f_lfep": metrics["delta_f"], "delta_f_lfep_err": metrics["delta_f_err"]}
    if "delta_f_err_bootstrap" in metrics:
        out["delta_f_lfep_err_bootstrap"] = metrics["delta_f_err_bootstrap"]
    if "delta_f_lbar" in metrics:
        out["delta_f_lbar"] = metrics["delta_f_lbar"]
        out["delta_f_lbar_err"] = metrics["delta_f_lbar_err"]
        if "delta_f_lbar_err_bootstrap" in metrics:
            out["delta_f_lbar_err_bootstrap"] = metrics["delta_f_lbar_err_bootstrap"]
    if reference.method.startswith("MBAR") and "reference_delta_f" in metrics:
        out["delta_f_mbar"] = metrics["reference_delta_f"]
        out["delta_f_mbar_err"] = metrics["reference_delta_f_err"]
    molecules = problem.system.molecule_count
    if molecules:
        for name in ("delta_f_lfep", "delta_f_lbar", "delta_f_mbar"):
            if name in out:
                out[f"{name}_per_molecule"] = out[name] / molecules
                out[f"{name}_per_molecule_err"] = out[f"{name}_err"] / molecules
                if f"{name}_err_bootstrap" in out:
                    out[f"{name}_per_molecule_err_bootstrap"] = (
                        out[f"{name}_err_bootstrap"] / molecules)
    return out


_MODES_LISTED = 8  # beyond this many modes (the tetrahedron's 24) only the errors are recorded


def _mode_metrics(problem: Problem, reference: ReferenceData, mapped: np.ndarray,
                  log_w: np.ndarray, valid: np.ndarray | None) -> dict[str, float]:
    """Largest absolute error of a mode's probability: flow samples as drawn (``mode_weight_error``;
    valid samples only, e.g. no D peptide) and importance-reweighted (``..._reweighted``),
    against the system's exact mode weights, or where it has none (a peptide's Ramachandran
    basins) against the fractions of the reference's target samples (the MD frames, train
    and held-out); ``..._noise`` is the largest one-sigma sampling error sqrt(p(1 − p)/N) of
    an exact sampler (not for MD frames, which are correlated); and, for a system of at most
    8 modes, every mode's weight, ``mode_weight_{drawn,reweighted,exact or reference}_<mode>``."""
    system = problem.system
    exact = system.exact_mode_probabilities(problem.temperature)
    kind = "exact"
    if exact is None:
        exact, kind = _reference_mode_weights(problem, reference), "reference"
    if exact is None or len(mapped) == 0:
        return {}
    labels = system.mode_index(mapped)
    counted = np.ones(len(labels), dtype=bool) if valid is None else valid
    drawn = np.bincount(labels[counted], minlength=len(exact)) / max(int(counted.sum()), 1)
    weights = normalized_weights(log_w)
    reweighted = np.bincount(labels, weights=weights, minlength=len(exact)) / max(
        weights.sum(), 1e-300)
    per_mode = {f"mode_weight_{name}_{index}": float(value)
                for name, values in (("drawn", drawn), ("reweighted", reweighted), (kind, exact))
                for index, value in enumerate(values)} if len(exact) <= _MODES_LISTED else {}
    noise = ({"mode_weight_error_noise": float(np.sqrt(exact * (1 - exact) / len(labels)).max())}
             if kind == "exact" else {})
    return {
        "mode_weight_error": float(np.abs(drawn - exact).max()),
        "mode_weight_error_reweighted": float(np.abs(reweighted - exact).max()),
        **noise,
        **per_mode,  # each mode's weight: what a collapse onto some modes looks like
    }


def _reference_mode_weights(problem: Problem, reference: ReferenceData) -> np.ndarray | None:
    """Each mode's fraction of the reference's target samples (train and held-out), for a
    system with modes but no exact weights; None without modes or samples."""
    frames = [np.asarray(a) for a in (reference.target_train, reference.target_test)
              if a is not None and len(a)]
    if not frames:
        return None
    labels = problem.system.mode_index(np.concatenate(frames))
    n_modes = problem.system.mode_count
    if labels is None or not n_modes:
        return None
    return np.bincount(labels, minlength=n_modes) / len(labels)


