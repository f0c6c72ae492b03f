"""Diagnostic figures (matplotlib, Agg canvas, no pyplot state). Functions return Figures;
the caller saves them (``fig.savefig(path)``) or logs them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from boltzgen._files import write_atomically
from boltzgen.estimators import kish_ess_fraction

_BINS = 60


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figures(figures: dict[str, Figure], directory: str | Path) -> dict[str, str]:
    """Write each figure as PNG to ``directory/<name>`` and return name -> path.

    Each file is written under a temporary name and renamed, so that a reader (the driver,
    logging it) never sees half a file, and a task run again overwrites whole files."""
    paths = {}
    for name, figure in figures.items():
        path = write_atomically(Path(directory) / name,
                                lambda staging, figure=figure: figure.savefig(staging,
                                                                              format="png"))
        paths[name] = str(path)
    return paths


def log_weight_histogram(log_w: np.ndarray, title: str) -> Figure:
    """Histogram of the normalized log weights log w - max(log w) (<= 0; kT units).

    The legend gives the Kish ESS fraction exp(2 lse(log w) - lse(2 log w)) / N and the number of
    non-finite log weights (weight zero, counted in N).
    """
    lw = np.asarray(log_w, dtype=np.float64).reshape(-1)
    finite = lw[np.isfinite(lw)]
    fig = _new_figure(5.0, 3.5)
    ax = fig.add_subplot()
    n_bad = lw.size - finite.size
    if finite.size:
        ess = kish_ess_fraction(lw)
        ax.hist(
            finite - finite.max(),
            bins=_BINS,
            color="C0",
            alpha=0.8,
            label=f"ESS = {100.0 * ess:.2f} % of N = {lw.size}; non-finite: {n_bad}",
        )
        ax.legend(loc="upper left", fontsize="small")
    else:
        ax.text(
            0.5, 0.5, f"no finite log weight (N = {lw.size})", ha="center", transform=ax.transAxes
        )
    ax.set_xlabel("log w - max log w")
    ax.set_ylabel("count")
    ax.set_title(title)
    return fig


def marginals(
    sampled: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    weights: dict[str, np.ndarray] | None,
    title: str,
) -> Figure:
    """One panel per observable key of ``sampled``: density histograms of flow samples (raw and,
    if ``weights`` has the key, importance-reweighted) against ``reference`` samples.

    ``weights[key]`` (non-negative, unnormalized, same length as ``sampled[key]``; non-finite
    entries count as zero). For per-pair observables repeat each sample's weight per pair.
    """
    keys = list(sampled)
    if not keys:
        raise ValueError("sampled: empty; need at least one observable")
    weights = weights or {}
    for key in keys:
        if key in weights and np.size(weights[key]) != np.size(sampled[key]):
            raise ValueError(
                f"weights[{key!r}]: length {np.size(weights[key])} does not match "
                f"sampled[{key!r}] length {np.size(sampled[key])}"
            )
    n_cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    fig = _new_figure(4.0 * n_cols, 3.2 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).reshape(-1)
    for ax, key in zip(axes, keys, strict=False):
        flow_values = np.asarray(sampled[key], dtype=np.float64).reshape(-1)
        ok = np.isfinite(flow_values)
        ref_values = np.asarray(reference.get(key, np.empty(0)), dtype=np.float64).reshape(-1)
        ref_values = ref_values[np.isfinite(ref_values)]
        pooled = np.concatenate([flow_values[ok], ref_values])
        if pooled.size == 0:
            ax.set_title(f"{key}: no finite values")
            continue
        lo, hi = np.percentile(pooled, [0.5, 99.5])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, _BINS + 1)
        style = {"bins": edges, "density": True, "histtype": "step", "linewidth": 1.5}
        if ref_values.size:
            ax.hist(ref_values, color="k", label="reference", **style)
        if ok.any():
            ax.hist(flow_values[ok], color="C0", label="flow (raw)", **style)
        if key in weights:
            w = np.asarray(weights[key], dtype=np.float64).reshape(-1)[ok]
            w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
            if w.sum() > 0:
                ax.hist(flow_values[ok], weights=w, color="C3", label="flow (reweighted)", **style)
        ax.set_xlabel(key)
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def axis_direction_maps(flow_axes: dict[str, np.ndarray], exact_axes: dict[str, np.ndarray],
                        title: str) -> Figure:
    """Where each body axis points: 2-D histograms over (azimuth, cos polar angle), an equal-area
    map of the sphere, flow samples (left) against exact samples (right), one row per axis.

    ``*_axes`` map an axis name to unit vectors (N, 3) in the lab frame.
    """
    names = list(exact_axes)
    fig = _new_figure(8.0, 2.6 * len(names))
    bins = (48, 24)
    extent = [[-math.pi, math.pi], [-1.0, 1.0]]
    for row, name in enumerate(names):
        for col, (label, vectors) in enumerate((("flow", flow_axes[name]),
                                               ("exact", exact_axes[name]))):
            v = np.asarray(vectors, dtype=np.float64)
            ax = fig.add_subplot(len(names), 2, 2 * row + col + 1)
            ax.hist2d(np.arctan2(v[:, 1], v[:, 0]), v[:, 2], bins=bins, range=extent,
                      density=True, cmap="viridis")
            ax.set_title(f"{title}: body {name} axis, {label}", fontsize=9)
            ax.set_xlabel("azimuth (rad)")
            ax.set_ylabel("cos(polar angle)")
    return fig


def radial_distributions(
        curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]],
        title: str) -> Figure:
    """One column per pair type (e.g. "O-O"). Top: g(r) of each labelled sample set over r (nm).
    Bottom, where both "flow, reweighted" and "target MD" are present: their difference with a
    ±2σ band, σ² the sum of their bootstrap variances (the scale of ``rdf_<pair>_max_z``)."""
    residuals = any({"flow, reweighted", "target MD"} <= set(c) for c in curves.values())
    rows = 2 if residuals else 1
    fig = _new_figure(4.2 * max(1, len(curves)), 3.5 + 2.2 * (rows - 1))
    styles = ("-", "--", ":", "-.")
    for index, (pair, by_label) in enumerate(curves.items()):
        ax = fig.add_subplot(rows, len(curves), index + 1)
        for k, (label, (r, g, _)) in enumerate(by_label.items()):
            ax.plot(r, g, styles[k % len(styles)], color=f"C{k}", label=label)
        ax.set_xlabel("r (nm)")
        ax.set_ylabel(f"g(r) {pair}")
        ax.set_title(f"{title}: {pair}", fontsize="small")
        ax.legend(fontsize="x-small")
        if residuals and {"flow, reweighted", "target MD"} <= set(by_label):
            r, flow, flow_err = by_label["flow, reweighted"]
            _, target, target_err = by_label["target MD"]
            band = 2.0 * np.sqrt(flow_err ** 2 + target_err ** 2)
            ax = fig.add_subplot(rows, len(curves), len(curves) + index + 1)
            ax.fill_between(r, -band, band, color="0.8", linewidth=0, label="±2σ")
            ax.plot(r, flow - target, color="C2", label="flow, reweighted − target MD")
            ax.axhline(0.0, color="0.4", linewidth=0.5)
            ax.set_xlabel("r (nm)")
            ax.set_ylabel(f"Δg(r) {pair}")
            ax.legend(fontsize="x-small")
    return fig


def energy_histograms(energies: dict[str, np.ndarray], weights: dict[str, np.ndarray],
                      unit: str, title: str) -> Figure:
    """Overlaid normalized histograms of potential energies (``unit``) of labelled sample sets;
    a set listed in ``weights`` is histogrammed with those (importance) weights."""
    fig = _new_figure(5.0, 3.5)
    ax = fig.add_subplot()
    finite = {k: np.asarray(v, dtype=np.float64) for k, v in energies.items()}
    pooled = np.concatenate([v[np.isfinite(v)] for v in finite.values()] or [np.zeros(1)])
    lo, hi = np.percentile(pooled, [0.5, 99.5]) if pooled.size else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, _BINS + 1)
    for k, (label, values) in enumerate(finite.items()):
        mask = np.isfinite(values)
        w = weights.get(label)
        ax.hist(values[mask], bins=bins, density=True, histtype="step", color=f"C{k}",
                weights=None if w is None else np.asarray(w)[mask],
                label=f"{label} (n = {mask.sum()})")
    ax.set_xlabel(f"potential energy ({unit})")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize="x-small")
    return fig


def tempering_schedule(series: dict[str, list[float]]) -> Figure:
    """The adaptive tempering schedule (:mod:`boltzgen.tempering`): β after each accepted step
    against the optimizer step at which it was taken (log scale), and the KL estimate at the
    old β with its increase at the new one (nats)."""
    fig = _new_figure(9.0, 3.4)
    steps = np.asarray(series["tempering_at_step"])
    ax = fig.add_subplot(1, 2, 1)
    ax.step(steps, series["tempering_beta"], where="post", marker="o", markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("β (multiplies the reduced energy u = U/kT)")
    ax.set_title(f"β schedule: {len(steps)} steps to β = {series['tempering_beta'][-1]:.3g}")
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(steps, series["tempering_kl_estimate_nats"], marker="o", markersize=3,
            label="KL̂(q ‖ p_β) at the old β")
    ax.plot(steps, series["tempering_kl_increase_nats"], marker="s", markersize=3,
            label="increase at the new β")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats")
    ax.legend(fontsize=7)
    return fig
