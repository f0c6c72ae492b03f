"""Settings that must be fixed before Ray is imported.

Ray >= 2.59 turns token authentication on for clusters started with ``ray start --head`` and
writes the token to ``~/.ray/auth_token``. A driver whose ``RAY_AUTH_MODE`` is unset talks to
such a cluster without the token and retries until it gives up (``InvalidAuthToken``). Ray reads
the mode when it is imported, so the choice is made here, before any Ray import.
"""

from __future__ import annotations

import os
from pathlib import Path


def ray_address(cli_address: str | None) -> str | None:
    """--address, else RAY_ADDRESS, else None (a local instance)."""
    return cli_address or os.environ.get("RAY_ADDRESS") or None


def configure_ray_auth(address: str | None) -> str:
    """Set RAY_AUTH_MODE explicitly when the user has not; return the mode in force.

    Joining a cluster: "token" when a token is available (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), else "disabled". A local instance started
    by this process keeps Ray's own default.
    """
    if "RAY_AUTH_MODE" in os.environ or not address:
        return os.environ.get("RAY_AUTH_MODE", "default")
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN")) or token_file.is_file()
    os.environ["RAY_AUTH_MODE"] = "token" if has_token else "disabled"
    return os.environ["RAY_AUTH_MODE"]


def unreachable_reason(address: str, timeout_s: float = 5.0) -> str | None:
    """Why a TCP connection to the cluster's GCS ``host:port`` fails, or None if it answers.

    ``ray.init(address=...)`` retries an unreachable address for minutes; a plain socket says
    at once whether anything listens there. "auto" and addresses without a port are left to Ray.
    """
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


PROBE_TIMEOUT_S = 25.0

# Run in a child process: Ray's C++ client logs its own lines to stderr, and the parent keeps
# its Ray import (and auth mode) untouched. Prints one JSON object.
_PROBE = """
import json, sys
try:
    import ray
    from ray._raylet import GcsClient
    import ray._common.usage.usage_lib as usage
    gcs = GcsClient(address=sys.argv[1])
    meta = usage.get_cluster_metadata(gcs) or {}
    try:  # the live nodes' resources, so that a plan can be checked before anything starts
        from ray.core.generated.gcs_pb2 import GcsNodeInfo
        nodes = [{key: float(value) for key, value in info.resources_total.items()
                  if key in ("CPU", "GPU")}
                 for info in gcs.get_all_node_info(timeout=10).values()
                 if info.state == GcsNodeInfo.ALIVE]
    except Exception:
        nodes = None
    print(json.dumps({"ok": True, "ray_version": meta.get("ray_version"), "nodes": nodes,
                      "python_version": meta.get("python_version"), "ours": ray.__version__}))
except Exception as exc:
    print(json.dumps({"ok": False, "type": type(exc).__name__, "message": str(exc)}))
"""


def probe_cluster(address: str, timeout_s: float = PROBE_TIMEOUT_S
                  ) -> tuple[str | None, list[dict[str, float]] | None]:
    """(why the Ray cluster at ``address`` would not take this driver, or None; the CPU and
    GPU counts of its live nodes, or None where the GCS did not list them).

    Asks the cluster's GCS for its metadata with this process's authentication settings:
    a missing or wrong token and a different Ray (or Python major.minor) version are named
    here at once, where ``ray.init`` would retry for minutes or fail deep in its start-up.
    """
    import json
    import platform
    import subprocess
    import sys

    target = address.removeprefix("ray://")
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, target], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"the cluster did not answer within {timeout_s:.0f} s", None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return f"the connection check failed: {done.stderr.strip()[-300:]}", None
    answer = json.loads(lines[-1])
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    if not answer["ok"]:
        if answer["type"] == "AuthenticationError":
            source = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else
                      os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"))
            return (f"the cluster refused this driver's authentication (RAY_AUTH_MODE={mode}, "
                    f"token from {source}); set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH "
                    "(or RAY_AUTH_TOKEN) to the cluster's token"), None
        return f"{answer['type']}: {answer['message'][:300]}", None
    theirs, ours = answer.get("ray_version"), answer.get("ours")
    if theirs and theirs != ours:
        return (f"the cluster runs Ray {theirs} and this driver Ray {ours}; install the same "
                "version on both"), None
    python = answer.get("python_version") or ""
    mine = platform.python_version()
    if python and python.split(".")[:2] != mine.split(".")[:2]:
        return (f"the cluster runs Python {python} and this driver Python {mine}; use the same "
                "major.minor version on both"), None
    return None, answer.get("nodes")
