"""`campaign launch` and `campaign compare` on a tiny tetrahedron spec, end to end.

Three jobs, one per flow type (double Möbius, convex gradient, the Rodrigues baseline), with
the local backend (the test's process) and a temporary SQLite MLflow store; each must report
the metrics the rigid-body issue names and log the axis-direction figure.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from campaign.cli import app
from tests.conftest import write_spec
from tests.test_tetrahedron_pipeline import SPEC as PIPELINE_SPEC

runner = CliRunner()

SPEC = {
    **PIPELINE_SPEC,
    "name": "tet-tiny",
    # 48 Gauss-Legendre nodes give the same -ln Z as the default 96 to 4e-14 at 300 K (measured
    # once), at an eighth of the cost; test_science_tetrahedron checks 64 against 96.
    "system": {"kind": "tetrahedron_field", "quadrature_points": 48},
    "reference": {"sampler": "exact", "n_exact_samples": 3000},
    "training": {"objective": "maximum_likelihood", "steps": 40, "batch_size": 128},
    "sampling": {"n_samples": 4000, "energy_batch_size": 2000},
    "grid": {"flow": [
        {"kind": "rigid_body", "rotation_layer": "double_mobius", "n_blocks": 2, "channels": 16,
         "attention_blocks": 0, "axial_layer": "axial_circle_mobius"},
        {"kind": "rigid_body", "rotation_layer": "convex_gradient", "n_blocks": 1,
         "channels": 16, "attention_blocks": 0, "convex_terms": 8},
        {"kind": "rotation_vector_spline", "n_layers": 2, "hidden": 16},
    ]},
    "resources": {"reference": {"count": 1, "cpus": 0.25}, "trainer": {"count": 2, "cpus": 0.5},
                  "sampler": {"count": 1, "cpus": 0.25},
                  "energy_evaluator": {"count": 1, "cpus": 0.25}},
}


def test_tetrahedron_campaign_reports_every_metric(workdir: Path) -> None:
    spec = write_spec(workdir, SPEC)
    launch = runner.invoke(app, ["launch", str(spec), "--format", "json", "--backend", "local"])
    assert launch.exit_code == 0, launch.output
    assert len(json.loads(launch.stdout)["finished"]) == 3

    compare = runner.invoke(app, ["compare", str(spec), "--format", "json"])
    assert compare.exit_code == 0, compare.output
    rows = json.loads(compare.stdout)
    assert sorted(row["params"]["flow.kind"] for row in rows) == [
        "rigid_body", "rigid_body", "rotation_vector_spline"]
    for row in rows:
        assert row["status"] == "FINISHED"
        m = row["metrics"]
        for key in ("forward_kl", "ess", "delta_f", "delta_f_err", "reference_delta_f",
                    "mode_weight_error", "flow_parameters"):
            assert key in m, key
        assert 0 < m["ess"] <= 1 and m["forward_kl"] > 0
        assert 0 <= m["mode_weight_error"] <= 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    plots = {a.path for a in client.list_artifacts(rows[0]["run_id"], "plots")}
    assert "plots/axis_directions.png" in plots

