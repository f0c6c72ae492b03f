"""Is a process alive? Checks of driver processes named in MLflow tags and claim files."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from campaign.tracking import Tracker


def proc_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state first), or [] if unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def pid_alive(pid: int) -> bool:
    """Process ``pid`` of this host exists and is not a zombie (a killed child its parent has
    not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    fields = proc_fields(pid)
    return not fields or fields[0] != "Z"


def refuse_if_driven_elsewhere(tracker: Tracker, job_ids: list[str]) -> None:
    """Two drivers on one campaign would run its jobs twice: refuse to start while a job's
    RUNNING child run belongs to a driver process that is still alive on this host. (A driver
    on another host cannot be checked from here; its runs are taken as abandoned.)"""
    from campaign.tracking import RUNNING

    here = socket.gethostname()
    for job_id, runs in tracker.job_runs(job_ids).items():
        for old in runs:
            tags = old.data.tags
            if old.info.status != RUNNING or tags.get("driver_host") != here:
                continue
            pid = int(tags.get("driver_pid", "0") or 0)
            if pid and pid != os.getpid() and pid_alive(pid):
                raise RuntimeError(
                    f"job {job_id} is being run by another driver (pid {pid} on {here}); "
                    "wait for it or stop it before launching again")
