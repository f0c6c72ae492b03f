"""A real single-host Slurm for tests: Debian's slurmctld, slurmd and munge, installed when
missing (root and a package registry needed), configured under a temporary directory and
stopped by process id (docs/architecture.md, Traps worked around).

Each daemon runs in the foreground, backgrounded here, with its output in a file: otherwise the
caller's pipes stay open and it hangs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODE = "campaignnode"


def install_reason() -> str | None:
    """None when the Slurm and munge daemons are (or could be made) available; else why not."""
    if all(shutil.which(cmd) for cmd in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm and munge are not installed and installing them needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed and this system has no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        update = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True,
                                timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = (done.stderr or update.stderr).strip().splitlines()[-1:]
            return f"apt-get could not install {' '.join(PACKAGES)}: {' '.join(tail)}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SlurmCluster:
    """A running slurmctld + slurmd + munged under ``root``; ``env`` points clients at it."""

    root: Path
    cpus: int
    env: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        root = self.root
        for name in ("state", "spool", "munge", "log"):
            (root / name).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o755)  # others may enter the socket's directory
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_socket = root / "munge" / "munge.socket.2"
        conf = root / "slurm.conf"
        conf.write_text(f"""ClusterName=campaigntest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=300
NodeName={NODE} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={self.cpus}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        self._daemon(["munged", "-F", "-f", f"--key-file={key}", f"--socket={munge_socket}",
                      f"--pid-file={root / 'munge' / 'munged.pid'}",
                      f"--seed-file={root / 'munge' / 'munged.seed'}",
                      f"--log-file={root / 'log' / 'munged.log'}"], "munged")
        self._wait(lambda: munge_socket.exists(), 20, "munged's socket")
        self._daemon(["slurmctld", "-D", "-i", "-f", str(conf)], "slurmctld")
        self._daemon(["slurmd", "-D", "-N", NODE, "-f", str(conf)], "slurmd")
        self._wait(self._node_idle, 60, "the Slurm node to come up idle")

    def _daemon(self, command: list[str], name: str) -> None:
        with (self.root / "log" / f"{name}.out").open("w") as sink:
            proc = subprocess.Popen(command, env=self.env, stdout=sink, stderr=sink,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids.append(proc.pid)

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env,
                             capture_output=True, text=True, timeout=30)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.3)
        logs = "\n".join(p.read_text()[-1500:] for p in (self.root / "log").glob("*")
                         if p.is_file())
        raise RuntimeError(f"timed out waiting for {what}; logs:\n{logs}")

    def job_state(self, job_id: str) -> str:
        """The job's state from ``scontrol show job`` (``sbatch --wait`` reports late)."""
        out = subprocess.run(["scontrol", "show", "job", job_id], env=self.env,
                             capture_output=True, text=True, timeout=30)
        for word in out.stdout.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "UNKNOWN"

    def wait_job(self, job_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
                return state
            time.sleep(1.0)
        return f"{state} (timed out after {timeout:.0f} s)"

    def cancel(self, job_id: str) -> None:
        """scancel the job if it still runs, and stop any Ray node it leaves behind (each
        names its temp dir /tmp/rc<job id>-<index> on its command line)."""
        subprocess.run(["scancel", job_id], env=self.env, capture_output=True, timeout=30)
        stop_processes_naming(f"/tmp/rc{job_id}-")

    def stop(self) -> None:
        """Cancel every job, stop the job steps left behind (each slurmstepd runs a process
        naming this cluster's spool directory), then the daemons by process id (never by
        name: other Slurms may run here)."""
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env,
                       capture_output=True, timeout=30, check=False)
        stop_processes_naming(str(self.root), parents_named="slurmstepd")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in reversed(self.pids):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(_running(p) for p in self.pids):
                time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_processes_naming(text: str, parents_named: str | None = None,
                          term_grace: float = 5.0) -> None:
    """SIGTERM, then after ``term_grace`` seconds SIGKILL, every process whose command line
    contains ``text``, and their children (never ``ray stop``: it ends every Ray process on the
    machine); also their parents whose command line starts with ``parents_named``.
    ``term_grace`` 0: SIGKILL at once (a throw-away Ray node's GCS and raylet outlast a 5 s
    SIGTERM grace anyway)."""

    def table() -> dict[int, tuple[int, str]]:
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError, IndexError):
                continue
            if state != "Z":  # a zombie is gone already; only its parent can reap it
                found[int(entry.name)] = (int(parent), cmdline)
        return found

    def targets() -> set[int]:
        procs = table()
        chosen = {pid for pid, (_, cmd) in procs.items() if text in cmd} - {os.getpid()}
        if parents_named:
            chosen |= {procs[pid][0] for pid in chosen if procs[pid][0] in procs
                       and procs[procs[pid][0]][1].startswith(parents_named)}
        grew = True
        while grew:
            children = {pid for pid, (parent, _) in procs.items() if parent in chosen}
            grew = not children <= chosen
            chosen |= children
        return chosen

    steps = ((signal.SIGTERM, term_grace),) if term_grace > 0 else ()
    for sig, grace in (*steps, (signal.SIGKILL, 10.0)):
        for pid in targets():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while targets() and time.monotonic() < deadline:
            time.sleep(0.2)
