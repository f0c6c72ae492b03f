"""Real Ray nodes on this host for tests and benchmarks: a head and workers started with
``ray start``, each with its own temp dir and every port given explicitly (two Ray nodes on one
host collide on the defaults; docs/architecture.md, Traps worked around). Stopped by the processes
that name their temp dir, never with ``ray stop`` (which ends every Ray process on the machine)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.slurm_harness import stop_processes_naming

RAY = str(Path(sys.executable).with_name("ray"))
WORKER_PORTS = 60


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_block(size: int) -> int:
    """The first port of ``size`` consecutive free ports."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - size)
        if all(_free(base + k) for k in range(size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports found")


@dataclass
class RayNode:
    temp_dir: str
    address: str  # the cluster's GCS address (host:port)

    def stop(self) -> None:
        stop_processes_naming(self.temp_dir, term_grace=0.0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def ray_env() -> dict[str, str]:
    """The environment for nodes and drivers: authentication off, no inherited address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def start_node(num_cpus: float, head: str | None = None, prefix: str = "rn",
               cores: str | None = None) -> RayNode:
    """Start a head (``head`` None) or a worker joining ``head``; return it once it is up.
    ``cores`` (e.g. "0" or "0,1"): pin the node and every process it starts to these cores
    (``taskset``), so that a node given one CPU uses one.

    ``ray start`` gives a node 30 s (fixed in Ray) to register with the GCS; a node pinned to
    one busy core can miss that, so a start that failed that way is tried once more, on fresh
    ports and with a note on stderr. Any other failure, or a second one, raises."""
    try:
        return _start_node_once(num_cpus, head, prefix, cores)
    except RuntimeError as exc:
        if "timed out during startup" not in str(exc):
            raise
    print("ray start: the node missed Ray's 30 s registration limit; trying once more",
          file=sys.stderr)
    return _start_node_once(num_cpus, head, prefix, cores)


def _start_node_once(num_cpus: float, head: str | None, prefix: str,
                     cores: str | None) -> RayNode:
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: sockets <= 107 bytes
    base = _port_block(10 + WORKER_PORTS)
    pin = ["taskset", "-c", cores] if cores is not None else []
    command = [*pin, RAY, "start", f"--num-cpus={num_cpus:g}", "--num-gpus=0",
               f"--temp-dir={temp_dir}", "--disable-usage-stats",
               f"--object-manager-port={base + 1}", f"--node-manager-port={base + 2}",
               f"--metrics-export-port={base + 3}", f"--runtime-env-agent-port={base + 4}",
               f"--dashboard-agent-grpc-port={base + 5}",
               f"--dashboard-agent-listen-port={base + 6}",
               f"--min-worker-port={base + 10}", f"--max-worker-port={base + 9 + WORKER_PORTS}",
               "--node-ip-address=127.0.0.1"]
    if head is None:
        address = f"127.0.0.1:{base}"
        command += ["--head", f"--port={base}", "--include-dashboard=false"]
    else:
        address = head
        command += [f"--address={head}"]
    node = RayNode(temp_dir, address)
    try:
        subprocess.run(command, env=ray_env(), check=True, capture_output=True, timeout=180)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        node.stop()
        out = getattr(exc, "stderr", b"") or b""
        raise RuntimeError(f"ray start failed: {out.decode(errors='replace')[-2000:]}") from exc
    return node
