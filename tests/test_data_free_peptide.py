"""Data-free alanine dipeptide: the coarse-grained latent model on a molecule (slow φ and the
CA–C rotation on a torus, the other internal coordinates Gaussian given them), the
Ramachandran basins as the peptide's modes, and a tempered job end to end with a tiny MD
reference beside it for the evaluation alone; in process."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzgen import pipeline
from boltzgen.flows import build_flow
from boltzgen.internal_coordinates import dihedral
from boltzgen.systems import make_system
from campaign.plan import make_plan
from campaign.spec import parse_spec
from tests.conftest import write_spec
from tests.test_peptides import TINY_PEPTIDES


@pytest.fixture(scope="module")
def aldp():
    return make_system({"kind": "peptide"})


def _model(system, **settings):
    torch.manual_seed(0)
    flow = build_flow(system.layout(), {"kind": "coarse_grained", "n_layers": 2, "hidden": 16,
                                        **settings})
    flow.fit_to_structure(torch.as_tensor(system.ideal_coordinates()))
    return flow


def test_the_slow_variables_are_phi_and_the_ca_c_rotation(aldp) -> None:
    """The declared slow torsions are φ (C-N-CA-C) and ψ (N-CA-C-N); the model's slow
    variables are the Z-matrix torsions about those bonds: φ itself, and N-CA-C-O, which is
    ψ + π up to the peptide plane's twist. Centred at the minimised structure, the latent
    point (its slow torsions, fast = 0) is that structure, to round-off."""
    layout = aldp.layout()
    top = aldp.topology
    assert layout.slow_torsions == (tuple(top.phi_atoms), tuple(top.psi_atoms))
    flow = _model(aldp)
    x0 = torch.as_tensor(aldp.ideal_coordinates())
    slow, fast, _ = flow.bijection.inverse(x0[None])
    assert float(fast.abs().max()) < 1e-12
    phi, psi = aldp.backbone_dihedrals(x0[None].numpy())
    assert abs(float(slow[0, 0]) - phi[0]) < 1e-12
    assert abs(math.remainder(float(slow[0, 1]) - psi[0] - math.pi, 2 * math.pi)) < 0.1
    y, _ = flow.bijection(slow, fast)
    ic_back = flow.bijection.zmatrix.to_internal(y.reshape(1, -1, 3))
    ic_ref = flow.bijection.zmatrix.to_internal(x0.reshape(1, -1, 3))
    for a, b in zip(ic_back, ic_ref, strict=True):
        assert float((a - b).abs().max()) < 1e-10


def test_every_sample_of_the_molecular_model_is_a_molecule_with_a_density(aldp) -> None:
    """Bonds through exp, angles through π·sigmoid, torsions through 2·atan: every latent
    point maps to bonds > 0 and angles in (0, π), so log q is finite for every draw, even
    with the fast variables 4 standard deviations out; log_prob of the draws reproduces it."""
    flow = _model(aldp)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
        latent = flow.prior.sample(256, torch.Generator().manual_seed(1))
        latent[:, 2:] *= 4.0
        y, log_det = flow(latent)
        log_q = flow.prior.log_prob(latent) - log_det
        assert bool(torch.isfinite(log_q).all()) and bool(torch.isfinite(y).all())
        assert float((flow.log_prob(y) - log_q).abs().max()) < 1e-8


def test_ramachandran_basins_of_alanine_dipeptide(aldp) -> None:
    """The basins' centres (φ, ψ in degrees) land in their own basins: C5, C7eq, αR on
    φ < 0, αL and C7ax on φ > 0 (the model's slow latent sets φ and ψ + π exactly at the
    identity start)."""
    flow = _model(aldp)
    centres = {"C5": (-155, 160), "C7eq": (-83, 75), "alphaR": (-75, -40),
               "alphaL": (60, 40), "C7ax": (75, -65)}
    slow = torch.tensor([[math.radians(p), math.remainder(math.radians(s) + math.pi,
                                                          2 * math.pi)]
                         for p, s in centres.values()], dtype=torch.float64)
    fast = torch.zeros((len(centres), flow.fast_dim), dtype=torch.float64)
    with torch.no_grad():
        x, _ = flow.bijection(slow, fast)
    labels = aldp.mode_index(x.numpy())
    assert [aldp.mode_names[i] for i in labels] == list(centres)
    phi, _ = aldp.backbone_dihedrals(x.numpy())
    assert np.allclose(np.degrees(phi), [p for p, _ in centres.values()], atol=1e-8)
    # ψ of N-CA-C-N against the model's N-CA-C-O + π: the peptide plane's twist, small
    xyz = x.reshape(len(centres), -1, 3)
    quad = aldp.topology.psi_atoms
    psi = dihedral(*(xyz[:, i] for i in quad))
    assert np.allclose(np.degrees(psi.numpy()), [s for _, s in centres.values()], atol=10)


def _tiny_data_free_aldp(backend: str = "openmm") -> dict:
    data = copy.deepcopy(TINY_PEPTIDES)
    data.pop("grid")
    data["flow"] = {"kind": "coarse_grained", "n_layers": 2, "hidden": 16, "fast_linear": True}
    data["training"] = {"objective": "adaptive_tempering", "steps": 60, "batch_size": 64,
                        "learning_rate": 0.001, "energy_cap_kt": 10000.0,
                        "tempering": {"beta0": 0.8, "delta": 50.0, "steps_per_level": 10,
                                      "final_steps": 10, "check_samples": 128}}
    data["energy"] = {"backend": backend, "platform": "Reference"}
    return data


@pytest.mark.parametrize("backend", ["openmm", "torch_forcefield"])
def test_a_data_free_peptide_job_trains_beside_its_md_and_is_evaluated_against_it(
        tmp_path: Path, backend: str) -> None:
    """Training waits for no reference (the MD is for the evaluation alone); the outcome has
    the tempering's record, ΔF_φ of the flow and of the MD, and the Ramachandran basins'
    weights of the flow (drawn, reweighted) against the MD frames' (which sum to 1). With
    ``torch_forcefield`` the trainer and the evaluation compute U in PyTorch."""
    job = make_plan(parse_spec(_tiny_data_free_aldp(backend))).jobs[0]
    graph = pipeline.job_graph(job.config_dict, job.job_id, work_dir=str(tmp_path))
    (train,) = [task for task in graph.tasks if task.stage == "train"]
    assert train.inputs == {}
    metrics = pipeline.run_job(graph).metrics
    assert metrics["tempering_beta_reached"] == 1.0
    assert "delta_f_phi" in metrics and "delta_f_phi_md" in metrics  # inf: 3 ps hold no φ > 0
    for name in ("delta_f", "ess", "nll", "mode_weight_error",
                 "mode_weight_error_reweighted", "time_train_cpu_seconds"):
        assert math.isfinite(metrics[name]), name
    reference = [metrics[f"mode_weight_reference_{i}"] for i in range(5)]
    drawn = [metrics[f"mode_weight_drawn_{i}"] for i in range(5)]
    assert abs(sum(reference) - 1) < 1e-12 and abs(sum(drawn) - 1) < 1e-12
    assert metrics["mode_weight_error"] == pytest.approx(
        max(abs(a - b) for a, b in zip(drawn, reference, strict=True)))
    assert "mode_weight_error_noise" not in metrics  # MD frames are correlated


@pytest.mark.parametrize(("path", "value", "message"), [
    (("flow", "bound"), 3.0, "flow.bound: 3.0 is not allowed for a molecule"),
    (("flow", "fast_linear"), "yes", "flow.fast_linear: 'yes' is not allowed; true or false"),
    (("flow", "slow_dim"), 3, "flow.slow_dim: 3 is not allowed; the system declares 2 slow"),
    (("system", "kind"), "double_well", "energy.backend: 'torch_forcefield' is not allowed; "
     "system 'double_well' is not a molecule with an OpenMM force field"),
    (("training", "objective"), "maximum_likelihood",
     "training.energy_cap_kt: 10000.0 is not allowed; it caps the energies of reverse-KL "
     "training"),
])
def test_bad_molecular_coarse_grained_settings_are_refused(
        tmp_path: Path, path: tuple[str, str], value: object, message: str) -> None:
    from typer.testing import CliRunner

    from campaign.cli import app

    data = _tiny_data_free_aldp()
    data[path[0]][path[1]] = value
    if value == "maximum_likelihood":
        data["training"].pop("tempering")
    if value == "double_well":
        data["system"] = {"kind": "double_well"}
        data["temperature"] = 1.0
        data["energy"] = {"backend": "torch_forcefield"}
        data["reference"] = {"sampler": "none"}
        data["flow"].pop("fast_linear")
    result = CliRunner().invoke(app, ["validate", str(write_spec(tmp_path, data))])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_flow_with_no_valid_sample_still_gets_its_plots(aldp, tmp_path: Path) -> None:
    """A data-free flow can learn the mirror image (the force field is achiral): every sample
    D, none valid. The Ramachandran and energy plots then show the MD alone, not a crash."""
    from boltzgen.peptides.plots import energy_histogram_plot, flow_ramachandran_plot

    phi, psi = aldp.backbone_dihedrals(np.zeros((0, aldp.dim)))
    assert phi.shape == psi.shape == (0,)
    md = (np.random.default_rng(0).uniform(-3, 3, 50), np.random.default_rng(1).uniform(-3, 3, 50))
    assert flow_ramachandran_plot(tmp_path / "r.png", md, (phi, psi), np.zeros(0)).exists()
    assert energy_histogram_plot(tmp_path / "e.png", np.random.default_rng(2).normal(size=50),
                                 np.zeros(0), np.zeros(0)).exists()
