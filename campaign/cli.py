"""The ``campaign`` command: validate, launch, status, compare.

Bad input prints one line on stderr (``error: <field>: <value> ...; <what is allowed>``) and exits
with code 2 before anything is started or written. ``launch`` exits 1 when any job failed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from campaign.errors import SpecError

if TYPE_CHECKING:
    from campaign.claim import DriverClaim

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed campaign manager for Boltzmann generators.")
stderr = Console(stderr=True, highlight=False)


class LaunchFormat(StrEnum):
    table = "table"
    json = "json"


class Backend(StrEnum):
    ray = "ray"
    local = "local"


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
    backend: Annotated[Backend, typer.Option(
        "--backend", help="ray: Ray actors, on a local instance or the cluster at --address; "
        "local: every task in this process, one at a time (no Ray)")] = Backend.ray,
) -> None:
    """Run every job of the spec that has not finished yet (resume is automatic)."""
    plan = _plan(spec)
    if backend == Backend.local:
        if address is not None:
            _fail_input(SpecError("--address", address, "joins a Ray cluster; leave it out "
                                  "with --backend local, or use --backend ray"))
        _refuse_process_exit(plan)
    if dry_run:
        from campaign.cluster import configure_ray_auth, ray_address
        from campaign.launcher import check_cluster_resources, check_resources, local_capacity

        target = ray_address(address)
        try:
            if target:  # join the cluster only to read its nodes' resources
                configure_ray_auth(target)
                check_cluster_resources(plan, target)
            else:
                check_resources(plan, [local_capacity()], "this machine")
        except SpecError as error:
            _fail_input(error)
        _print_plan(plan, fmt)
        return
    if backend == Backend.ray:
        from campaign.cluster import configure_ray_auth, ray_address

        configure_ray_auth(ray_address(address))  # before Ray is imported (docs/architecture)
    from campaign.launcher import launch_plan

    claim = _claim(plan)  # one driver per campaign: a second launch stops here (exit 2)
    try:
        with claim, _stdout_to_stderr():  # the claim is released however the launch ends
            summary = launch_plan(plan, spec, address=address, tracking_uri=tracking_uri,
                                  show_progress=fmt == LaunchFormat.table,
                                  backend=backend.value)
    except SpecError as error:
        _fail_input(error)
    except RuntimeError as error:  # the campaign could not go on (e.g. no actor could start)
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(1) from None
    _print_summary(summary, fmt)
    if summary.failed:
        raise typer.Exit(1)


def _refuse_process_exit(plan: Any) -> None:
    """The local backend runs every task in this process: nothing may end it on purpose."""
    for job in plan.jobs:
        if job.config.inject_failure == "trainer_process_exit":
            _fail_input(SpecError("inject_failure", "trainer_process_exit", f"(job {job.job_id}) "
                                  "ends a trainer's process; allowed only with --backend ray"))


def _claim(plan: Any) -> DriverClaim:
    """Claim the campaign for this process before Ray starts or anything is written, so that
    a second launch of a campaign whose driver is alive (on any host sharing the work
    directory) is refused at once with one line; a dead driver's claim is taken over."""
    from campaign.claim import CampaignClaimed, claim_campaign

    try:
        return claim_campaign(plan.spec.work_path(), plan.spec.name)
    except CampaignClaimed as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(2) from None
    except SpecError as error:
        _fail_input(error)


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
    print(f"{'job_id':<16}  {'state':<8}  {'status':<9}  {'stage':<9}  {'node':<12}  retries  "
          "grid")
    for row in rows:
        print(f"{row['job_id']}  {row['state']:<8}  {row['status'] or '-':<9}  "
              f"{row['stage'] or '-':<9}  {(row['node'] or '-')[:12]:<12}  {row['retries']:>7}  "
              f"{row['label']}" + (f"  error: {row['error']}" if row.get("error") else "")
              + (f"  [{row['progress']}]" if row.get("progress") and row["state"] == "running"
                 else ""))


