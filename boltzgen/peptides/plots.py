"""Peptide figures (matplotlib, Agg canvas, no pyplot state, like :mod:`boltzgen.plots`): each
function writes one PNG to ``path`` (under a temporary name, renamed into place) and returns
the path. Angles in rad, energies in kJ/mol, free energies in kT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from boltzgen._files import write_atomically
from boltzgen.estimators import kish_ess_fraction, normalized_weights
from boltzgen.peptides.observables import delta_f_phi, ramachandran_free_energy
from boltzgen.plots import _new_figure, energy_histograms

F_MAX_KT = 10.0
"""Top of the colour scale of free-energy surfaces (kT); higher bins get its colour."""


def ramachandran_plot(path: str | Path, phi: np.ndarray, psi: np.ndarray, title: str,
                      weights: np.ndarray | None = None, bins: int = 60) -> Path:
    """The free-energy surface F(φ, ψ) in kT (0 at the most populated bin, blank where no
    sample falls) of samples ``phi``, ``psi`` (rad), optionally weighted."""
    fig = _new_figure(4.6, 3.8)
    image = _surface(fig.add_subplot(), phi, psi, weights, bins, title)
    fig.colorbar(image, label="F (kT)")
    return _save(fig, path)


def flow_ramachandran_plot(path: str | Path, md: tuple[np.ndarray, np.ndarray],
                           flow: tuple[np.ndarray, np.ndarray], log_weights: np.ndarray,
                           title: str = "", bins: int = 60) -> Path:
    """Three free-energy surfaces F(φ, ψ) (kT) side by side on one colour scale: MD frames,
    raw flow samples, and the flow samples reweighted by ``log_weights`` (log w up to a
    constant; non-finite: weight zero). Panel titles give ΔF_φ = −ln(P(φ>0) / P(φ≤0)) (kT),
    and the reweighted panel the Kish ESS fraction."""
    log_w = np.asarray(log_weights, dtype=np.float64)
    weights = normalized_weights(log_w)
    fig = _new_figure(13.5, 4.0)
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    ess = f"{100.0 * kish_ess_fraction(log_w):.1f} %" if len(log_w) else "no valid sample"
    panels = (("MD", md, None), ("flow, raw", flow, None),
              (f"flow, reweighted (ESS {ess})", flow, weights))
    image = None
    for ax, (label, (phi, psi), w) in zip(axes, panels, strict=True):
        keep = slice(None) if w is None else w > 0
        if len(phi) < 2 or (w is not None and np.count_nonzero(keep) < 2):
            ax.set_title(f"{label}: fewer than 2 samples", fontsize="small")
            continue
        phi, psi = np.asarray(phi)[keep], np.asarray(psi)[keep]
        w = None if w is None else w[keep]
        image = _surface(ax, phi, psi, w, bins,
                         f"{label}\nΔF_φ = {delta_f_phi(phi, w):.2f} kT, n = {len(phi)}")
    if image is not None:
        fig.colorbar(image, ax=axes, label="F (kT)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def energy_histogram_plot(path: str | Path, md_energy_kj_per_mol: np.ndarray,
                          flow_energy_kj_per_mol: np.ndarray, log_weights: np.ndarray,
                          title: str = "potential energy") -> Path:
    """Normalized histograms of the potential energy U (kJ/mol): MD frames, raw flow samples,
    and the flow samples reweighted by ``log_weights`` (left out when no weight is positive)."""
    flow = np.asarray(flow_energy_kj_per_mol, dtype=np.float64)
    weights = normalized_weights(np.asarray(log_weights, dtype=np.float64))
    energies = {"MD": md_energy_kj_per_mol, **({"flow, raw": flow} if len(flow) else {})}
    if np.any(weights[np.isfinite(flow)] > 0):
        energies["flow, reweighted"] = flow
    fig = energy_histograms(energies, {"flow, reweighted": weights}, "kJ/mol", title)
    return _save(fig, path)


def _surface(ax, phi: np.ndarray, psi: np.ndarray, weights: np.ndarray | None, bins: int,
             title: str):
    free_energy, edges = ramachandran_free_energy(phi, psi, weights, bins)
    image = ax.pcolormesh(edges, edges, np.ma.masked_invalid(free_energy).T, cmap="viridis",
                          vmin=0.0, vmax=F_MAX_KT, shading="flat")
    ax.set_xlabel("φ (rad)")
    ax.set_ylabel("ψ (rad)")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize="small")
    return image


def _save(fig: Figure, path: str | Path) -> Path:
    return write_atomically(path, lambda staging: fig.savefig(staging, format="png"))
