"""The ``campaign`` command: validate, launch, status, compare.

Bad input prints one line on stderr (``error: <field>: <value> ...; <what is allowed>``) and exits
with code 2 before anything is started or written. ``launch`` exits 1 when any job failed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from campaign.errors import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed campaign manager for Boltzmann generators.")
stderr = Console(stderr=True, highlight=False)


class LaunchFormat(StrEnum):
    table = "table"
    json = "json"


class CompareFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


SpecPath = Annotated[Path, typer.Argument(help="campaign spec (YAML)")]
TrackingUri = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking URI (default: spec, MLFLOW_TRACKING_URI, MLflow's)")]


def _fail_input(error: SpecError) -> None:
    print(f"error: {error}", file=sys.stderr)
    raise typer.Exit(2)


def _plan(spec_path: Path):  # -> Plan (imported lazily: keeps --help fast)
    from campaign.plan import make_plan
    from campaign.spec import load_spec

    try:
        return make_plan(load_spec(spec_path))
    except SpecError as error:
        _fail_input(error)


@app.command()
def validate(spec: SpecPath) -> None:
    """Check a spec and its grid; print the number of jobs."""
    plan = _plan(spec)
    print(f"ok: {spec} is valid; {len(plan.jobs)} jobs, spec hash {plan.spec_hash}")


@app.command()
def launch(
    spec: SpecPath,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="print the plan, start nothing")] = False,
    address: Annotated[str | None, typer.Option(
        "--address", help="join this Ray cluster (default: RAY_ADDRESS, else local)")] = None,
    tracking_uri: TrackingUri = None,
    fmt: Annotated[LaunchFormat, typer.Option(
        "--format", help="output format")] = LaunchFormat.table,
) -> None:
    """Run every job of the spec that has not finished yet (resume is automatic)."""
    plan = _plan(spec)
    if dry_run:
        _print_plan(plan, fmt)
        return
    from campaign.cluster import configure_ray_auth, ray_address

    configure_ray_auth(ray_address(address))  # before Ray is imported (DESIGN.md §5)
    from campaign.launcher import launch_plan

    try:
        summary = launch_plan(plan, spec, address=address, tracking_uri=tracking_uri,
                              show_progress=fmt == LaunchFormat.table)
    except SpecError as error:
        _fail_input(error)
    except RuntimeError as error:  # the campaign could not go on (e.g. no actor could start)
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(1) from None
    _print_summary(summary, fmt)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def status(spec: SpecPath, tracking_uri: TrackingUri = None,
           fmt: Annotated[LaunchFormat, typer.Option("--format")] = LaunchFormat.table) -> None:
    """Counts of finished, running, failed and pending jobs, and a line per job."""
    from campaign.report import job_rows

    plan = _plan(spec)
    rows = job_rows(plan, tracking_uri)
    counts = {key: 0 for key in ("finished", "running", "failed", "pending")}
    for row in rows:
        counts[row["state"]] += 1
    if fmt == LaunchFormat.json:
        print(json.dumps({"counts": counts, "jobs": rows}, indent=2))
        return
    print(", ".join(f"{n} {state}" for state, n in counts.items()) + f" (of {len(rows)} jobs)")
    for row in rows:
        print(f"{row['job_id']}  {row['state']:<8}  {row['status'] or '-':<9}  {row['label']}"
              + (f"  error: {row['error']}" if row.get("error") else ""))


@app.command()
def compare(spec: SpecPath, tracking_uri: TrackingUri = None,
            fmt: Annotated[CompareFormat, typer.Option("--format")] = CompareFormat.table) -> None:
    """One row per job: status, key params and metrics."""
    from campaign.plan import short_value
    from campaign.report import KEY_METRICS, KEY_PARAMS, comparison_records

    plan = _plan(spec)
    records = comparison_records(plan, tracking_uri)
    if fmt == CompareFormat.json:
        print(json.dumps(records, indent=2, allow_nan=False, default=str))
        return
    params = sorted({k for r in records for k in r["grid"]})
    axes = {"target_temperature_k": "temperature", "base_temperature_k": "base.temperature"}
    shown_params = [p for p in KEY_PARAMS if axes.get(p) not in params
                    and any(p in r["params"] for r in records)]
    metrics = [m for m in KEY_METRICS if any(m in r["metrics"] for r in records)]
    header = ["job_id", "status", "system", *params, *shown_params, *metrics]
    rows = [[r["job_id"], r["status"], r["params"].get("system.kind", ""),
             *(short_value(r["grid"][p]) if p in r["grid"] else "" for p in params),
             *(r["params"].get(p, "") for p in shown_params),
             *(r["metrics"].get(m, "") for m in metrics)] for r in records]
    if fmt == CompareFormat.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(rows)
        print(buffer.getvalue(), end="")
        return
    from rich.table import Table

    columns = _table_columns(header, 3 + len(params) + len(shown_params))
    table = Table(title=f"{plan.spec.name}: {len(records)} jobs (free energies in kT; "
                  "value ± 1 sigma)")
    for _, name in columns:
        table.add_column(name, no_wrap=True, min_width=min(len(name), 16))
    for row in rows:
        cells = []
        for i, _ in columns:
            err = header.index(f"{header[i]}_err") if f"{header[i]}_err" in header else None
            if i == 0:
                cells.append(str(row[i])[:12])
            elif err is not None and isinstance(row[i], float) and isinstance(row[err], float):
                cells.append(_with_error(row[i], row[err]))
            else:
                cells.append(_fmt(row[i]))
        table.add_row(*cells)
    Console(width=max(280, Console().width)).print(table)


# Metrics the table shows (each with its ``_err`` in the same cell); an estimator's own name
# (delta_f_lfep, delta_f_mbar) replaces the generic one where a job records both.
TABLE_COLUMNS = ("delta_f", "reference_delta_f", "delta_f_lfep", "delta_f_lbar", "delta_f_mbar",
                 "delta_f_lfep_per_molecule", "delta_f_lbar_per_molecule",
                 "delta_f_mbar_per_molecule", "ess", "ess_backward", "nll", "time_train",
                 "energy_evaluations")
SHORT_NAMES = {"reference_delta_f": "ref_delta_f", "_per_molecule": "/mol",
               "delta_f_": "", "energy_evaluations": "n_energy", "target_temperature_k": "T (K)",
               "base_temperature_k": "T_base (K)", "molecules": "N"}


def _table_columns(header: list[str], n_leading: int) -> list[tuple[int, str]]:
    """(index, title) of the columns the table shows: the leading ones and TABLE_COLUMNS."""
    hidden = {"delta_f"} if "delta_f_lfep" in header else set()
    if "delta_f_mbar" in header:
        hidden.add("reference_delta_f")
    columns = []
    for i, name in enumerate(header):
        if i < n_leading or (name in TABLE_COLUMNS and name not in hidden):
            title = name
            for long, short in SHORT_NAMES.items():
                title = title.replace(long, short)
            columns.append((i, title or name))
    return columns


def _with_error(value: float, error: float) -> str:
    """``value ± error`` with the error to 2 significant digits and the value to the same
    decimal place (e.g. -669.47 ± 0.12, -41.8416 ± 0.0074)."""
    if not (math.isfinite(value) and math.isfinite(error)) or error <= 0:
        return f"{_fmt(value)} ± {_fmt(error)}"
    decimals = max(0, 1 - math.floor(math.log10(error)))
    return f"{value:.{decimals}f} ± {error:.{decimals}f}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_plan(plan: Any, fmt: LaunchFormat) -> None:
    if fmt == LaunchFormat.json:
        print(json.dumps(plan.as_records(), indent=2))
        return
    print(f"campaign {plan.spec.name}: {len(plan.jobs)} jobs (dry run: nothing started)")
    for role, res in plan.resources.items():
        print(f"  {role:<17} {res['count']} x (cpus={res['cpus']:g}, gpus={res['gpus']:g})")
    for job in plan.jobs:
        print(f"  {job.job_id}  {job.label}")


def _print_summary(summary: Any, fmt: LaunchFormat) -> None:
    if fmt == LaunchFormat.json:
        print(json.dumps({
            "parent_run_id": summary.parent_run_id, "seconds": round(summary.seconds, 2),
            "finished": [r.job.job_id for r in summary.finished],
            "skipped": [j.job_id for j in summary.skipped],
            "failed": [{"job_id": r.job.job_id, "error": r.error} for r in summary.failed],
        }, indent=2))
        return
    print(f"{len(summary.finished)} finished, {len(summary.skipped)} skipped (already finished), "
          f"{len(summary.failed)} failed in {summary.seconds:.1f} s; "
          f"MLflow parent run {summary.parent_run_id}")
    for run in summary.failed:
        print(f"FAILED {run.job.job_id} ({run.job.label}): {run.error}", file=sys.stderr)


def main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    app()


if __name__ == "__main__":
    main()
