"""Start or join Ray (or nothing, for the local backend), check that the resources can be
placed, run the scheduler over the chosen backend, shut down."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from campaign.cluster import probe_cluster, ray_address, unreachable_reason
from campaign.errors import SpecError
from campaign.plan import Plan
from campaign.recorder import Recorder
from campaign.scheduler import JobRun, LaunchSummary, Progress, Scheduler
from campaign.tracking import (
    FINISHED,
    Tracker,
    library_versions,
    project_commit,
    resolve_tracking_uri,
)

T = TypeVar("T")


def local_capacity() -> dict[str, float]:
    """CPUs and GPUs of this machine (what a local Ray instance gets)."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_resources(plan: Plan, nodes: list[dict[str, float]], where: str) -> None:
    """Every role's actor must fit on at least one node, and all actors together (each role's
    count × its share) within the total; else a SpecError naming the field. Every actor lives
    for the whole launch, so an actor that does not fit would wait forever."""
    for key, field in (("CPU", "cpus"), ("GPU", "gpus")):
        for role, res in plan.resources.items():
            asked = float(res[field])
            best = max((node.get(key, 0.0) for node in nodes), default=0.0)
            if asked > best:
                raise SpecError(
                    f"resources.{role}.{field}", res[field],
                    f"the largest node of {where} has {best:g} {key}s; ask for at most that")
        total = sum(float(res["count"]) * float(res[field]) for res in plan.resources.values())
        available = sum(node.get(key, 0.0) for node in nodes)
        if total > available + 1e-9:
            shares = ", ".join(f"{role} {res['count']} x {res[field]:g}"
                               for role, res in plan.resources.items())
            raise SpecError(
                "resources", f"{total:g} {key}s in all ({shares})",
                f"{where} has {available:g} {key}s; all actors run at once, so their "
                f"{field} (count x {field}) must add up to at most that")


