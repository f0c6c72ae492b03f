"""One driver per campaign (campaign/claim.py), with real processes and a real file system.

The claim's rules are checked against real holders: a Python process that holds a claim, the
same process killed (reaped, or left a zombie), a ``sleep`` whose pid a claim names with the
wrong start time (a reused pid), and claims written as a driver on another host writes them,
with a fresh or an old heartbeat. Then two real ``campaign launch`` processes of one tiny spec
in one directory: the second is refused at once with one line, the first runs the job once; and
a launch after a ``kill -9`` of a launching driver takes its claim over and finishes the job.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from campaign.claim import CLAIM_NAME, STALE_AFTER_S, CampaignClaimed, claim_campaign
from campaign.cli import app
from campaign.errors import SpecError
from campaign.plan import make_plan
from campaign.spec import parse_spec
from tests.conftest import TINY_SPEC, write_spec

ROOT = Path(__file__).resolve().parents[1]
# Holds the claim until its stdin closes (then releases it, as a launch does when it ends);
# its heartbeat beats every argv[2] seconds.
HOLDER = ("import sys; from campaign.claim import claim_campaign\n"
          "with claim_campaign(sys.argv[1], 'tiny', heartbeat_s=float(sys.argv[2])):\n"
          "    print('claimed', flush=True); sys.stdin.read()\n")
# Waits until the given unix time, then tries to claim; prints "claimed" or "refused".
RACER = ("import sys, time; from campaign.claim import CampaignClaimed, claim_campaign\n"
         "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
         "try:\n"
         "    claim = claim_campaign(sys.argv[1], 'tiny')\n"
         "except CampaignClaimed:\n"
         "    print('refused', flush=True)\n"
         "else:\n"
         "    print('claimed', flush=True); sys.stdin.read(); claim.release()\n")


def _env(tmp_path: Path) -> dict[str, str]:
    """This checkout first on the path, no inherited Ray cluster, a store of the test's own."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return env


def _python(code: str, *args: str, tmp_path: Path, **popen: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=_env(tmp_path),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **popen)


@contextlib.contextmanager
def _holding(work: Path, tmp_path: Path, heartbeat_s: float = 10.0,
             **popen: Any) -> Iterator[subprocess.Popen]:
    """A live process of this host that holds the claim of ``work``."""
    proc = _python(HOLDER, str(work), str(heartbeat_s), tmp_path=tmp_path, **popen)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    with _holding(tmp_path / "work", tmp_path) as proc:
        yield proc, tmp_path / "work"


