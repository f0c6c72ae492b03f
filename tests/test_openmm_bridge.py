"""One torch <-> OpenMM bridge: ice's own potential runs on the job's energy.platform, a frame
with non-finite coordinates costs its own energy only, and a GPU platform for ice's torch
backend needs GPUs on the roles that call the potential."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from boltzgen.openmm_bridge import BatchEnergy, OpenMMEvaluator
from boltzgen.pipeline import make_energy_function
from boltzgen.systems import make_system
from campaign.cli import app
from tests.conftest import write_spec

ICE = {"kind": "ice_xi", "molecules": 16}


def test_ice_potential_runs_on_the_jobs_platform() -> None:
    """The torch backend's energy function (ice's own potential) runs on energy.platform: the
    double-precision Reference platform differs from CPU's mixed precision in the last digits
    (so it was used) and agrees to float32 round-off."""
    x = make_system(ICE).ideal_coordinates()[None]
    energies = {platform: make_energy_function(
        {"system": ICE, "energy": {"backend": "torch", "platform": platform}})(x)[0]
        for platform in ("CPU", "Reference")}
    assert energies["Reference"][0] != energies["CPU"][0]
    np.testing.assert_allclose(energies["Reference"], energies["CPU"], rtol=1e-5)
    system = make_system(ICE)
    system.set_openmm_platform("Reference")
    system.potential(torch.as_tensor(x))
    assert system._evaluator.platform == "Reference"


def test_non_finite_frames_get_nan_energy_on_every_path() -> None:
    """The pooled OpenMM path (flow coordinates) no longer raises on a non-finite frame: it
    gets U = NaN like ice's own potential, and the other frames keep their energies."""
    system = make_system(ICE)
    x = np.repeat(system.ideal_coordinates()[None], 2, axis=0)
    x[1, 5] = np.nan
    u, _ = make_energy_function({"system": ICE, "energy": {"backend": "openmm"}})(x)
    local = system.potential(torch.as_tensor(x)).numpy()
    assert np.isfinite(u[0]) and np.isnan(u[1]) and np.isnan(local[1])
    np.testing.assert_allclose(u[0], local[0], rtol=1e-6)


def test_batch_energy_broadcasts_the_gradient_over_any_trailing_shape() -> None:
    """U = Σ x² / 2 per row of (B, n, 3) positions through BatchEnergy: ∂(w · U)/∂x = w x."""
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    def energy(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return 0.5 * (a**2).sum(axis=(1, 2)), a

    (BatchEnergy.apply(x, energy) * w).sum().backward()
    torch.testing.assert_close(x.grad, w[:, None, None] * x.detach())


def test_evaluator_refuses_an_unknown_platform() -> None:
    system = make_system(ICE)
    system.set_openmm_platform("Metal")
    with pytest.raises(ValueError, match="energy.platform: 'Metal' is not allowed"):
        system.potential(torch.as_tensor(system.ideal_coordinates()[None]))
    assert OpenMMEvaluator("<System/>", platform="Reference").platform == "Reference"


def test_gpu_platform_for_ice_with_torch_backend_needs_gpu_trainers(workdir: Path) -> None:
    data = yaml.safe_load((Path(__file__).parent.parent / "specs" / "ice.yaml").read_text())
    data["energy"] = {"backend": "torch", "platform": "CUDA"}
    data["resources"]["reference"]["gpus"] = 0.5
    data["resources"]["energy_evaluator"]["gpus"] = 0.5
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: resources.trainer.gpus: 0.0 is not allowed;")
