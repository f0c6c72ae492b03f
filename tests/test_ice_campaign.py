"""`campaign launch` / `compare` on a tiny ice XI spec, end to end (real OpenMM and MLflow; the
local backend: the task graphs in the test's process, as on Ray, without Ray's start-up).

Two targets share one base MD run; MD lengths, ladder and training are tiny, so only the
plumbing and the bookkeeping are checked here (the numbers are checked by specs/ice.yaml):
every metric the ice issue names, the JSON params, the cache entries, the checkpoint, and the
RDF and energy-histogram artifacts. A relaunch reuses everything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from campaign.cli import app
from tests.conftest import write_spec

runner = CliRunner()

SPEC_PATH = Path(__file__).resolve().parents[1] / "specs" / "ice.yaml"


def tiny_ice_spec() -> dict:
    """specs/ice.yaml (ladders of 5 and 10 temperatures) with MD of 1 ps per temperature and
    4 training steps, held out by the plain time split: 40 frames are too few for interleaved
    blocks (each held-out block loses a correlation time of frames next to a training block,
    and g of a 1 ps run is several frames); test_ice.py checks the interleaved split."""
    spec = yaml.safe_load(SPEC_PATH.read_text())
    spec["name"] = "ice-tiny"
    spec["reference"]["md"] = {"equilibration_ps": 0.1, "production_ps": 1.0,
                               "frame_interval_ps": 0.025}
    del spec["reference"]["holdout_blocks"]
    spec["flow"].update(n_blocks=1, channels=8, attention_blocks=0, mixture_components=2)
    spec["training"].update(steps=4, batch_size=4, warm_start_steps=2)
    spec["tracking"] = {"experiment": "ice-tiny"}
    # Training and energies here take a second: one trainer and one evaluator (each actor is
    # a process that imports torch and OpenMM, seconds of start-up on a small machine).
    spec["resources"]["trainer"]["count"] = 1
    spec["resources"]["energy_evaluator"]["count"] = 1
    return spec


def test_tiny_ice_campaign_reports_what_the_issue_names(workdir: Path) -> None:
    spec = write_spec(workdir, tiny_ice_spec())
    launch = runner.invoke(app, ["launch", str(spec), "--format", "json", "--backend", "local"])
    assert launch.exit_code == 0, launch.output
    assert len(json.loads(launch.stdout)["finished"]) == 2

    # 5 + 10 ladder temperatures, 250 K shared: 14 MD runs in the cache, each with frames and
    # a topology mdtraj reads; one checkpoint per job.
    work = workdir / "campaign-work" / "ice-tiny"
    entries = sorted(p for p in (work / "md").iterdir() if p.is_dir())
    assert len(entries) == 14
    assert all((e / "frames.dcd").is_file() and (e / "topology.pdb").is_file() for e in entries)
    job_ids = sorted(json.loads(launch.stdout)["finished"])
    assert sorted(p.parent.name for p in (work / "checkpoints").glob("*/flow.pt")) == job_ids

    compare = runner.invoke(app, ["compare", str(spec), "--format", "json"])
    assert compare.exit_code == 0, compare.output
    rows = json.loads(compare.stdout)
    assert sorted(float(r["params"]["target_temperature_k"]) for r in rows) == [50.0, 100.0]
    for row in rows:
        assert row["status"] == "FINISHED"
        assert row["params"]["molecules"] == 16  # typed, not MLflow's string
        assert float(row["params"]["base_temperature_k"]) == 250.0
        m = row["metrics"]
        for method in ("lfep", "lbar", "mbar"):
            for suffix in ("", "_err", "_per_molecule", "_per_molecule_err"):
                assert math.isfinite(m[f"delta_f_{method}{suffix}"]), (method, suffix)
            assert m[f"delta_f_{method}_per_molecule"] * 16 == pytest.approx(
                m[f"delta_f_{method}"], rel=1e-12)
        assert 0 < m["ess"] <= 1 and 0 < m["ess_backward"] <= 1
        # Training evaluated warm-start (ML: u_A at T⁻¹ y) and reverse-KL batches of 4.
        assert m["energy_evaluations_train"] == 2 * 4 + 4 * 4
        assert m["energy_evaluations"] > m["energy_evaluations_train"]
        assert m["time_train"] > 0
        assert m["rdf_O_O_max_difference"] >= 0 and m["rdf_O_H_md_split_difference"] >= 0
        assert m["rdf_O_H_max_z"] >= 0 and m["rdf_O_H_max_z_noise95"] > 0
        assert 0 < m["rdf_O_H_shells"] <= 60
        # The RDFs average over every held-out frame (the last 60 % of 40), the estimators
        # over its decorrelated subset; block bootstrap over 3 ceil(g) frames.
        assert m["rdf_flow_frames"] == m["rdf_target_frames"] == 24
        assert m["n_samples"] <= 24 and m["rdf_flow_block_frames"] % 3 == 0

    from mlflow.tracking import MlflowClient

    plots = {a.path for a in MlflowClient().list_artifacts(rows[0]["run_id"], "plots")}
    assert {"plots/radial_distributions.png", "plots/energy_histograms.png"} <= plots
    # LBAR recomputed from the logged works (kT) is the logged LBAR.
    import numpy as np

    from boltzgen.estimators import lbar

    works = MlflowClient().download_artifacts(rows[0]["run_id"], "works.npz", str(workdir))
    with np.load(works) as w:
        recomputed, _ = lbar(w["forward_work"], w["reverse_work"])
    assert recomputed == pytest.approx(rows[0]["metrics"]["delta_f_lbar"], abs=1e-9)

    table = runner.invoke(app, ["compare", str(spec)])
    assert table.exit_code == 0 and "lfep/mol" in table.stdout and "mbar" in table.stdout

    again = runner.invoke(app, ["launch", str(spec), "--format", "json", "--backend", "local"])
    assert again.exit_code == 0, again.output
    assert len(json.loads(again.stdout)["skipped"]) == 2


def test_md_that_blows_up_fails_every_job_that_needs_it(workdir: Path) -> None:
    """Two jobs that differ only in training share all their MD runs (one task each, run by
    one of them); with a 40 fs time step the MD blows up at once. Both jobs fail with the
    cause, the launch exits 1, and nothing is left half-written in the cache."""
    data = tiny_ice_spec()
    data["name"] = "ice-blowup"
    data["reference"]["md"].update(timestep_fs=40.0, equilibration_ps=5.0,
                                   frame_interval_ps=0.05)
    data["grid"] = {"temperature": 100.0, "reference.ladder_size": 2,
                    "training.steps": [4, 5]}
    spec = write_spec(workdir, data)
    launch = runner.invoke(app, ["launch", str(spec), "--format", "json", "--backend", "local"])
    assert launch.exit_code == 1, launch.output
    errors = sorted(job["error"] for job in json.loads(launch.stdout)["failed"])
    assert len(errors) == 2 and all("blew up" in e for e in errors), errors
    assert sum("a shared MD run failed in job" in e for e in errors) == 1, errors
    md = workdir / "campaign-work" / "ice-blowup" / "md"
    assert [p.name for p in md.iterdir() if not p.name.endswith(".lock")] == []
