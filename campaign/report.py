"""Read a campaign's state back from MLflow: status per job and rows for comparison.

Nothing here writes: a missing SQLite store or experiment means every job is pending.
"""

from __future__ import annotations

from typing import Any

from campaign.plan import Plan
from campaign.tracking import (
    FAILED,
    FINISHED,
    KILLED,
    RUNNING,
    JobRecord,
    Tracker,
    resolve_tracking_uri,
)

_FREE_ENERGIES = tuple(f"delta_f_{method}{per}{err}" for method in ("lfep", "lbar", "mbar")
                      for per in ("", "_per_molecule") for err in ("", "_err"))
KEY_METRICS = ("atoms", "delta_f", "delta_f_err", "reference_delta_f", "reference_delta_f_err",
               "delta_f_phi", "delta_f_phi_err", "delta_f_phi_md", "delta_f_phi_md_err",
               "md_transitions_phi", "valid_fraction",
               *_FREE_ENERGIES, "delta_f_lfep_err_bootstrap", "delta_f_lbar_err_bootstrap",
               "ess", "ess_err", "ess_backward", "ess_backward_err",
               "nll", "forward_kl", "energy_w2", "energy_w2_capped",
               "energy_above_reference_fraction", "distance_w1", "nfe", "path_length",
               "seconds_per_sample", "rdf_O_O_max_z", "rdf_O_O_max_z_noise95",
               "rdf_O_H_max_z", "rdf_O_H_max_z_noise95",
               "mode_weight_error", "mode_weight_error_reweighted", "tempering_beta_reached",
               "tempering_levels", "time_reference", "time_train", "time_sample", "time_energy",
               "time_estimate", "time_train_cpu_seconds", "md_ns", "md_seconds_all_rungs",
               "energy_evaluations",
               "energy_evaluations_train")
# Params that say what a job computes, shown next to the grid axes where a job records them.
KEY_PARAMS = ("molecules", "base_temperature_k", "target_temperature_k")
STATE_OF_STATUS = {FINISHED: "finished", RUNNING: "running", FAILED: "failed", KILLED: "failed"}


def _records(plan: Plan, tracking_uri: str | None) -> dict[str, JobRecord]:
    uri = resolve_tracking_uri(tracking_uri, plan.spec.tracking.uri)
    if not Tracker.store_exists(uri):
        return {}
    tracker = Tracker(uri, plan.spec.experiment_name, plan.spec.tracking.artifact_location)
    return tracker.job_records(job.job_id for job in plan.jobs)


def job_rows(plan: Plan, tracking_uri: str | None) -> list[dict[str, Any]]:
    """A line per planned job: state (finished/running/failed/pending), MLflow status, the
    stage it is in (or ended in), the Ray node id its latest task was given to, how many
    of its tasks were run again after an actor or node died, and its progress (tasks done of
    total, a running training's step and loss, the time left)."""
    records = _records(plan, tracking_uri)
    rows = []
    for job in plan.jobs:
        record = records.get(job.job_id)
        status = record.status if record else None
        rows.append({
            "job_id": job.job_id, "label": job.label, "status": status,
            "state": STATE_OF_STATUS.get(status, "pending") if status else "pending",
            "run_id": record.run_id if record else None,
            "stage": record.tags.get("stage") if record else None,
            "node": record.tags.get("node") if record else None,
            "retries": int(record.tags.get("retries", 0)) if record else 0,
            "error": record.tags.get("error") if record else None,
            "progress": record.tags.get("progress") if record else None,
        })
    return rows


def comparison_records(plan: Plan, tracking_uri: str | None) -> list[dict[str, Any]]:
    """One object per job: job_id, status (MLflow's, or PENDING), params, metrics, grid.

    Params are typed: the job's resolved settings as the plan holds them (numbers as numbers,
    booleans as booleans, null for unset), plus the strings the job recorded beside them
    (estimand, reference method, ...). MLflow keeps every param as a string."""
    records = _records(plan, tracking_uri)
    out = []
    for job in plan.jobs:
        record = records.get(job.job_id)
        out.append({
            "job_id": job.job_id,
            "status": record.status if record else "PENDING",
            "run_id": record.run_id if record else None,
            "grid": job.grid_values,
            "params": {**(record.params if record else {}), **job.params},
            "metrics": record.metrics if record else {},
        })
    return out
