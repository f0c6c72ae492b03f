"""Campaign on local Ray versus the same jobs one after another in one plain Python process.

Runs 8 quickstart-size jobs (4 double-well and 4 DW4 temperatures, the quickstart's settings)
twice in one invocation: through ``campaign`` on a local Ray instance (actor pools as in
specs/quickstart.yaml) with a temporary SQLite MLflow store, then sequentially with the same
task graphs in this process (``pipeline.run_job``; 1 torch thread, the fastest setting for
these tiny flows on a small machine; no MLflow). Prints the speedup and the per-job orchestration
overhead.

Overhead of a job = Σ over its tasks of (actor start − submit) + (result seen − actor end): the
seconds in which the actor that runs the job's next stage was ready but not working on it.
The driver's recording (MLflow writes; estimates and plots run in a sampler actor) is reported
separately. The sequential baseline also computes the estimates and writes the same PNGs.

    python bench/bench_campaign.py [--jobs 8] [--steps N] [--out bench/results/campaign.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from boltzgen import pipeline  # noqa: E402
from campaign.launcher import launch_plan  # noqa: E402
from campaign.plan import make_plan  # noqa: E402
from campaign.spec import parse_spec  # noqa: E402


def bench_spec(n_jobs: int, steps: int | None) -> dict:
    data = yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text())
    data["name"] = "bench"
    data["tracking"] = {"experiment": "bench"}
    half = n_jobs // 2
    dw_temps = [round(1.0 + 0.25 * i, 3) for i in range(n_jobs - half)]
    dw4_temps = [round(t, 3) for t in (1.0 + 0.2 * i for i in range(half + 1)) if t != 1.5][:half]
    data["grid"][0]["temperature"] = dw_temps
    data["grid"][1]["temperature"] = dw4_temps
    if steps is not None:
        data["training"]["steps"] = steps
    return data


def run_campaign(data: dict, workdir: Path) -> dict:
    os.chdir(workdir)
    plan = make_plan(parse_spec(data))
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    start = time.perf_counter()
    summary = launch_plan(plan, workdir / "bench.yaml", address=None, tracking_uri=uri,
                          show_progress=False)
    wall = time.perf_counter() - start
    if summary.failed:
        raise SystemExit(f"campaign jobs failed: {[r.error for r in summary.failed]}")
    runs = summary.finished
    first_submit = min(t.submitted for r in runs for t in r.tasks)
    last_seen = max(t.seen for r in runs for t in r.tasks)
    busy: dict[str, float] = {}
    for run in runs:
        for task in run.tasks:
            busy[task.stage] = busy.get(task.stage, 0.0) + (task.end - task.start)
    return {
        "busy_s_by_stage": busy,
        "wall_s": wall,
        "jobs_phase_s": last_seen - first_submit,
        "overhead_per_job_s": [r.orchestration_overhead for r in runs],
        "record_per_job_s": [r.record_seconds for r in runs],
        "n_jobs": len(runs),
    }


def run_sequential(data: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    plan = make_plan(parse_spec(data))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for job in plan.jobs:  # each job's task graph, in this process (estimates, PNGs too)
            pipeline.run_job(pipeline.job_graph(job.config_dict, job.job_id, work))
    return {"wall_s": time.perf_counter() - start, "n_jobs": len(plan.jobs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="training steps per job")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "campaign.json")
    args = parser.parse_args()
    data = bench_spec(args.jobs, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "bench.yaml").write_text(yaml.safe_dump(data))
        campaign = run_campaign(data, workdir)
        os.chdir(ROOT)
    sequential = run_sequential(data)
    overhead = campaign["overhead_per_job_s"]
    record = campaign["record_per_job_s"]
    result = {
        "machine_cpus": os.cpu_count(),
        "campaign": campaign,
        "sequential": sequential,
        "speedup_including_ray_startup": sequential["wall_s"] / campaign["wall_s"],
        "speedup_jobs_phase": sequential["wall_s"] / campaign["jobs_phase_s"],
        "overhead_per_job_mean_s": statistics.mean(overhead),
        "overhead_per_job_max_s": max(overhead),
        "record_per_job_mean_s": statistics.mean(record),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{campaign['n_jobs']} jobs on {os.cpu_count()} CPUs")
    print(f"sequential, one process:           {sequential['wall_s']:8.1f} s")
    print(f"campaign on local Ray (wall):      {campaign['wall_s']:8.1f} s "
          f"(of which Ray + actor start-up {campaign['wall_s'] - campaign['jobs_phase_s']:.1f} s)")
    print(f"campaign jobs phase:               {campaign['jobs_phase_s']:8.1f} s")
    print(f"speedup incl. Ray start-up:        {result['speedup_including_ray_startup']:8.2f} x")
    print(f"speedup of the jobs phase:         {result['speedup_jobs_phase']:8.2f} x")
    print(f"orchestration overhead per job:    mean {result['overhead_per_job_mean_s']:.3f} s, "
          f"max {result['overhead_per_job_max_s']:.3f} s")
    print(f"driver recording per job (MLflow writes): "
          f"mean {result['record_per_job_mean_s']:.2f} s")
    phase = campaign["jobs_phase_s"]
    print("actor busy s by stage (fraction of jobs phase x CPUs): " + ", ".join(
        f"{stage} {sec:.0f} ({sec / (phase * (os.cpu_count() or 1)):.0%})"
        for stage, sec in campaign["busy_s_by_stage"].items()))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
