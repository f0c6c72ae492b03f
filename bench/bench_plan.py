"""Planning speed: jobs planned per second by ``make_plan`` at 10^4 jobs, against a baseline.

What is measured: ``make_plan(parse_spec(spec))`` (what ``campaign validate`` and ``campaign
launch`` do before anything else) on a spec built in memory from specs/quickstart.yaml with a
grid of ``--jobs`` distinct jobs (default 10 000) in two blocks, shaped like a user's campaign
(few systems and flows, many temperatures and training settings):

- double well: 10 temperatures x 10 learning rates x 5 flows (spline and affine coupling of
  several sizes) x ``n`` sample counts;
- DW4 with a thermodynamic base at 1.5, trained by reverse KL: 10 temperatures x 10 learning
  rates x 5 flow widths x ``n`` sample counts;

with ``n = jobs / 1000`` (``--jobs`` must be a multiple of 1000).

Two ways of planning the same spec, in the same run:

- ``cached``: ``make_plan`` as the commands run it, which validates and encodes each distinct
  value of a job section once per grid block and builds each distinct system and each
  distinct (system, flow) once;
- ``baseline``: ``make_plan(..., cache=False)``, which resolves, validates and encodes every
  job whole and builds its system and a torch flow module, as planning did before the caches
  (less a deep copy of the defaults per job, a few percent of it).

Both plans must have the same job ids in the same order (checked). ``cached`` is the median of
``--repeats`` runs (default 3); the baseline, tens of times longer, runs once. Also timed:
the refusal of a grid of 10 values on each of 7 axes (10^7 points, beyond the default
``max_jobs`` of 100 000), which is counted instead of expanded.

Why a ratio: the benchmark machines are shared and noisy, so absolute jobs/s move from run to
run; cached / baseline, both measured in the same run, is the number to compare across runs
and machines. Results are printed and written to ``bench/results/bench_plan.json``. Run:

    .venv/bin/python bench/bench_plan.py [--jobs 10000] [--repeats 3] [--out PATH]

About 30 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from campaign.errors import SpecError  # noqa: E402
from campaign.plan import Plan, make_plan  # noqa: E402
from campaign.spec import parse_spec  # noqa: E402


def bench_spec(n_jobs: int) -> dict[str, Any]:
    """The quickstart spec with a two-block grid of ``n_jobs`` distinct jobs (see above)."""
    if n_jobs < 1000 or n_jobs % 1000:
        raise SystemExit(f"--jobs: {n_jobs} is not allowed; give a multiple of 1000")
    data = yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text())
    data["name"] = "bench-plan"
    data["tracking"] = {"experiment": "bench-plan"}
    samples = [1000 * (i + 1) for i in range(n_jobs // 1000)]  # each block: 500 x as many
    temperatures = [round(1.05 + 0.1 * i, 2) for i in range(10)]  # never the base's 1.5
    learning_rates = [round(0.0005 * (i + 1), 4) for i in range(10)]
    flows = [{"kind": "spline_coupling", "n_layers": n, "hidden": 32} for n in (2, 4, 6)]
    flows += [{"kind": "affine_coupling", "n_layers": n, "hidden": 32} for n in (4, 8)]
    data["grid"] = [
        {"temperature": temperatures, "training.learning_rate": learning_rates, "flow": flows,
         "sampling.n_samples": samples},
        {"system": {"kind": "dw4"}, "base": {"kind": "thermodynamic", "temperature": 1.5},
         "temperature": temperatures, "training.learning_rate": learning_rates,
         "flow.hidden": [16, 32, 48, 64, 96], "training.objective": "reverse_kl",
         "sampling.n_samples": samples},
    ]
    return data


def huge_spec() -> dict[str, Any]:
    """10 values on each of 7 axes of the quickstart's double well: 10^7 grid points."""
    data = yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text())
    data["grid"] = {path: [step * (i + 1) for i in range(10)] for path, step in [
        ("temperature", 0.5), ("training.learning_rate", 0.001), ("training.steps", 10),
        ("training.batch_size", 16), ("sampling.n_samples", 100),
        ("sampling.energy_batch_size", 10), ("reference.n_chains", 8)]}
    return data


def timed_plan(data: dict[str, Any], cache: bool) -> tuple[Plan, float]:
    """Parse and plan a fresh copy of ``data``; the plan and its wall-clock seconds."""
    data = copy.deepcopy(data)
    start = time.perf_counter()
    plan = make_plan(parse_spec(data), cache=cache)
    return plan, time.perf_counter() - start


def refusal_seconds(data: dict[str, Any]) -> tuple[float, str]:
    """Seconds until ``make_plan`` refuses ``data`` (which must be refused), and the message."""
    start = time.perf_counter()
    try:
        make_plan(parse_spec(copy.deepcopy(data)))
    except SpecError as err:
        return time.perf_counter() - start, str(err)
    raise SystemExit("the 10^7-point grid was planned instead of refused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the cached planning")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_plan.json")
    args = parser.parse_args()
    data = bench_spec(args.jobs)
    timed_plan(bench_spec(1000), cache=True)  # warm-up: imports, first torch modules
    cached_runs = [timed_plan(data, cache=True) for _ in range(args.repeats)]
    baseline, baseline_s = timed_plan(data, cache=False)
    cached = cached_runs[0][0]
    ids = [job.job_id for job in cached.jobs]
    if len(ids) != args.jobs or ids != [job.job_id for job in baseline.jobs]:
        raise SystemExit("the cached and the baseline plans differ")
    cached_s = statistics.median(seconds for _, seconds in cached_runs)
    refuse_s, refusal = refusal_seconds(huge_spec())
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                    platform.machine(), "python": platform.python_version()},
        "jobs": len(ids),
        "cached_s": [seconds for _, seconds in cached_runs],
        "cached_jobs_per_s": len(ids) / cached_s,
        "baseline_s": baseline_s,
        "baseline_jobs_per_s": len(ids) / baseline_s,
        "ratio": baseline_s / cached_s,
        "refuse_1e7_grid_s": refuse_s,
        "refusal": refusal,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"make_plan on {len(ids)} jobs ({os.cpu_count()} CPUs):")
    print(f"  cached    {result['cached_jobs_per_s']:10.0f} jobs/s  "
          f"(median of {args.repeats}: {cached_s:.2f} s)")
    print(f"  baseline  {result['baseline_jobs_per_s']:10.0f} jobs/s  "
          f"({baseline_s:.2f} s; every job validated whole, its system and flow built)")
    print(f"  ratio cached / baseline: {result['ratio']:.1f}x (same job ids, same order)")
    print(f"refusing a 10^7-point grid: {refuse_s * 1000:.1f} ms ({refusal})")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
