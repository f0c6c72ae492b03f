"""One driver per campaign: a claim file in the campaign's work directory.

Two drivers on one campaign run its jobs twice (two FINISHED child runs per job). The driver's
own check of MLflow for runs of a live driver comes too late to stop that: a launch writes no
child run until Ray has started, seconds in, so a second launch started meanwhile finds
nothing. ``campaign launch`` therefore claims the campaign before it starts Ray or writes
anything else, and a second launch is refused at once while the claim's driver is alive.

The claim is ``<work_dir>/driver.claim`` (:data:`CLAIM_NAME`): the work directory is where the
campaign's files live, and on a cluster it is on a file system every node sees, so the claim
holds across nodes and whatever runs the jobs. It is a small JSON record (campaign, host, pid,
the pid's start time, the machine's boot and PID namespace, start time, a per-launch token),
written to a temporary file and hard-linked to its name: ``link`` is atomic and fails when the
name exists, also on NFS, so of two launches racing exactly one wins, and a reader never sees a
half-written claim.

Whether a claim's driver is alive:

- on the same machine (same host name, boot and PID namespace): its process exists, is not a
  zombie and started when the claim says (a pid reused by another process does not count);
- elsewhere: its heartbeat, the claim file's modification time, which the driver refreshes every
  :data:`HEARTBEAT_S` seconds from a daemon thread, is younger than :data:`STALE_AFTER_S`. A
  driver's node that is lost, or cut off from the shared file system, stops the heartbeat; the
  nodes' clocks must agree to well within that margin (NTP).

A claim whose driver is dead (killed, or its node lost) is stale: the next launch takes it over,
with a one-line note naming the dead driver, as a relaunch after a lost driver always did. The
claim is released (removed, if it is still this launch's) when the launch ends in any way that
lets Python run its ``finally`` blocks; a driver killed outright leaves a stale claim behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from campaign.errors import SpecError
from campaign.liveness import pid_alive, proc_fields

CLAIM_NAME = "driver.claim"
#: Seconds between two refreshes of a live driver's heartbeat (the claim file's mtime).
HEARTBEAT_S = 10.0
#: A claim of another machine whose heartbeat is older than this is stale: six missed
#: heartbeats, so that a driver busy for a moment, a slow shared file system or clocks a few
#: seconds apart never make a live driver look dead.
STALE_AFTER_S = 60.0
# Rounds of "judge the claim, then take it over" before giving up; more than two only when
# several launches race over a stale claim at the same instant.
_ATTEMPTS = 20


class CampaignClaimed(Exception):
    """A live driver holds the campaign's claim; the message is one line for the command line."""


@dataclass(frozen=True)
class _Seen:
    """A claim as read from the file: its record (None when unparseable) and heartbeat."""

    record: dict[str, Any] | None
    mtime: float

    @property
    def token(self) -> str | None:
        return self.record.get("token") if self.record else None


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read(path: Path) -> _Seen | None:
    """The claim at ``path``, or None when there is none. The mtime is taken from the open file
    (``fstat``): on NFS, opening revalidates the attributes, so a heartbeat is never read stale
    from a client's attribute cache."""
    try:
        with open(path, "rb") as handle:
            mtime = os.fstat(handle.fileno()).st_mtime
            return _Seen(_parse(handle.read()), mtime)
    except FileNotFoundError:
        return None


def _pid_space() -> str:
    """What makes a pid mean one process: the kernel's boot and the PID namespace (containers on
    one host share a host name but not pids). Empty where /proc does not say."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _pid_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (/proc/<pid>/stat field 22)."""
    fields = proc_fields(pid)
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _same_machine(record: dict[str, Any]) -> bool:
    return record.get("host") == socket.gethostname() and record.get("pid_space") == _pid_space()


def _driver(record: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(record.get("started", 0))))
    return f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, since {since}"


def _why_dead(seen: _Seen, now: float) -> str | None:
    """Why the claim's driver is dead, or None when it is (or may be) alive."""
    record = seen.record
    age = now - seen.mtime
    if record is None:  # not written by a launch: judged by its age alone
        return f"unreadable claim, unchanged for {age:.0f} s" if age > STALE_AFTER_S else None
    if _same_machine(record):
        pid = record.get("pid")
        if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
            return "its process is gone"
        started = record.get("pid_start")
        if started is not None and _pid_start(pid) not in (None, started):
            return "its process is gone (the pid now belongs to another process)"
        return None
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s (stale after {STALE_AFTER_S:.0f} s)"
    return None


