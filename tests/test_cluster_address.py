"""`launch --address` joins an existing Ray cluster (started here with `ray start --head`).

The head is started the way a user would, with RAY_AUTH_MODE unset, so Ray turns token
authentication on; the driver must pick the token up by itself (docs/architecture.md, Traps worked
around).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_SPEC, write_spec
from tests.slurm_harness import stop_processes_naming

RAY = str(Path(sys.executable).with_name("ray"))
CAMPAIGN = str(Path(sys.executable).with_name("campaign"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _head(env: dict[str, str], num_cpus: int):
    """A head started the way a user would (``ray start --head``) in ``env``; stopped by the
    processes that name its temp dir (never ``ray stop``, which ends every Ray on the machine).
    """
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: UNIX socket paths <= 107 bytes
    port = _free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
                    "--include-dashboard=false", "--disable-usage-stats",
                    f"--temp-dir={temp_dir}"], env=env, check=True, capture_output=True,
                   timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_processes_naming(temp_dir, term_grace=0.0)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    with _head(env, 2) as address:
        yield address, env


def test_launch_joins_existing_cluster(ray_head, tmp_path: Path) -> None:
    address, env = ray_head
    # A plan that no node of this 2-CPU head can hold is refused before anything is written,
    # by launch and by launch --dry-run alike.
    big = copy.deepcopy(TINY_SPEC)
    big["resources"]["trainer"]["cpus"] = 3
    big_spec = write_spec(tmp_path, big, "big.yaml")
    for extra in ([], ["--dry-run"]):
        proc = subprocess.run([CAMPAIGN, "launch", str(big_spec), "--address", address, *extra],
                              env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"},
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "resources.trainer.cpus" in proc.stderr and "has 2 CPUs" in proc.stderr
        assert not (tmp_path / "m.db").exists()
    data = copy.deepcopy(TINY_SPEC)
    data["training"]["steps"] = 50
    data["reference"].update(n_steps=300, burn_in=100)
    for role in ("trainer", "energy_evaluator"):  # one job: one actor per role is enough
        data["resources"][role]["count"] = 1
    spec = write_spec(tmp_path, data)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([CAMPAIGN, "launch", str(spec), "--address", address, "--format",
                           "json"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert len(summary["finished"]) == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.get_run(client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id],
        "tags.campaign_role = 'job'")[0].info.run_id)
    assert run.data.tags["ray_address"] == address


def test_unreachable_address_is_refused(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, TINY_SPEC)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([CAMPAIGN, "launch", str(spec), "--address", f"127.0.0.1:{_free_port()}"],
                          env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: --address: '127.0.0.1:")
    assert not (tmp_path / "m.db").exists()


@pytest.fixture
def token_head(tmp_path_factory):
    """A head with token authentication and a token of its own (not ~/.ray/auth_token)."""
    token = tmp_path_factory.mktemp("tok") / "token"
    token.write_text("0123456789abcdef" * 4 + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    with _head(env, 1) as address:
        yield address, env


def _refused(spec: Path, address: str, env: dict, tmp_path: Path) -> str:
    started = time.monotonic()
    proc = subprocess.run([CAMPAIGN, "launch", str(spec), "--address", address],
                          env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "m.db").exists()  # nothing written
    return proc.stderr


def test_missing_wrong_token_and_other_ray_version_are_refused(token_head, tmp_path: Path
                                                               ) -> None:
    address, head_env = token_head
    spec = write_spec(tmp_path, TINY_SPEC)
    no_token = {**head_env, "RAY_AUTH_MODE": "disabled"}
    no_token.pop("RAY_AUTH_TOKEN_PATH")
    err = _refused(spec, address, no_token, tmp_path)
    assert err.startswith(f"error: --address: '{address}' is not allowed; the cluster refused "
                          "this driver's authentication (RAY_AUTH_MODE=disabled")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("f" * 64 + "\n")
    err = _refused(spec, address, {**head_env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, tmp_path)
    assert "refused this driver's authentication (RAY_AUTH_MODE=token" in err
    assert str(wrong) in err

    # The head's own record of its Ray version, rewritten in its GCS: what a head started
    # from another installation would hold.
    rewrite = (
        "import json, os, sys\n"
        "from ray._raylet import GcsClient\n"
        "import ray._common.usage.usage_lib as usage\n"
        "from ray._common.usage import usage_constants as uc\n"
        "from ray._private import ray_constants as rc\n"
        "client = GcsClient(address=sys.argv[1])\n"
        "meta = usage.get_cluster_metadata(client)\n"
        "meta['ray_version'] = '2.0.0'\n"
        "client.internal_kv_put(uc.CLUSTER_METADATA_KEY, json.dumps(meta).encode(), True,\n"
        "                       namespace=rc.KV_NAMESPACE_CLUSTER)\n")
    subprocess.run([sys.executable, "-c", rewrite, address], env=head_env, check=True,
                   capture_output=True, timeout=60)
    err = _refused(spec, address, head_env, tmp_path)
    assert "the cluster runs Ray 2.0.0 and this driver Ray " in err
