"""Shared fixtures: tiny specs, an isolated working directory and MLflow store per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

TINY_SPEC = {
    "name": "tiny",
    "seed": 11,
    "system": {"kind": "double_well"},
    "base": {"kind": "normal", "scale": 2.0},
    "temperature": 1.0,
    "reference": {"ladder_size": 3, "n_chains": 512, "n_steps": 1200, "burn_in": 400, "thin": 4},
    "flow": {"kind": "spline_coupling", "n_layers": 4, "hidden": 32},
    "training": {"objective": "maximum_likelihood", "steps": 300, "batch_size": 256,
                 "learning_rate": 0.003},
    "sampling": {"n_samples": 4000, "energy_batch_size": 2000},
    "resources": {"reference": {"count": 1, "cpus": 0.25}, "trainer": {"count": 2, "cpus": 0.5},
                  "sampler": {"count": 1, "cpus": 0.25},
                  "energy_evaluator": {"count": 2, "cpus": 0.25}},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a small shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh directory with a SQLite store of its own and no inherited Ray cluster."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def write_spec(directory: Path, data: dict, name: str = "spec.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