@app.command()
def slurm(
    spec: SpecPath,
    nodes: Annotated[int, typer.Option("--nodes", help="Ray nodes (one Slurm task each)")] = 2,
    cpus_per_node: Annotated[int, typer.Option("--cpus-per-node")] = 4,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node")] = 0,
    ray_nodes_per_host: Annotated[int, typer.Option(
        "--ray-nodes-per-host", help="Ray nodes that share one Slurm node")] = 1,
    partition: Annotated[str | None, typer.Option("--partition")] = None,
    time_limit: Annotated[str, typer.Option("--time", help="Slurm time limit")] = "01:00:00",
    account: Annotated[str | None, typer.Option("--account")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", help="write the script here (default: stdout)")] = None,
    submit: Annotated[bool, typer.Option(
        "--submit", help="hand the script to sbatch and print the job id")] = False,
) -> None:
    """Write an sbatch script that starts a Ray cluster in the allocation and runs the campaign
    on it (resume is automatic: submitting it again continues the campaign)."""
    from campaign.slurm import SlurmOptions, render_script
    from campaign.slurm import submit as sbatch

    plan = _plan(spec)
    options = SlurmOptions(nodes=nodes, cpus_per_node=cpus_per_node,
                           gpus_per_node=gpus_per_node, ray_nodes_per_host=ray_nodes_per_host,
                           partition=partition, time=time_limit, account=account)
    try:
        script = render_script(spec.resolve(), plan.spec.name, options, Path.cwd())
        from campaign.launcher import check_resources

        check_resources(plan, [{"CPU": float(cpus_per_node), "GPU": float(gpus_per_node)}]
                        * nodes, f"the allocation ({nodes} x {cpus_per_node} CPUs, "
                        f"{gpus_per_node} GPUs)")
        if submit and output is None:
            raise SpecError("--submit", detail="needs --output FILE: sbatch submits a file")
    except SpecError as error:
        _fail_input(error)
    if output is None:
        print(script, end="")
        return
    output.write_text(script)
    output.chmod(0o755)
    print(f"wrote {output}", file=sys.stderr)
    if submit:
        try:
            job_id = sbatch(output)
        except SpecError as error:
            _fail_input(error)
        except RuntimeError as error:
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(1) from None
        print(job_id)


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
    rows = [[r["job_id"], r["status"], _system_cell(r["params"]),
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
    widths = [len(name) for _, name in columns]
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
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
        table.add_row(*cells)
    # Wide enough that no cell is cut (a cut value reads as another number).
    Console(width=max(280, Console().width, sum(widths) + 3 * len(widths) + 1)).print(table)


# Metrics the table shows (each with its ``_err`` in the same cell); an estimator's own name
# (delta_f_lfep, delta_f_mbar) replaces the generic one where a job records both.
TABLE_COLUMNS = ("atoms", "delta_f", "reference_delta_f", "delta_f_lfep", "delta_f_lbar",
                 "delta_f_mbar", "delta_f_lfep_per_molecule", "delta_f_lbar_per_molecule",
                 "delta_f_mbar_per_molecule", "delta_f_phi", "delta_f_phi_md",
                 "md_transitions_phi", "ess", "valid_fraction", "ess_backward", "nll",
                 "energy_w2", "energy_w2_capped", "distance_w1", "nfe", "path_length",
                 "seconds_per_sample", "mode_weight_error", "mode_weight_error_reweighted",
                 "tempering_beta_reached", "tempering_levels",
                 "rdf_O_O_max_z", "rdf_O_H_max_z", "md_ns", "md_seconds_all_rungs", "time_train",
                 "time_train_cpu_seconds", "energy_evaluations")
SHORT_NAMES = {"delta_f_phi": "dF_phi", "reference_delta_f": "ref_delta_f", "_per_molecule": "/mol",
               "delta_f_": "", "energy_evaluations": "n_energy", "target_temperature_k": "T (K)",
               "base_temperature_k": "T_base (K)", "molecules": "N", "rdf_": "g ",
               "_max_z": " z", "md_transitions_phi": "phi flips", "valid_fraction": "valid",
               "md_ns": "MD ns", "seconds_per_sample": "s/sample", "path_length": "path",
               "distance_w1": "dist_W1", "energy_w2_capped": "E_W2cap", "energy_w2": "E_W2",
               "mode_weight_error_reweighted": "mode_err_rw", "mode_weight_error": "mode_err",
               "tempering_beta_reached": "beta_end", "tempering_levels": "levels",
               "time_train_cpu_seconds": "train_cpu_s", "md_seconds_all_rungs": "md_s"}


def _system_cell(params: dict[str, Any]) -> str:
    """The system's kind and its categorical settings: ``peptide/ACE-ALA-NME/amber14-obc1``,
    ``ice_xi/XI``, ``double_well``."""
    choices = [str(v) for k, v in params.items()
               if k.startswith("system.") and k != "system.kind" and isinstance(v, str)]
    return "/".join([str(params.get("system.kind", "")), *choices])


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
    decimal place (e.g. -669.47 ± 0.12, -41.8416 ± 0.0074); an exact value (error 0) to 6
    significant digits (-4.74037 ± 0)."""
    if math.isfinite(value) and error == 0:
        return f"{value:.6g} ± 0"
    if not (math.isfinite(value) and math.isfinite(error)) or error <= 0:
        return f"{_fmt(value)} ± {_fmt(error)}"
    decimals = max(0, 1 - math.floor(math.log10(error)))
    return f"{value:.{decimals}f} ± {error:.{decimals}f}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for the summary alone (``--format json`` must parse): while the campaign
    runs, whatever Ray or a library prints to stdout, from Python or C++, goes to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _print_plan(plan: Any, fmt: LaunchFormat) -> None:
    from boltzgen.pipeline import job_graph

    work_dir = str(plan.spec.work_path())
    graphs = {job.job_id: job_graph(job.config_dict, job.job_id, work_dir,
                                    plan.spec.fault_tolerance.checkpoint_every)
              for job in plan.jobs}
    needed_by: dict[str, list[str]] = {}
    for job_id, graph in graphs.items():
        for task in graph.tasks:
            needed_by.setdefault(task.key, []).append(job_id)
    if fmt == LaunchFormat.json:
        records = plan.as_records()
        for record in records:
            record["tasks"] = [{"key": t.key, "role": t.role, "stage": t.stage,
                                "label": t.label, "jobs": needed_by[t.key]}
                               for t in graphs[record["job_id"]].tasks]
        print(json.dumps(records, indent=2))
        return
    shared = {key: jobs for key, jobs in needed_by.items() if len(jobs) > 1}
    n_tasks = len(needed_by)
    print(f"campaign {plan.spec.name}: {len(plan.jobs)} jobs, {n_tasks} distinct tasks "
          f"({len(shared)} shared by several jobs; dry run: nothing started)")
    for role, res in plan.resources.items():
        print(f"  {role:<17} {res['count']} x (cpus={res['cpus']:g}, gpus={res['gpus']:g})")
    for job in plan.jobs:
        print(f"  {job.job_id}  {job.label}")
        for stage, ask in plan.job_resources(job).items():
            where = f", OpenMM on {ask['openmm_platform']}" if ask["openmm_platform"] else ""
            print(f"      {stage:<9} {ask['role']:<17} cpus={ask['cpus']:g} "
                  f"gpus={ask['gpus']:g}{where}")
    if shared:
        print("  shared tasks (each runs once; task: the jobs that need it):")
        tasks = {t.key: t for graph in graphs.values() for t in graph.tasks}
        for key, jobs in shared.items():
            print(f"    {tasks[key].label or tasks[key].stage:<12} {key[:24]:<24} "
                  f"{tasks[key].role:<17} {', '.join(j[:12] for j in jobs)}")


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