def _remote_claim(work: Path, heartbeat_age_s: float) -> Path:
    """A claim as a driver on another node writes it, its heartbeat ``heartbeat_age_s`` old."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / CLAIM_NAME
    started = time.time() - 3600
    path.write_text(json.dumps({
        "campaign": "tiny", "host": "node-elsewhere", "pid": 4242, "pid_start": 17,
        "pid_space": "another-boot/pid:[1]", "started": started,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "token": "f" * 32}))
    beat = time.time() - heartbeat_age_s
    os.utime(path, (beat, beat))
    return path


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_claim_is_created_held_and_released(tmp_path: Path) -> None:
    work = tmp_path / "campaign-work" / "tiny"  # not there yet: the claim creates it
    with claim_campaign(work, "tiny") as claim:
        record = json.loads((work / CLAIM_NAME).read_text())
        assert (record["host"], record["pid"], record["token"]) == (
            socket.gethostname(), os.getpid(), claim.token)
        assert sorted(p.name for p in work.iterdir()) == [CLAIM_NAME]  # no temp file left
        # This very process is a live driver too: a second claim (e.g. from a thread) refused.
        with pytest.raises(CampaignClaimed, match=rf"pid {os.getpid()},"):
            claim_campaign(work, "tiny")
    assert not (tmp_path / "campaign-work").exists()  # stayed empty: removed with the claim
    with claim_campaign(work, "tiny"):
        (work / "checkpoints").mkdir()
    assert sorted(p.name for p in work.iterdir()) == ["checkpoints"]  # the launch's files stay


def test_live_driver_on_this_host_is_refused_and_nothing_written(holder) -> None:
    proc, work = holder
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in work.iterdir()}
    with pytest.raises(CampaignClaimed) as refused:
        claim_campaign(work, "tiny")
    message = str(refused.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"campaign 'tiny' is being run by a live driver \(host {re.escape(socket.gethostname())}"
        rf", pid {proc.pid}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); wait for it or stop "
        "it before launching again", message), message
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in work.iterdir()} == before
    proc.stdin.close()  # the holder's launch ends: it releases its claim
    assert proc.wait(timeout=10) == 0
    assert not (work / CLAIM_NAME).exists()
    with claim_campaign(work, "tiny"):
        pass


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_claim_of_a_killed_driver_is_taken_over(holder, reaped: bool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    proc, work = holder
    proc.send_signal(signal.SIGKILL)
    if reaped:
        proc.wait(timeout=10)
    else:  # killed but not yet waited for by its parent: still in the process table
        deadline = time.monotonic() + 10
        while _state(proc.pid) != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    with claim_campaign(work, "tiny") as claim:
        assert json.loads((work / CLAIM_NAME).read_text())["token"] == claim.token
    note = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"note: campaign 'tiny': taking over the claim of a dead driver \(host "
                        rf"\S+, pid {proc.pid}, since .* UTC\): its process is gone", note), note
    assert sorted(p.name for p in work.iterdir()) == []  # the stale claim is not kept aside


def test_pid_reused_by_another_process_is_not_the_driver(holder) -> None:
    """A claim naming a live pid whose process started at another time than the claim says
    (its driver died and the pid went to a new process) is stale."""
    proc, work = holder
    claim_file = work / CLAIM_NAME
    record = json.loads(claim_file.read_text())
    proc.kill()
    proc.wait(timeout=10)
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            started = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1]
                          .split()[19])
            claim_file.write_text(json.dumps({**record, "pid": sleeper.pid,
                                              "pid_start": started}))
            with pytest.raises(CampaignClaimed, match=rf"pid {sleeper.pid},"):
                claim_campaign(work, "tiny")
            claim_file.write_text(json.dumps({**record, "pid": sleeper.pid,
                                              "pid_start": started - 1}))
            with claim_campaign(work, "tiny"):
                pass
        finally:
            sleeper.kill()


def test_claim_from_another_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    claim_file = _remote_claim(work, heartbeat_age_s=5)
    with pytest.raises(CampaignClaimed) as refused:
        claim_campaign(work, "tiny")
    message = str(refused.value)
    assert "(host node-elsewhere, pid 4242, since " in message
    assert re.search(r"last heartbeat [56] s ago\); wait for it or stop it", message), message
    assert f"taken as lost {STALE_AFTER_S:.0f} s after its last heartbeat" in message
    assert json.loads(claim_file.read_text())["host"] == "node-elsewhere"  # untouched

    _remote_claim(work, heartbeat_age_s=STALE_AFTER_S + 30)  # its node was lost
    with claim_campaign(work, "tiny") as claim:
        assert json.loads(claim_file.read_text())["token"] == claim.token
    assert re.fullmatch(r"note: campaign 'tiny': taking over the claim of a dead driver \(host "
                        r"node-elsewhere, pid 4242, since .*\): no heartbeat for 9\d s \(stale "
                        r"after 60 s\)", capsys.readouterr().err.strip())


def test_heartbeat_keeps_the_claim_fresh(tmp_path: Path) -> None:
    work = tmp_path / "work"
    claim_file = work / CLAIM_NAME
    with claim_campaign(work, "tiny", heartbeat_s=0.1):
        old = time.time() - 1000
        os.utime(claim_file, (old, old))
        deadline = time.monotonic() + 10
        while claim_file.stat().st_mtime < time.time() - 30:
            assert time.monotonic() < deadline, "the heartbeat did not refresh the claim"
            time.sleep(0.05)
        claim_file.unlink()  # removed by hand: made again
        while not claim_file.exists():
            assert time.monotonic() < deadline, "the heartbeat did not make the claim again"
            time.sleep(0.05)
    assert not claim_file.exists()


def test_driver_whose_claim_was_taken_stops(tmp_path: Path) -> None:
    """A driver that looked dead (stalled past STALE_AFTER_S) and whose claim another driver
    took over stops at its next heartbeat, as on Ctrl-C, and leaves the other's claim alone."""
    work = tmp_path / "work"
    with _holding(work, tmp_path, heartbeat_s=0.2, stderr=subprocess.PIPE) as proc:
        claim_file = _remote_claim(work, heartbeat_age_s=1000)  # taken over behind its back
        assert proc.wait(timeout=20) != 0  # stopped by its KeyboardInterrupt
        error = proc.stderr.read()
    assert re.search(r"^error: campaign 'tiny': another driver \(host node-elsewhere, pid "
                     rf"4242, since .*\) has taken the place of this driver's claim "
                     rf"{re.escape(str(claim_file))}; stopping this launch$", error, re.M), error
    assert "KeyboardInterrupt" in error
    assert json.loads(claim_file.read_text())["host"] == "node-elsewhere"
    assert claim_file.stat().st_mtime < time.time() - 900  # not kept alive by the loser


def test_work_dir_that_cannot_hold_a_claim_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SpecError, match=r"^work_dir: '.*/file/work' is not allowed; the "
                       r"campaign's work directory must be writable \(Not a directory\)$"):
        claim_campaign(tmp_path / "file" / "work", "tiny")


def test_dry_run_takes_no_claim_and_runs_beside_a_driver(workdir: Path) -> None:
    spec = write_spec(workdir, TINY_SPEC)
    work = workdir / "campaign-work" / "tiny"
    with _holding(work, workdir) as proc:
        before = (work / CLAIM_NAME).read_bytes()
        result = CliRunner().invoke(app, ["launch", str(spec), "--dry-run"])
        assert result.exit_code == 0, result.output
        first_line = result.stdout.splitlines()[0]
        assert first_line.startswith("campaign tiny: 1 jobs,")
        assert "dry run: nothing started" in first_line
        assert (work / CLAIM_NAME).read_bytes() == before
        assert proc.poll() is None


