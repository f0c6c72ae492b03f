"""`campaign slurm`: the generated script, and a real batch job on a real single-host Slurm
(slurmctld + slurmd + munge started here) that runs the quickstart spec on two Ray nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.slurm_harness import SlurmCluster, install_reason

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGN = str(Path(sys.executable).with_name("campaign"))


def _campaign(*args: str, cwd: Path, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    return subprocess.run([CAMPAIGN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_script_follows_rays_multi_node_pattern(tmp_path: Path) -> None:
    out = _campaign("slurm", str(ROOT / "specs" / "quickstart.yaml"), "--nodes", "4",
                    "--cpus-per-node", "16", "--gpus-per-node", "1", "--partition", "gpu",
                    "--account", "proj1", "--time", "2:00:00", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks=4", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --gpus-per-task=1", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj1", "#SBATCH --time=2:00:00",
                 "export RAY_AUTH_MODE=token", "export RAY_AUTH_TOKEN_PATH=",
                 'export RAY_ADDRESS="$HEAD_IP:$HEAD_PORT"', "    ray start --block ",
                 "bash -c 'ray_start 0 --head ",
                 "bash -c 'ray_start $(( SLURM_LOCALID + 1 )) --address=",
                 "dir=/tmp/rc$SLURM_JOB_ID-$1", '--temp-dir="$dir"',
                 '--num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus=1',
                 'campaign launch "$SPEC" --address "$RAY_ADDRESS"'):
        assert line in script, line
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not list(tmp_path.iterdir())  # printed, nothing written


def test_bad_slurm_options_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    from typer.testing import CliRunner

    from campaign.cli import app

    monkeypatch.chdir(tmp_path)
    spec = str(ROOT / "specs" / "quickstart.yaml")
    for args, start in ((["--nodes", "0"], "error: --nodes: 0"),
                        (["--time", "soon"], "error: --time: 'soon'"),
                        (["--nodes", "1", "--cpus-per-node", "1"], "error: resources"),
                        (["--submit"], "error: --submit")):
        out = CliRunner().invoke(app, ["slurm", spec, *args])
        assert out.exit_code == 2 and out.stderr.startswith(start), (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def slurm():
    reason = install_reason()
    if reason is not None:
        print(f"\nSKIPPED real Slurm test: {reason}")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    cluster = SlurmCluster(root, cpus=max(2, os.cpu_count() or 2))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_batch_job_runs_quickstart_on_two_ray_nodes(slurm: SlurmCluster, tmp_path: Path
                                                    ) -> None:
    """The quickstart grid (4 jobs), with fewer steps to fit the test budget, submitted with
    `campaign slurm --submit` as one job of two Slurm tasks = two Ray nodes on this host."""
    data = yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text())
    data["reference"].update(n_steps=400, burn_in=100)
    data["training"]["steps"] = 60
    data["sampling"].update(n_samples=4000, energy_batch_size=2000)
    spec = tmp_path / "quickstart.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**slurm.env, "CAMPAIGN_RAY_TOKEN_DIR": str(tmp_path / "tokens"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    out = _campaign("slurm", str(spec), "--nodes", "2", "--cpus-per-node", "1",
                    "--ray-nodes-per-host", "2", "--time", "15", "--output",
                    str(tmp_path / "job.sh"), "--submit", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert job_id.isdigit()
    try:
        state = slurm.wait_job(job_id, timeout=420)
    finally:
        slurm.cancel(job_id)
    log = tmp_path / f"campaign-quickstart-{job_id}.out"
    text = log.read_text() if log.exists() else "(no output file)"
    assert state == "COMPLETED", f"{state}\n{text[-4000:]}"
    assert "4 finished, 0 skipped (already finished), 0 failed" in text, text[-4000:]
    assert not list((tmp_path / "tokens").glob("*.token"))  # the token went with the job
    print("\n" + "\n".join(line for line in text.splitlines()
                            if "finished" in line or "Ray runtime started" in line))

    status = _campaign("status", str(spec), "--format", "json", cwd=tmp_path, env=env)
    rows = json.loads(status.stdout)["jobs"]
    assert [row["state"] for row in rows] == ["finished"] * 4
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    nodes = set()
    for row in rows:
        run = client.get_run(row["run_id"])
        assert run.data.tags["ray_address"].endswith(str(20000 + int(job_id) % 40 * 1000))
        for ids in json.loads(run.data.tags["nodes"]).values():
            nodes.update(ids)
    assert len(nodes) == 2, nodes  # the campaign's actors ran on both Ray nodes
