"""Plots return Agg-backed Figures with the expected panels and legends."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.figure import Figure

from boltzgen.plots import log_weight_histogram, marginals


def test_log_weight_histogram() -> None:
    log_w = np.append(np.random.default_rng(0).normal(size=500), [np.nan, -np.inf])
    fig = log_weight_histogram(log_w, "double well, LFEP")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    legend = ax.get_legend().get_texts()[0].get_text()
    assert "ESS" in legend and "N = 502" in legend and "non-finite: 2" in legend
    assert ax.get_title() == "double well, LFEP"
    fig.savefig(io.BytesIO(), format="png")
    empty = log_weight_histogram(np.array([np.nan]), "nothing finite")
    assert isinstance(empty, Figure)


def test_marginals() -> None:
    rng = np.random.default_rng(1)
    sampled = {"x1": rng.normal(size=300), "x2": rng.normal(size=300), "energy": rng.random(300)}
    reference = {"x1": rng.normal(size=200), "x2": rng.normal(size=200)}
    weights = {"x1": rng.random(300)}
    fig = marginals(sampled, reference, weights, "marginals")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3
    labels = [t.get_text() for t in visible[0].get_legend().get_texts()]
    assert labels == ["reference", "flow (raw)", "flow (reweighted)"]
    assert [t.get_text() for t in visible[2].get_legend().get_texts()] == ["flow (raw)"]
    fig.savefig(io.BytesIO(), format="png")
    with pytest.raises(ValueError, match=r"weights\['x1'\]: length 3"):
        marginals(sampled, reference, {"x1": np.ones(3)}, "bad")
