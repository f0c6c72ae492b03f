"""Peptides end to end: a capped residue built from its sequence, a replica-exchange MD
reference shared by the jobs that need it, a Boltzmann generator in internal coordinates
trained on its frames and reweighted with OpenMM energies, and the free energy between the
φ states from both; in process (the scheduler and Ray are tested elsewhere with the same
graphs). Tiny settings: the numbers are not converged, the test checks that every piece is
there, finite where it must be, and consistent."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

from boltzgen import pipeline
from campaign.plan import make_plan
from campaign.spec import parse_spec

TINY_PEPTIDES = {
    "name": "peptides-tiny",
    "seed": 5,
    "system": {"kind": "peptide", "sequence": "ACE-ALA-NME", "force_field": "amber99sbildn-obc"},
    "temperature": 300.0,
    "base": {"kind": "normal"},
    "reference": {"sampler": "md", "holdout_fraction": 0.3,
                  "md": {"equilibration_ps": 0.5, "production_ps": 3.0,
                         "frame_interval_ps": 0.02, "replica_temperatures": [300.0, 400.0],
                         "exchange_interval_ps": 0.02}},
    "flow": {"kind": "internal_coordinates", "n_layers": 2, "hidden": 16},
    "training": {"objective": "maximum_likelihood", "steps": 40, "batch_size": 64,
                 "learning_rate": 0.003},
    "sampling": {"n_samples": 400, "energy_batch_size": 200},
    "energy": {"backend": "openmm"},
    "grid": {"training.learning_rate": [0.003, 0.002]},
}


def _plan(spec: dict):
    return make_plan(parse_spec(copy.deepcopy(spec)))


def test_jobs_of_one_peptide_share_its_md_run() -> None:
    plan = _plan(TINY_PEPTIDES)
    graphs = [pipeline.job_graph(job.config_dict, job.job_id, work_dir="w") for job in plan.jobs]
    md_keys = [[t.key for t in g.tasks if t.function.endswith("md_run_task")] for g in graphs]
    assert len(md_keys[0]) == 1 and md_keys[0] == md_keys[1]
    other = copy.deepcopy(TINY_PEPTIDES)
    other["system"] = {**other["system"], "sequence": "ACE-GLY-NME"}
    job = _plan(other).jobs[0]
    graph = pipeline.job_graph(job.config_dict, job.job_id, work_dir="w")
    assert [t.key for t in graph.tasks if t.function.endswith("md_run_task")] != md_keys[0]


def test_hydrogen_rotor_relabellings_keep_energy_and_chirality() -> None:
    """Alanine dipeptide's three methyls (ACE, ALA's CB, NME) give G = 27 cyclic relabellings;
    PHE-GLY has one (the free N-terminus's NH3+); the energy of every image equals its
    sample's to round-off (Reference platform, double precision: 1e-9 kJ/mol of |U| ~ 40),
    and every image stays L."""
    import torch

    from boltzgen.systems import make_system

    system = make_system({"kind": "peptide", "sequence": "ACE-ALA-NME"})
    system.set_openmm_platform("Reference")
    names = system.layout().atom_names
    assert [[names[i] for i in rotor] for rotor in system.hydrogen_rotors] == [
        ["H1", "H2", "H3"], ["HB1", "HB2", "HB3"], ["H1", "H2", "H3"]]
    assert system.symmetry_operation_count == 27 and system.supports_symmetry_images()
    assert make_system({"kind": "peptide", "sequence": "PHE-GLY",
                        "force_field": "amber14-obc1"}).symmetry_operation_count == 3
    x = system.ideal_coordinates()[None] + np.random.default_rng(3).normal(0, 0.003, (2, 66))
    images = system.symmetry_images(x)
    assert images.shape == (54, 66)
    np.testing.assert_array_equal(images[:2], x)  # operation 0 is the identity
    assert len({images[g * 2].tobytes() for g in range(27)}) == 27  # all distinct
    u = system.potential(torch.as_tensor(images)).detach().numpy().reshape(27, 2)
    assert np.ptp(u, axis=0).max() < 1e-9
    assert system.valid_samples(images).all()
    ops = np.array([26, 5])
    np.testing.assert_array_equal(system.symmetry_images(x, ops),
                                  images.reshape(27, 2, 66)[ops, [0, 1]])
    with pytest.raises(ValueError, match=r"operations: .* in \[0, 27\)"):
        system.symmetry_images(x, np.array([0, 27]))


@pytest.mark.slow
def test_peptide_job_end_to_end(tmp_path: Path) -> None:
    job = _plan(TINY_PEPTIDES).jobs[0]
    outcome = pipeline.run_job(pipeline.job_graph(job.config_dict, job.job_id,
                                                  work_dir=str(tmp_path)))
    m = outcome.metrics
    assert m["atoms"] == 22.0
    assert 0.0 <= m["valid_fraction"] <= 1.0
    assert 0.0 < m["ess"] <= 1.0
    assert math.isfinite(m["nll"])
    assert m["md_ns"] == pytest.approx(0.003)
    assert m["md_replicas"] == 2.0
    # φ > 0 is rare at 300 K: a 3 ps run may never visit it, and then ΔF_φ is +inf with no
    # error bar, never a finite-looking number.
    assert "delta_f_phi_md" in m and m["md_transitions_phi"] >= 0
    if m["md_transitions_phi"] == 0:
        assert not math.isfinite(m["delta_f_phi_md"])
    assert "delta_f_phi" in m
    assert "nats" in outcome.params["nll_convention"]
    plots = {Path(p).name for p in outcome.files["plots"]}
    assert {"ramachandran_md.png", "ramachandran_flow.png", "energy_histograms.png"} <= plots
    for path in outcome.files["plots"]:
        assert Path(path).stat().st_size > 1000
    # The MD run is in the cache, in a format mdtraj reads.
    import mdtraj

    (entry,) = [p for p in (tmp_path / "md").iterdir() if p.is_dir()]
    traj = mdtraj.load(str(entry / "frames.dcd"), top=str(entry / "topology.pdb"))
    assert traj.n_atoms == 22 and traj.n_frames == 150
    assert np.isfinite(traj.xyz).all()


def test_peptide_system_geometry_validity_and_errors() -> None:
    import pickle

    import torch

    from boltzgen.systems import make_system

    system = make_system({"kind": "peptide", "sequence": "ace-ala-nme"})
    assert system.sequence == "ACE-ALA-NME" and system.dim == 66
    layout = system.layout()
    assert layout.atom_names[:2] == ("CH3", "H1") and layout.residue_names == ("ACE", "ALA",
                                                                                "NME")
    assert len(layout.bonds) == 21
    x = system.ideal_coordinates()[None]
    mirrored = -x  # x -> -x: every chiral centre becomes D, the energy stays the same
    np.testing.assert_array_equal(system.valid_samples(np.concatenate([x, mirrored])),
                                  [True, False])
    u = system.potential(torch.as_tensor(np.concatenate([x, mirrored])))
    assert abs(float(u[0] - u[1])) < 1e-6 * abs(float(u[0]))
    phi, psi = system.backbone_dihedrals(x)
    np.testing.assert_allclose(system.metastable_coordinate(x), phi)
    assert -np.pi < phi[0] < 0  # the minimised template sits in the phi < 0 basin
    clone = pickle.loads(pickle.dumps(system))
    assert float(clone.potential(torch.as_tensor(x))[0]) == pytest.approx(float(u[0]))
    for config, words in (({"sequence": "ACE-ALA-ALA-NME"}, ["system.sequence", "ACE-X-NME"]),
                          ({"force_field": "amber96"}, ["system.force_field", "amber96",
                                                        "amber14-obc1"])):
        with pytest.raises(ValueError) as error:
            make_system({"kind": "peptide", **config})
        assert all(word in str(error.value) for word in words), str(error.value)


@pytest.mark.slow
def test_a_failed_build_fails_its_job_and_the_others_finish(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peptide whose build fails (here: minimisation made to fail for glycine) fails its own
    job with the cause; the other peptide's job finishes (the in-process backend, where the
    patched builder is the one that runs)."""
    import json

    from typer.testing import CliRunner

    import boltzgen.peptides.build as build
    from boltzgen.peptides import PeptideBuildError
    from campaign.cli import app
    from tests.conftest import write_spec

    real = build._build

    def failing(sequence: tuple[str, ...], force_field: str):
        if "GLY" in sequence:
            raise PeptideBuildError("energy: ACE-GLY-NME minimised to nan kJ/mol; must be "
                                    "finite (a clash minimisation could not remove)")
        return real(sequence, force_field)

    monkeypatch.setattr(build, "_build", failing)
    data = copy.deepcopy(TINY_PEPTIDES)
    data["grid"] = {"system": [TINY_PEPTIDES["system"],
                               {"kind": "peptide", "sequence": "ACE-GLY-NME",
                                "force_field": "amber99sbildn-obc"}]}
    data["reference"]["md"].update(production_ps=1.0, replica_temperatures=None,
                                   exchange_interval_ps=None)
    data["reference"]["md"] = {k: v for k, v in data["reference"]["md"].items()
                               if v is not None}
    data["tracking"] = {"experiment": "peptides-tiny"}
    result = CliRunner().invoke(app, ["launch", str(write_spec(workdir, data)), "--backend",
                                      "local", "--format", "json"])
    summary = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert len(summary["finished"]) == 1 and len(summary["failed"]) == 1, summary
    assert "minimised to nan" in json.dumps(summary["failed"]), summary["failed"]
    # Nothing half-written: the failed peptide's MD left no cache entry.
    entries = [p for p in (workdir / "campaign-work").rglob("frames.npz")]
    assert len(entries) == 1


def test_compare_names_each_peptide_and_its_force_field() -> None:
    from campaign.cli import _system_cell

    assert _system_cell({"system.kind": "peptide", "system.sequence": "ACE-ALA-NME",
                         "system.force_field": "amber99sbildn-obc", "temperature": 300.0}
                        ) == "peptide/ACE-ALA-NME/amber99sbildn-obc"
    assert _system_cell({"system.kind": "ice_xi", "system.molecules": 16}) == "ice_xi"
