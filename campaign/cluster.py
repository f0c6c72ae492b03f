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
