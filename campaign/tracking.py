"""MLflow as the record: one experiment per campaign, a parent run per launch, a child run per job.

The driver is the only writer. Runs are nested with the ``mlflow.parentRunId`` tag through
:class:`mlflow.tracking.MlflowClient`, so nothing depends on the fluent API's active-run state.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOB_TAG = "job_id"
ROLE_TAG = "campaign_role"
FINISHED, RUNNING, FAILED, KILLED = "FINISHED", "RUNNING", "FAILED", "KILLED"


def resolve_tracking_uri(cli_uri: str | None, spec_uri: str | None) -> str:
    """--tracking-uri, else the spec's tracking.uri, else MLFLOW_TRACKING_URI, else MLflow's
    default (``sqlite:///mlflow.db`` in the working directory for MLflow 3)."""
    if cli_uri:
        return cli_uri
    if spec_uri:
        return spec_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    import mlflow

    return mlflow.get_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    # sqlite:///relative.db and sqlite:////absolute/path.db
    return Path(uri[len("sqlite:///"):])


def _quiet_mlflow() -> None:
    # Store creation logs alembic migrations at INFO; users need none of it.
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class JobRecord:
    """What MLflow holds about one job: its latest child run (FINISHED preferred)."""

    job_id: str
    status: str
    run_id: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        _quiet_mlflow()  # after the import: importing mlflow sets its loggers to INFO

        self.uri = uri
        self.experiment_name = experiment
        self.artifact_location = artifact_location
        self.client = MlflowClient(tracking_uri=uri)
        self._experiment_id: str | None = None

    @classmethod
    def store_exists(cls, uri: str) -> bool:
        path = sqlite_path(uri)
        return path is None or path.exists()

    # -- reading -----------------------------------------------------------------------------
    def experiment_id(self, create: bool = False) -> str | None:
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                self._experiment_id = experiment.experiment_id
            elif create:
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=self._default_artifact_location()
                )
        return self._experiment_id

    def _default_artifact_location(self) -> str | None:
        if self.artifact_location:
            return self.artifact_location
        db = sqlite_path(self.uri)
        if db is None:
            return None  # a tracking server chooses its own
        # Beside the database, so the store and its artifacts travel together.
        return (db.resolve().parent / "mlartifacts" / self.experiment_name).as_uri()

    def job_runs(self, job_ids: Iterable[str] | None = None) -> dict[str, list[Any]]:
        """All child runs per job id, newest first."""
        experiment_id = self.experiment_id()
        if experiment_id is None:
            return {}
        wanted = set(job_ids) if job_ids is not None else None
        runs: dict[str, list[Any]] = {}
        page_token = None
        while True:
            page = self.client.search_runs(
                [experiment_id], filter_string=f"tags.{ROLE_TAG} = 'job'",
                max_results=1000, order_by=["attributes.start_time DESC"], page_token=page_token,
            )
            for run in page:
                job_id = run.data.tags.get(JOB_TAG)
                if job_id and (wanted is None or job_id in wanted):
                    runs.setdefault(job_id, []).append(run)
            page_token = page.token
            if not page_token:
                return runs

    def job_records(self, job_ids: Iterable[str]) -> dict[str, JobRecord]:
        records = {}
        for job_id, runs in self.job_runs(job_ids).items():
            finished = [r for r in runs if r.info.status == FINISHED]
            run = finished[0] if finished else runs[0]
            records[job_id] = JobRecord(
                job_id=job_id, status=run.info.status, run_id=run.info.run_id,
                params=dict(run.data.params), metrics=dict(run.data.metrics),
                tags=dict(run.data.tags),
            )
        return records

    # -- writing (driver only) -----------------------------------------------------------------
    def start_parent(self, name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id(create=True), run_name=name,
            tags={ROLE_TAG: "launch", **tags},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_child(self, parent_id: str, name: str, tags: Mapping[str, str],
                    params: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id(create=True), run_name=name,
            tags={ROLE_TAG: "job", "mlflow.parentRunId": parent_id, **tags},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float | None]) -> None:
        self._log_points(run_id, [(key, value, 0) for key, value in metrics.items()])

    def log_series(self, run_id: str, key: str, values: list[float], max_points: int = 200
                   ) -> None:
        """One metric over steps (e.g. the training loss), thinned to about ``max_points``."""
        stride = max(1, len(values) // max_points)
        self._log_points(run_id, [(key, v, step) for step, v in enumerate(values)
                                  if step % stride == 0])

    def _log_points(self, run_id: str, points: list[tuple[str, float | None, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow stores NaN, but a non-finite estimate must not read as a number: skip it
        # (the run's tag ``estimate_valid`` says so).
        items = [Metric(key, float(value), now, step) for key, value, step in points
                 if value is not None and math.isfinite(float(value))]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_bytes(self, run_id: str, data: bytes, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    def log_file(self, run_id: str, path: str, artifact_dir: str | None = None) -> None:
        """Copy the file at ``path`` into the run's artifacts (under ``artifact_dir``)."""
        self.client.log_artifact(run_id, path, artifact_dir)

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def project_commit() -> str:
    """The git commit of the installed project, or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        return "unknown"
    dirty = subprocess.run(
        ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    return f"{commit}-dirty" if dirty else commit


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "openmm", "ray", "mlflow", "pymbar"):
        try:
            versions[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            versions[f"version.{package}"] = "not installed"
    return versions
