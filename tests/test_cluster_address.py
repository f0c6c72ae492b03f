"""`launch --address` joins an existing Ray cluster (started here with `ray start --head`).

The head is started the way a user would, with RAY_AUTH_MODE unset, so Ray turns token
authentication on; the driver must pick the token up by itself (DESIGN.md §5).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_SPEC, write_spec

RAY = str(Path(sys.executable).with_name("ray"))
CAMPAIGN = str(Path(sys.executable).with_name("campaign"))


def _stop_ray_under(temp_dir: str) -> None:
    """Stop only the Ray processes of the head started with ``temp_dir`` (and their children).

    ``ray stop`` would end every Ray process on the machine, including a campaign a user is
    running next to the tests; the head's daemons all name the temp dir on their command line.
    """
    def processes() -> dict[int, tuple[int, str]]:
        table = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            table[int(entry.name)] = (parent, cmdline)
        return table

    def targets() -> set[int]:
        table = processes()
        chosen = {pid for pid, (_, cmd) in table.items() if temp_dir in cmd} - {os.getpid()}
        grew = True
        while grew:
            children = {pid for pid, (parent, _) in table.items() if parent in chosen}
            grew = not children <= chosen
            chosen |= children
        return chosen

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while targets() and time.monotonic() < deadline:
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: UNIX socket paths <= 107 bytes
    port = _free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats",
                    f"--temp-dir={temp_dir}"], env=env, check=True, capture_output=True,
                   timeout=120)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        _stop_ray_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_launch_joins_existing_cluster(ray_head, tmp_path: Path) -> None:
    address, env = ray_head
    data = copy.deepcopy(TINY_SPEC)
    data["training"]["steps"] = 50
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
