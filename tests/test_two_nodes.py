"""A real two-node Ray cluster on one host (a head and a worker, each with one CPU): a campaign
places its actors on both nodes, and losing the worker node mid-campaign still ends with every
job FINISHED, each exactly once."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from campaign.plan import make_plan
from campaign.spec import parse_spec
from tests.conftest import TINY_SPEC, write_spec
from tests.ray_nodes import ray_env, start_node

CAMPAIGN = str(Path(sys.executable).with_name("campaign"))


@pytest.fixture
def two_nodes():
    head = start_node(1, prefix="rh")
    try:
        worker = start_node(1, head=head.address, prefix="rw")
    except BaseException:
        head.stop()
        raise
    try:
        yield head, worker
    finally:
        worker.stop()
        head.stop()


def test_actors_on_both_nodes_and_worker_loss(two_nodes, tmp_path: Path) -> None:
    head, worker = two_nodes
    data = copy.deepcopy(TINY_SPEC)
    data["reference"].update(n_steps=400, burn_in=100)
    data["training"]["steps"] = 200
    data["grid"] = {"training.learning_rate": [0.002, 0.003, 0.004]}
    # Two actors per role, spread over the nodes: losing one node leaves one of each.
    data["resources"] = {"mcmc": {"count": 2, "cpus": 0.2}, "trainer": {"count": 2, "cpus": 0.3},
                         "sampler": {"count": 2, "cpus": 0.2},
                         "energy_evaluator": {"count": 2, "cpus": 0.2}}
    data["fault_tolerance"] = {"checkpoint_every": 25}
    spec = write_spec(tmp_path, data)
    job_ids = {job.job_id for job in make_plan(parse_spec(data)).jobs}
    env = {**ray_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = tmp_path / "launch.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([CAMPAIGN, "launch", str(spec), "--address", head.address],
                                env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=sink, text=True)
    try:
        deadline = time.monotonic() + 300
        while "(1/3 done)" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no job finished within 300 s"
            time.sleep(0.2)
        done_at_stop = log.read_text().count(": finished (")
        worker.stop()  # the worker node's raylet, its actors and their processes
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert done_at_stop < 3  # the node was lost mid-campaign
    assert out.startswith("3 finished, 0 skipped (already finished), 0 failed"), out

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment], "tags.campaign_role = 'job'")
    assert sorted(r.data.tags["job_id"] for r in runs) == sorted(job_ids)  # once each
    assert all(r.info.status == "FINISHED" for r in runs)
    nodes: set[str] = set()
    for run in runs:
        for ids in json.loads(run.data.tags["nodes"]).values():
            nodes.update(ids)
    assert len(nodes) == 2, nodes  # actors on both nodes did the campaign's work
    print(f"\nnode ids used: {sorted(n[:12] for n in nodes)}; retries per job: "
          f"{[r.data.tags.get('retries', '0') for r in runs]}")