@pytest.mark.parametrize("stale", [False, True], ids=["no-claim", "stale-claim"])
def test_racing_launches_one_wins(tmp_path: Path, stale: bool) -> None:
    """Eight processes claim at the same instant, over no claim or over a dead node's claim:
    exactly one holds it, the others are refused."""
    work = tmp_path / "work"
    if stale:
        _remote_claim(work, heartbeat_age_s=STALE_AFTER_S + 30)
    start = time.time() + 2.0  # all have imported by then
    racers = [_python(RACER, str(work), str(start), tmp_path=tmp_path) for _ in range(8)]
    try:
        said = [proc.stdout.readline().strip() for proc in racers]
        assert sorted(said) == ["claimed"] + ["refused"] * 7, said
        winner = racers[said.index("claimed")]
        assert json.loads((work / CLAIM_NAME).read_text())["pid"] == winner.pid
        assert sorted(p.name for p in work.iterdir()) == [CLAIM_NAME]
    finally:
        for proc in racers:
            proc.stdin.close()
            proc.wait(timeout=10)
    assert not (work / CLAIM_NAME).exists()


# End to end: real launches of one tiny job (about 20 s each on a 2-core machine, mostly Ray).
def _tiny_spec(directory: Path) -> tuple[Path, str]:
    data = copy.deepcopy(TINY_SPEC)
    data["reference"].update(n_chains=128, n_steps=300, burn_in=100)
    data["flow"].update(n_layers=2, hidden=16)
    data["training"].update(steps=30, batch_size=128)
    data["sampling"].update(n_samples=500, energy_batch_size=500)
    for role in ("trainer", "energy_evaluator"):  # one job: one actor per role is enough
        data["resources"][role]["count"] = 1
    (job,) = make_plan(parse_spec(data)).jobs
    return write_spec(directory, data), job.job_id


def _launch(spec: Path, tmp_path: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as sink:  # a session of its own: a kill reaches Ray's children too
        return subprocess.Popen([sys.executable, "-m", "campaign.cli", "launch", str(spec)],
                                env=_env(tmp_path), cwd=tmp_path, stdout=sink, stderr=sink,
                                start_new_session=True)


def _wait_for_claim(path: Path, proc: subprocess.Popen, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the launch ended (rc {proc.returncode}) before claiming"
        assert time.monotonic() < deadline, "no claim within a minute"
        time.sleep(0.02)
    return time.monotonic()


def _finished_child_runs(directory: Path) -> dict[str, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    counts: dict[str, int] = {}
    for run in client.search_runs([experiment.experiment_id], "tags.campaign_role = 'job'"):
        if run.info.status == "FINISHED":
            counts[run.data.tags["job_id"]] = counts.get(run.data.tags["job_id"], 0) + 1
    return counts


@pytest.mark.slow
def test_two_launches_at_once_run_each_job_once(tmp_path: Path) -> None:
    spec, job_id = _tiny_spec(tmp_path)
    claim_file = tmp_path / "campaign-work" / "tiny" / CLAIM_NAME
    started = time.monotonic()
    first = _launch(spec, tmp_path, tmp_path / "first.log")
    try:
        claimed = _wait_for_claim(claim_file, first)
        second = subprocess.run([sys.executable, "-m", "campaign.cli", "launch", str(spec)],
                                env=_env(tmp_path), cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        refused = time.monotonic()
        assert first.poll() is None  # the refusal came while the first launch ran
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stdout == ""
        line = second.stderr.strip()
        assert len(second.stderr.splitlines()) == 1, second.stderr
        assert line.startswith(f"error: campaign 'tiny' is being run by a live driver (host "
                               f"{socket.gethostname()}, pid {first.pid}, since "), line
        assert refused - claimed < 30
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    done = time.monotonic()
    assert _finished_child_runs(tmp_path) == {job_id: 1}
    assert not claim_file.exists()  # released at the end
    print(f"\nfirst launch claimed after {claimed - started:.1f} s; second refused "
          f"{refused - claimed:.1f} s after that:\n{line}\nfirst launch finished (exit 0) "
          f"after {done - started:.1f} s")


@pytest.mark.slow
def test_launch_after_kill_9_of_a_launching_driver_takes_its_claim_over(tmp_path: Path) -> None:
    spec, job_id = _tiny_spec(tmp_path)
    claim_file = tmp_path / "campaign-work" / "tiny" / CLAIM_NAME
    killed = _launch(spec, tmp_path, tmp_path / "killed.log")
    try:
        _wait_for_claim(claim_file, killed)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    assert json.loads(claim_file.read_text())["pid"] == killed.pid  # left behind
    again = subprocess.run([sys.executable, "-m", "campaign.cli", "launch", str(spec),
                            "--format", "json"], env=_env(tmp_path), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"note: campaign 'tiny': taking over the claim of a dead driver (host "
            f"{socket.gethostname()}, pid {killed.pid}, since ") in again.stderr
    assert json.loads(again.stdout)["finished"] == [job_id]
    assert _finished_child_runs(tmp_path) == {job_id: 1}
    assert not claim_file.exists()