def _refusal(name: str, path: Path, seen: _Seen, now: float) -> CampaignClaimed:
    record = seen.record
    if record is None:
        return CampaignClaimed(
            f"campaign '{name}': {path} is not a driver claim this program wrote (changed "
            f"{now - seen.mtime:.0f} s ago); remove it if no driver runs this campaign, or wait "
            f"until it is {STALE_AFTER_S:.0f} s old")
    claimed = record.get("campaign", name)
    which = f"campaign '{name}'" + (
        f" (work directory {path.parent}, claimed by campaign '{claimed}')"
        if claimed != name else "")
    remote = not _same_machine(record)
    heartbeat = f", last heartbeat {max(0.0, now - seen.mtime):.0f} s ago" if remote else ""
    after = (f" (a driver on another host is taken as lost {STALE_AFTER_S:.0f} s after its last "
             "heartbeat)") if remote else ""
    return CampaignClaimed(
        f"{which} is being run by a live driver ({_driver(record)}{heartbeat}); wait for it or "
        f"stop it before launching again{after}")


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; return those created, outermost first."""
    missing = []
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing.append(directory)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a racing launch made it
            directory.mkdir()
    return list(reversed(missing))


def _create(path: Path, record: dict[str, Any], token: str) -> bool:
    """Create the claim atomically and exclusively; False if a claim exists already."""
    content = json.dumps(record).encode()
    temp = path.with_name(f"{path.name}.{token}.tmp")
    try:
        with open(temp, "xb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())  # the claim's content reaches the server before its name
        try:
            os.link(temp, path)
        except FileExistsError:
            # NFS may answer a link() whose first reply was lost with EEXIST from its retry
            # although the link was made: the link count tells.
            return os.stat(temp).st_nlink == 2
        except OSError as exc:
            if os.stat(temp).st_nlink == 2:  # made, whatever the reply said
                return True
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            return _create_without_links(path, content)
        return True
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def _create_without_links(path: Path, content: bytes) -> bool:
    """Exclusive creation where the file system has no hard links: O_CREAT | O_EXCL (atomic on
    local file systems and NFS v3+); a reader may then see the claim empty for an instant, and
    refuses for that instant as for any unreadable claim."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _take_aside(path: Path, seen: _Seen, token: str) -> bool:
    """Move the stale claim ``seen`` out of the way so that a new one can be created; True when
    this call removed it.

    ``rename`` acts on the name, not on the claim judged, so the claim is read again just before
    it and the moved file is checked after it. Of several launches doing this at once, one moves
    the stale claim; another that moves a newer claim instead (made by a faster launch between
    its check and its rename) puts it back. Should a third launch make a claim in that instant,
    two would hold one; the heartbeat of the one whose claim is gone stops it within
    HEARTBEAT_S, as Ctrl-C would (see DriverClaim._beat)."""
    if _read(path) != seen:  # changed since judged (released, taken, or its heartbeat beat)
        return False
    aside = path.with_name(f"{path.name}.stale-{token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # released or taken aside by another launch
        return False
    moved = _read(aside)
    if moved == seen:
        with contextlib.suppress(OSError):
            aside.unlink()
        return True
    with contextlib.suppress(OSError):  # a newer claim: restore it unless one was made since
        os.link(aside, path)
    with contextlib.suppress(OSError):
        aside.unlink()
    return False


def _interrupt() -> None:
    """Stop this process's launch as Ctrl-C does: a real SIGINT also ends a blocking wait."""
    os.kill(os.getpid(), signal.SIGINT)


class DriverClaim:
    """This process's claim on a campaign; a context manager that releases it on exit."""

    def __init__(self, path: Path, record: dict[str, Any], created_dirs: list[Path],
                 heartbeat_s: float, on_lost: Callable[[], None]) -> None:
        self.path = path
        self.record = record
        self.token: str = record["token"]
        self._created_dirs = created_dirs
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, args=(heartbeat_s,),
                                           name="driver-claim-heartbeat", daemon=True)
        self._heartbeat.start()

    def __enter__(self) -> DriverClaim:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()

    def _beat(self, every: float) -> None:
        """Refresh the heartbeat every ``every`` seconds while the claim is ours. A claim taken
        over by another driver (this one looked dead: stalled for STALE_AFTER_S, or lost a race
        of takeovers) stops this launch, so that the campaign keeps one driver."""
        while not self._stop.wait(every):
            try:
                other = self._refresh()
            except OSError:  # the shared file system hiccupped, or the directory is gone
                continue
            if other is None or self._stop.is_set():
                continue
            holder = f"another driver ({_driver(other)})" if other else "an unreadable file"
            print(f"error: campaign '{self.record['campaign']}': {holder} has taken the place "
                  f"of this driver's claim {self.path}; stopping this launch", file=sys.stderr)
            self._on_lost()
            return

    def _refresh(self) -> dict[str, Any] | None:
        """Touch the claim if it is ours, or make it again if it vanished (removed by hand);
        return the record found in its place when another driver holds it. The file is touched
        through the descriptor whose token was checked, so that another driver's claim that has
        replaced ours is never kept alive by this thread."""
        try:
            with open(self.path, "rb") as handle:
                found = _parse(handle.read()) or {}
                if found.get("token") == self.token:
                    os.utime(handle.fileno())
                    return None
        except FileNotFoundError:
            if _create(self.path, self.record, self.token):
                return None
            found = _parse(self.path.read_bytes()) or {}
        return found

    def release(self) -> None:
        """Stop the heartbeat and remove the claim if it is still ours; then remove the work
        directories the claim created if they stayed empty (a launch refused for bad input
        leaves nothing behind). Never raises: it runs while a launch's error propagates."""
        self._stop.set()
        if self._heartbeat.is_alive() and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        with contextlib.suppress(OSError):
            seen = _read(self.path)
            if seen is not None and seen.token == self.token:
                self.path.unlink()
        for directory in reversed(self._created_dirs):
            with contextlib.suppress(OSError):  # not empty: the launch wrote there
                directory.rmdir()