def process_start_time() -> float:
    """Unix time at which this process started (from /proc on Linux, to 10 ms; elsewhere the
    time of this call), the zero of a launch's timeline."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started_after_boot)
    except (OSError, ValueError, IndexError):
        return time.time()


def _ray_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def admit(plan: Plan, address: str) -> bool:
    """Check, before anything is started or written, that the cluster at ``address`` answers,
    admits this driver (token, Ray and Python versions) and can place every actor of ``plan``
    (its live nodes' CPUs and GPUs, from the cluster's GCS); else a SpecError. False where the
    GCS did not list the nodes (the plan is then checked once Ray is joined)."""
    reason = unreachable_reason(address)
    if reason is not None:
        raise SpecError("--address", address, f"no Ray cluster answers there ({reason}); "
                        "start one (ray start --head) or leave --address and RAY_ADDRESS "
                        "unset for a local instance")
    refusal, nodes = probe_cluster(address)
    if refusal is not None:
        raise SpecError("--address", address, refusal)
    if nodes is None:
        return False
    check_resources(plan, nodes, f"the Ray cluster at {address}")
    return True


def check_cluster_resources(plan: Plan, address: str) -> None:
    """Check the plan against the live nodes of the cluster at ``address`` (a SpecError if no
    node can hold an actor); joins the cluster only where its GCS did not list the nodes."""
    import ray

    if not admit(plan, address):
        start_ray(address)
        try:
            check_resources(plan, _ray_nodes(), f"the Ray cluster at {address}")
        finally:
            ray.shutdown()


def start_ray(address: str | None, while_starting: Callable[[], T] | None = None,
              on_ready: Callable[[], None] | None = None) -> T | None:
    """Join the cluster at ``address`` (admitted before: :func:`admit`) or start a local
    instance; meanwhile, in a thread, run ``while_starting`` (e.g. opening the tracking
    store, which takes seconds for a new SQLite file) and return its result. ``on_ready``
    runs as soon as Ray is up, before waiting for ``while_starting``."""
    import ray

    with ThreadPoolExecutor(max_workers=1) as pool:
        opening = pool.submit(while_starting) if while_starting is not None else None
        if address:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        if on_ready is not None:
            on_ready()
        return opening.result() if opening is not None else None


def launch_plan(plan: Plan, spec_path: Path, address: str | None, tracking_uri: str | None,
                show_progress: bool, backend: str = "ray") -> LaunchSummary:
    """Run the plan's unfinished jobs on ``backend`` (``ray``: a local instance or the cluster
    at ``address``; ``local``: this process) and record them in MLflow."""
    marks = {"process_start": process_start_time()}
    uri = resolve_tracking_uri(tracking_uri, plan.spec.tracking.uri)
    progress = RichProgress() if show_progress else Progress()

    def open_tracker() -> Tracker:
        tracker = Tracker(uri, plan.spec.experiment_name, plan.spec.tracking.artifact_location)
        tracker.experiment_id()  # the first query creates a new store's tables
        marks["tracker_ready"] = time.time()
        return tracker

    tags = {"campaign": plan.spec.name, "spec_hash": plan.spec_hash,
            "git_commit": project_commit(), "spec_file": str(spec_path),
            "driver_host": socket.gethostname(), "driver_pid": str(os.getpid()),
            "backend": backend, **library_versions()}
    if backend == "local":
        from campaign.backends import LocalBackend

        check_resources(plan, [local_capacity()], "this machine")
        tracker = open_tracker()
        scheduler = Scheduler(plan, LocalBackend(plan, marks), progress, marks)
        return scheduler.run(Recorder(tracker, plan, {**tags, "ray_address": "none"}))
    return _launch_on_ray(plan, address, uri, marks, progress, open_tracker, tags)


def _launch_on_ray(plan: Plan, address: str | None, uri: str, marks: dict[str, float],
                   progress: Progress, open_tracker: Callable[[], Tracker],
                   tags: dict[str, str]) -> LaunchSummary:
    import ray

    from campaign.backends import RayBackend

    address = ray_address(address)
    # Before anything is started or written: the plan fits this machine, or the cluster admits
    # this driver and can place the plan (checked once joined where its GCS listed no nodes).
    if address:
        nodes_checked = admit(plan, address)
    else:
        check_resources(plan, [local_capacity()], "this machine")
        nodes_checked = True
    # Nothing to run (every job finished before): record the launch, start no Ray.
    all_done = Tracker.store_exists(uri) and _all_finished(plan, uri)
    backend = RayBackend(plan, marks)

    def ray_ready() -> None:
        marks["ray_ready"] = time.time()
        if not nodes_checked:
            check_resources(plan, _ray_nodes(), f"the Ray cluster at {address}")
        # Some job is left to run: start the actor processes now (seconds of imports each),
        # while the tracking store still opens.
        backend.start()

    try:
        opened = None if all_done else start_ray(address, while_starting=open_tracker,
                                                 on_ready=ray_ready)
        tracker = opened or open_tracker()
        scheduler = Scheduler(plan, backend, progress, marks)
        return scheduler.run(Recorder(tracker, plan, {**tags, "ray_address": address or "local"}))
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _all_finished(plan: Plan, uri: str) -> bool:
    tracker = Tracker(uri, plan.spec.experiment_name, plan.spec.tracking.artifact_location)
    records = tracker.job_records(job.job_id for job in plan.jobs)
    return all(job.job_id in records and records[job.job_id].status == FINISHED
               for job in plan.jobs)


class RichProgress(Progress):
    """Jobs done of total and, for each running job, its stage, tasks done of total, a
    running training's step and loss, and the time left (on stderr).

    On a terminal this is a live display; elsewhere (CI, logs) one line per stage change and
    per job done, and a job's progress at most once a minute.
    """

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live: Any = None
        self.running: dict[str, tuple[str, str, float]] = {}
        self.notes: dict[str, str] = {}
        self.printed: dict[str, float] = {}
        self.total = self.done_count = self.failed = 0

    def start(self, total: int, skipped: int) -> None:
        self.total, self.done_count = total, skipped
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._render(), console=self.console, refresh_per_second=4,
                             transient=False, get_renderable=self._render)
            self.live.start()
        else:
            self.console.print(f"{total} jobs, {skipped} already finished")

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(show_header=True, header_style="bold", box=None)
        for name in ("job", "grid", "stage", "s in stage", "progress"):
            table.add_column(name)
        now = time.time()
        for job_id, (label, stage, since) in self.running.items():
            table.add_row(job_id[:12], label, stage, f"{now - since:.0f}",
                          self.notes.get(job_id, ""))
        head = (f"jobs done {self.done_count}/{self.total}"
                + (f" ({self.failed} failed)" if self.failed else ""))
        bar = ProgressBar(total=max(self.total, 1), completed=self.done_count, width=40)
        top = Table.grid(padding=(0, 2))
        top.add_row(bar, head)  # a grid row ends its line; a bare ProgressBar does not
        return Group(top, table)

    def stage(self, run: JobRun) -> None:
        self.running[run.job.job_id] = (run.job.label, run.stage, time.time())
        if self.live is None:
            self.console.print(f"{run.job.job_id[:12]} {run.job.label}: {run.stage}")

    def update(self, run: JobRun) -> None:
        job_id = run.job.job_id
        self.notes[job_id] = run.progress_text()
        if self.live is None and time.time() - self.printed.get(job_id, 0.0) > 60:
            self.printed[job_id] = time.time()
            self.console.print(f"{job_id[:12]} {run.job.label}: {self.notes[job_id]}")

    def done(self, run: JobRun) -> None:
        self.running.pop(run.job.job_id, None)
        self.notes.pop(run.job.job_id, None)
        self.done_count += 1
        self.failed += run.stage == "failed"
        if self.live is None:
            word = "FAILED: " + (run.error or "") if run.stage == "failed" else "finished"
            self.console.print(f"{run.job.job_id[:12]} {run.job.label}: {word} "
                               f"({self.done_count}/{self.total} done)")

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        sys.stderr.flush()
