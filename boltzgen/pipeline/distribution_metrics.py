"""How far the flow's samples are from held-out reference samples, as drawn (no reweighting):

- ``energy_w2``: the Wasserstein-2 distance (W2, not W2²) between the one-dimensional
  distributions of reduced energies u = U / kT of flow samples and of held-out reference
  samples, in kT: W2 = (∫_0^1 |F⁻¹(p) − G⁻¹(p)|² dp)^½ with F⁻¹, G⁻¹ the empirical quantile
  functions (evaluated on a common grid of 1000 probabilities). Samples whose energy is not
  finite are left out and counted in ``n_nonfinite``. W2 weighs every sample fully, so a few
  flow samples with overlapping particles (u ~ 1e10 kT) decide it alone; hence two companions:
- ``energy_w2_capped``: the same W2 after capping every energy at u_max, the largest reduced
  energy among the held-out reference samples: u -> min(u, u_max). A sample beyond the data's
  range then costs what the worst data energy costs, so the metric reads the bulk of the
  distribution and charges clashes a bounded amount.
- ``energy_above_reference_fraction``: the fraction of flow samples (non-finite ones
  included) whose reduced energy exceeds u_max: the share the cap acts on.
- ``distance_w1``: the Wasserstein-1 distance between the histograms of all interatomic
  distances of flow samples and of held-out samples (systems whose observables include
  ``pair_distance``: particles), in the system's length units (scipy's
  ``wasserstein_distance`` on the pooled distances).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance

_QUANTILES = (np.arange(1000) + 0.5) / 1000


def energy_w2(u_flow: np.ndarray, u_reference: np.ndarray) -> float:
    """W2 (kT) between the empirical distributions of two sets of reduced energies."""
    a = np.asarray(u_flow, dtype=np.float64)
    b = np.asarray(u_reference, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return float("nan")
    gap = np.quantile(a, _QUANTILES) - np.quantile(b, _QUANTILES)
    return float(np.sqrt(np.mean(gap**2)))


def energy_w2_capped(u_flow: np.ndarray, u_reference: np.ndarray) -> tuple[float, float]:
    """(W2 in kT of the energies capped at the reference's largest, fraction of flow samples
    above that cap): the module docstring's ``energy_w2_capped`` and
    ``energy_above_reference_fraction``."""
    a = np.asarray(u_flow, dtype=np.float64)
    b = np.asarray(u_reference, dtype=np.float64)
    b = b[np.isfinite(b)]
    if not len(a) or not len(b):
        return float("nan"), float("nan")
    cap = float(b.max())
    # nan (a failed energy) and +inf count as above the cap; -inf cannot come from a potential
    above = ~(a <= cap)
    return energy_w2(np.where(above, cap, a), b), float(above.mean())


def distribution_metrics(u_flow: np.ndarray, u_reference: np.ndarray | None,
                         observables_flow: dict[str, np.ndarray],
                         observables_reference: dict[str, np.ndarray]) -> dict[str, float]:
    """``energy_w2`` with its capped companions (where the reference's energies are known) and
    ``distance_w1`` (where the system reports pair distances) of the module docstring."""
    out: dict[str, float] = {}
    if u_reference is not None and len(u_reference):
        out["energy_w2"] = energy_w2(u_flow, u_reference)
        out["energy_w2_capped"], out["energy_above_reference_fraction"] = energy_w2_capped(
            u_flow, u_reference)
    if "pair_distance" in observables_flow and len(observables_reference.get(
            "pair_distance", ())):
        flow_d = observables_flow["pair_distance"]
        flow_d = flow_d[np.isfinite(flow_d)]
        if len(flow_d):
            out["distance_w1"] = float(wasserstein_distance(
                flow_d, observables_reference["pair_distance"]))
    return out