def claim_campaign(work_dir: Path, name: str, heartbeat_s: float = HEARTBEAT_S,
                   on_lost: Callable[[], None] = _interrupt) -> DriverClaim:
    """Claim campaign ``name`` for this process: create ``<work_dir>/driver.claim`` or take over
    a stale one. Raises :class:`CampaignClaimed` while a live driver holds it (having written
    nothing), and a :class:`SpecError` on ``work_dir`` when the directory cannot be written.
    ``on_lost`` runs (in the heartbeat thread) if another driver takes the claim over later;
    by default it stops the launch as Ctrl-C does."""
    work_dir = Path(work_dir)
    path = work_dir / CLAIM_NAME
    token = secrets.token_hex(16)
    now = time.time()
    record = {"campaign": name, "host": socket.gethostname(), "pid": os.getpid(),
              "pid_start": _pid_start(os.getpid()), "pid_space": _pid_space(),
              "started": now,
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
              "token": token}
    created: list[Path] = []
    for _ in range(_ATTEMPTS):
        try:
            seen = _read(path)
            if seen is None:
                created += _make_dirs(work_dir)
                # Ours once made, unless a late takeover moved it aside meanwhile (see
                # _take_aside): then the claim there now is judged like any other.
                if _create(path, record, token):
                    made = _read(path)
                    if made is not None and made.token == token:
                        return DriverClaim(path, record, created, heartbeat_s, on_lost)
                continue  # another launch created it first: judge theirs
            checked = time.time()
            why = _why_dead(seen, checked)
            if why is None:
                raise _refusal(name, path, seen, checked)
            if _take_aside(path, seen, token):
                who = _driver(seen.record) if seen.record else f"file {path}"
                print(f"note: campaign '{name}': taking over the claim of a dead driver ({who}):"
                      f" {why}", file=sys.stderr)
        except FileNotFoundError:  # an ending launch removed the empty directory: again
            continue
        except OSError as exc:
            raise SpecError("work_dir", str(work_dir), "the campaign's work directory must be "
                            f"writable ({exc.strerror or exc})") from None
    raise CampaignClaimed(f"campaign '{name}': the claim {path} changed hands {_ATTEMPTS} times "
                          "while this launch tried to take it; launch again")
