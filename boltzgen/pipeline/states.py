"""Free energies between a system's two metastable states (the sign of its
:meth:`~boltzgen.systems.base.System.metastable_coordinate`: a peptide's φ), from the MD
reference and from the reweighted flow.

ΔF = F(state 1) − F(state 0) = −ln(P(coordinate > 0) / P(coordinate < 0)) in kT. Metric names
carry the system's ``metastable_label`` ("phi": ``delta_f_phi`` for the reweighted flow,
``delta_f_phi_md`` for the reference, each with ``_err``, one sigma):

- MD frames are correlated: the error is a block bootstrap with blocks of ceil(g) frames, g
  the statistical inefficiency (pymbar) of the state indicator; the number of sign changes
  of the coordinate along the run at the target temperature is ``md_transitions_<label>``.
- Flow samples are independent draws: the error is a bootstrap over samples of the
  self-normalized importance estimate; invalid samples (weight zero) stay in the resampled set
  as zeros, so that the error includes how many valid samples a draw happens to hold.
"""

from __future__ import annotations

import math

import numpy as np

from boltzgen.systems.base import System

N_BOOTSTRAP = 200


def md_state_metrics(system: System, frames: np.ndarray, seed: int,
                     n_bootstrap: int = N_BOOTSTRAP) -> dict[str, float]:
    """``delta_f_<label>_md`` (kT) with its block-bootstrap error, transitions, g and the
    probability of state 1, over MD frames (F, dim) in time order at the target temperature;
    empty for a system without metastable states."""
    if not system.supports_metastable_states() or len(frames) == 0:
        return {}
    from boltzgen.peptides.observables import md_state_free_energy

    label = system.metastable_label
    result = md_state_free_energy(system.metastable_coordinate(frames), n_bootstrap, seed)
    return {f"delta_f_{label}_md": result.delta_f_kt,
            f"delta_f_{label}_md_err": result.error_kt,
            f"md_transitions_{label}": float(result.n_transitions),
            f"md_statistical_inefficiency_{label}": float(result.statistical_inefficiency),
            f"md_p_{label}_positive": float(result.p_positive)}


def flow_state_metrics(system: System, mapped: np.ndarray, log_w: np.ndarray, seed: int,
                       n_bootstrap: int = N_BOOTSTRAP) -> dict[str, float]:
    """``delta_f_<label>`` (kT, the reweighted flow) with its bootstrap error, and
    ``delta_f_<label>_raw`` (the flow's samples as drawn, unweighted); empty for a system
    without metastable states. ``log_w`` is −inf for invalid samples."""
    if not system.supports_metastable_states() or len(mapped) == 0:
        return {}
    from boltzgen.peptides.observables import weighted_state_free_energy

    label = system.metastable_label
    coordinate = np.full(len(mapped), np.nan)
    finite = np.isfinite(mapped).all(axis=1)
    coordinate[finite] = system.metastable_coordinate(mapped[finite])
    weighted = weighted_state_free_energy(coordinate, log_w, n_bootstrap, seed)
    drawn = np.where(np.isfinite(log_w), 0.0, -np.inf)  # the valid samples, equal weights
    raw = weighted_state_free_energy(coordinate, drawn, n_bootstrap, seed + 1)
    out = {f"delta_f_{label}": weighted.delta_f_kt, f"delta_f_{label}_err": weighted.error_kt,
           f"delta_f_{label}_raw": raw.delta_f_kt, f"delta_f_{label}_raw_err": raw.error_kt}
    return {k: float(v) if v is not None else math.nan for k, v in out.items()}
