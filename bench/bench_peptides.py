"""Peptides on the campaign's actor pools against one OpenMM Context in one process.

Both parts in one invocation (same machine load), on a local Ray instance with two pools of
``--cores`` actors of 1 CPU (1 OpenMM thread) each, "reference" (MD) and "energy_evaluator",
driven by the campaign's scheduler (``campaign.scheduler.Scheduler`` over
``campaign.backends.RayBackend``) with a temporary SQLite MLflow store. Ray gets 2 x cores
logical CPUs so that both pools stay up; only one of them works at a time. Ray's start, the
actors' start and their warm-up (imports, the peptide builds, the OpenMM Contexts of the energy
pool) are reported apart, never inside a measured window; the jobs' MLflow runs are opened
before it (as a real job's earlier stages would have). A pool's window runs from the first
task (or piece) submitted to the last result seen by the driver, so it holds the scheduler's
dispatch, Ray's transfers and the driver's MLflow writes during the run.

The speed of a small shared VM drifts (here it changed up to 8x within minutes), so the arms
are nested: single MD, single energy, MD pool, energy pool, energy pool, MD pool, single
energy, single MD (Ray runs only for the pools); ratios use both arms of each kind, and the
second arm's seconds over the first's are reported (a warning beyond 20 %).

(a) MD: alanine dipeptide (ACE-ALA-NME, amber99sbildn-obc, 300 K) and ACE-TRP-NME
    (amber14-obc1, 310 K), plain Langevin MD, 1 fs, friction 1/ps, no constraints (the
    MDProtocol defaults) with ``--md-ps`` ps of production and no equilibration. Each run is
    the real job graph's MD task (``boltzgen.pipeline.md_task:md_run_task``: build the system
    (cached per process after the warm-up), minimise, run, write the MD cache entry), with
    the protocol's seed shifted per run so that no two runs of a launch are one task, in
    fresh temporary work directories (no cache hits).
    Single arm: one run per peptide, the same task function called in this process (1
    thread) after a tiny untimed run that builds the peptide. Pool arm: ``--cores`` runs per
    peptide, all 2 x cores in one launch (one job per peptide; the alanine runs are queued
    first). ns/day = simulated ns / wall seconds (mean seconds of the two arms of a kind):
    per peptide, of its single runs and of its job's window in the pool; for the mixed set
    the pool's 2 x cores runs over its whole window against the time-weighted single
    Context, 2 L / (t_ALA + t_TRP). The mixed set's ratio is the headline; goal >= 0.9 x
    cores. Per pool run also the in-actor ns/day (task start to end): what running
    ``cores`` Contexts at once costs each of them.
(b) Energies: U and forces of ``--samples`` alanine-dipeptide conformations (the minimised
    structure plus N(0, 0.005 nm) per coordinate). Single arm: the job's energy function
    (one ``OpenMMEvaluator`` Context, 1 thread, in this process) on the whole batch. Pool arm:
    the real energy stage of the job graph (``energy_piece_task`` on pieces of
    ``--energy-batch`` rows, split and gathered by the job's own functions) on the energy
    pool, one launch per repeat; each piece computes U and forces in OpenMM and returns U.
    Also the energy function a trainer gets from the pool (``actors.PooledEnergy``: the batch
    split evenly over the actors, U and the gradient returned), called from this process.
    Conformations/s = batch / seconds, medians over both arms of a kind (``--repeats`` each);
    goal: pool / single >= 0.9 x cores.

Platform (``--platform``, every Context of both arms; default Reference, the platform
specs/peptides.yaml gives alanine dipeptide): on an otherwise idle machine OpenMM's CPU
platform in one process is slow for molecules this small (here 156 ns/day and 1,700
energies/s for alanine dipeptide against 3,450 and 33,500 on Reference, one thread): every
step hands work to a worker thread and waits for it, and on an idle core that wait is long.
Inside a busy pool it is not, so with CPU the pool/single ratio measures that wait as much as
parallelism (bench/results/peptides-cpu.json: 18x on 2 cores).

    python bench/bench_peptides.py [--md-ps 100] [--samples 10000] [--cores C] [--repeats 5]
        [--energy-batch 2500] [--platform Reference|CPU] [--out FILE]
        (default bench/results/peptides-<platform>.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from boltzgen.pipeline import job_graph  # noqa: E402
from boltzgen.pipeline.graph import JobGraph, JobOutcome, TaskContext, TaskSpec  # noqa: E402
from campaign.plan import Job, Plan, make_plan  # noqa: E402
from campaign.scheduler import LaunchSummary, Scheduler, TaskRecord  # noqa: E402
from campaign.spec import parse_spec  # noqa: E402

MODULE = __name__  # the driver resolves this module's outcome function by name
PEPTIDES = (("ACE-ALA-NME", "amber99sbildn-obc", 300.0), ("ACE-TRP-NME", "amber14-obc1", 310.0))
NOISE_NM = 0.005
SECONDS_PER_DAY = 86400.0


def bench_spec(md_ps: float, cores: int, energy_batch: int, work_dir: Path,
               platform: str) -> dict:
    """specs/peptides.yaml with plain MD of ``md_ps`` ps, one job per peptide, pools of
    ``cores`` actors of 1 CPU for the two roles measured, every Context on ``platform``."""
    data = yaml.safe_load((ROOT / "specs" / "peptides.yaml").read_text())
    data["name"] = "bench-peptides"
    data["work_dir"] = str(work_dir)
    data["reference"]["md"] = {"equilibration_ps": 0.0, "production_ps": md_ps}
    data["sampling"]["energy_batch_size"] = energy_batch
    data["energy"] = {**data.get("energy", {}), "platform": platform}
    data["resources"] = {role: {"count": cores, "cpus": 1.0}
                         for role in ("reference", "energy_evaluator")}
    data["grid"] = [{"system": {"kind": "peptide", "sequence": sequence, "force_field": ff},
                     "temperature": temperature} for sequence, ff, temperature in PEPTIDES]
    return data


def sequence_of(job: Job) -> str:
    return job.config_dict["system"]["sequence"]


def md_tasks(job: Job, work_dir: Path, runs: int, production_ps: float | None = None
             ) -> list[TaskSpec]:
    """The job graph's MD task ``runs`` times, with seeds shifted by 0 .. runs - 1 (and
    ``production_ps`` instead of the spec's, if given), each keyed by its MD cache key."""
    from boltzgen.md import cache_key
    from boltzgen.systems import make_system

    graph = job_graph(job.config_dict, job.job_id, str(work_dir))
    (task,) = [t for t in graph.tasks if t.function.endswith(":md_run_task")]
    system = make_system(task.args["system"])
    protocol = task.args["protocol"]
    if production_ps is not None:
        protocol = dataclasses.replace(protocol, production_ps=production_ps)
    out = []
    for k in range(runs):
        seeded = dataclasses.replace(protocol, seed=protocol.seed + k)
        out.append(dataclasses.replace(task, key=f"md-{cache_key(system, seeded)}",
                                       args={**task.args, "protocol": seeded},
                                       label=f"{task.label} seed +{k}"))
    return out


def energy_task(job: Job, work_dir: Path, x: np.ndarray) -> TaskSpec:
    """The job graph's energy stage with ``x`` as the mapped samples it evaluates."""
    from boltzgen.pipeline.sampling import SampleSet

    task = next(t for t in job_graph(job.config_dict, job.job_id, str(work_dir)).tasks
                if t.stage == "energy")
    n, empty = len(x), np.zeros(0)
    # An analytic base (u_a_pulled_back given): the stage evaluates the mapped samples only.
    samples = SampleSet(u_a=np.zeros(n), mapped=x, logdet=np.zeros(n),
                        pulled_back=np.zeros((0, x.shape[1])), logdet_inverse=empty,
                        u_a_pulled_back=empty, seconds=0.0)
    return dataclasses.replace(task, args={**task.args, "samples": samples}, inputs={})


def recorded_nothing() -> JobOutcome:
    """A bench job's outcome: its timings are all it records."""
    return JobOutcome(metrics={}, params={})


class GraphScheduler(Scheduler):
    """The campaign's scheduler over given task graphs (job id -> graph); each job's MLflow
    run is opened before its tasks are queued."""

    def __init__(self, plan: Plan, backend: Any, graphs: dict[str, JobGraph]) -> None:
        super().__init__(plan, backend)
        self.graphs = graphs

    def graph(self, job: Job) -> JobGraph:
        return self.graphs[job.job_id]

    def _add_jobs(self, runs: list) -> None:
        for run in runs:
            self.recorder.open_job(run)
        super()._add_jobs(runs)


def launch(plan: Plan, backend: Any, tasks: dict[str, list[TaskSpec]], uri: str,
           experiment: str) -> tuple[LaunchSummary, GraphScheduler, dict[str, float]]:
    """Run the graphs' tasks (job id -> tasks) through the scheduler; also the launch's wall
    seconds and the CPU seconds this driver process spent in it (MLflow writes included)."""
    from campaign.recorder import Recorder
    from campaign.tracking import Tracker

    graphs = {job_id: JobGraph(tasks=tuple(specs), outcome=f"{MODULE}:recorded_nothing",
                               outcome_inputs={}) for job_id, specs in tasks.items()}
    tracker = Tracker(uri, experiment)
    tracker.experiment_id(create=True)
    scheduler = GraphScheduler(dataclasses.replace(plan, jobs=[j for j in plan.jobs
                                                               if j.job_id in tasks]),
                               backend, graphs)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = scheduler.run(Recorder(tracker, scheduler.plan, {
        "campaign": plan.spec.name, "driver_host": socket.gethostname(),
        "driver_pid": str(os.getpid())}))
    if summary.failed:
        raise SystemExit(f"bench jobs failed: {[r.error for r in summary.failed]}")
    return summary, scheduler, {"launch_wall_s": time.perf_counter() - wall,
                                "driver_cpu_s": time.process_time() - cpu}


def window(records: list[TaskRecord]) -> float:
    """Seconds from the first task submitted to the last result seen."""
    return max(r.seen for r in records) - min(r.submitted for r in records)


def overhead(records: list[TaskRecord], cores: int) -> dict[str, float]:
    """Orchestration seconds per task and the actors' busy share of the window."""
    return {"orchestration_s_per_task": statistics.mean(r.overhead for r in records),
            "actor_busy_fraction": sum(r.end - r.start for r in records)
            / (window(records) * cores)}


def start_pools(plan: Plan, warm: dict[str, list[tuple[str, dict[str, Any]]]]
                ) -> tuple[Any, dict[str, float]]:
    """A RayBackend with the actors of the roles in ``warm``, started, each actor warmed by
    running every (function, args) of its role once; seconds to ready and to warm."""
    import ray

    from campaign.backends import RayBackend

    backend = RayBackend(dataclasses.replace(plan, resources={role: plan.resources[role]
                                                              for role in warm}))
    started = time.perf_counter()
    backend.start()
    ray.get([actor.ready.remote() for actors in backend.pools.values() for actor in actors])
    ready = time.perf_counter()
    for role, calls in warm.items():
        for function, args in calls:
            ray.get([actor.run_task.remote(function, args, {})
                     for actor in backend.pools[role]])
    return backend, {"actors_ready_s": ready - started, "warm_up_s": time.perf_counter() - ready}


def ns_per_day(ps: float, seconds: float) -> float:
    return ps * 1e-3 / seconds * SECONDS_PER_DAY


def md_single(plan: Plan, md_ps: float, work: Path) -> dict[str, dict[str, float]]:
    """One run per peptide of the MD task in this process, after a tiny untimed one."""
    from boltzgen.pipeline.graph import run_task_here

    ctx = TaskContext(threads=1)
    out = {}
    for job in plan.jobs:
        (tiny,) = md_tasks(job, work / "warm", 1, production_ps=0.5)
        run_task_here(ctx, tiny, {})
        (task,) = md_tasks(job, work, 1)
        started = time.perf_counter()
        run_md_s = run_task_here(ctx, task, {})
        wall = time.perf_counter() - started
        out[sequence_of(job)] = {"wall_s": wall, "run_md_s": run_md_s}
        print(f"single {sequence_of(job)}: {wall:.1f} s, {ns_per_day(md_ps, wall):.0f} ns/day",
              flush=True)
    return out


def md_pool(plan: Plan, backend: Any, md_ps: float, cores: int, work: Path, uri: str
            ) -> dict[str, Any]:
    """``cores`` runs per peptide, all in one launch on the reference pool."""
    tasks = {job.job_id: md_tasks(job, work, cores) for job in plan.jobs}
    summary, scheduler, driver = launch(plan, backend, tasks, uri, work.name)
    records = [t for run in summary.finished for t in run.tasks]
    per_peptide = {}
    for run in summary.finished:
        per_peptide[sequence_of(run.job)] = {
            "runs": len(run.tasks), "window_s": window(run.tasks),
            "in_actor_ns_per_day_per_run": [ns_per_day(md_ps, t.end - t.start)
                                            for t in run.tasks],
            "run_md_s_per_run": [backend.fetch(scheduler.states[t.key].stored)
                                 for t in run.tasks]}
    print(f"pool MD: {len(records)} runs in {window(records):.1f} s", flush=True)
    return {"window_s": window(records), "per_peptide": per_peptide,
            **overhead(records, cores), **driver,
            "driver_record_s": sum(run.record_seconds for run in summary.finished)}


def conformations(job: Job, n: int, seed: int = 0) -> np.ndarray:
    """``n`` flow coordinates: the minimised structure plus N(0, NOISE_NM²) per coordinate."""
    from boltzgen.systems import make_system

    x0 = make_system(job.config_dict["system"]).ideal_coordinates()
    return x0 + np.random.default_rng(seed).normal(0.0, NOISE_NM, (n, len(x0)))


def seconds_of(call: Callable[[], Any], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def energy_single(job: Job, x: np.ndarray, repeats: int) -> list[float]:
    """Seconds of the job's energy function (one Context, 1 thread) on all of ``x``, per
    repeat (the Context is built first, untimed)."""
    from boltzgen.pipeline.job import energy_function
    from boltzgen.settings import JobSettings

    energy = energy_function(TaskContext(threads=1), JobSettings.of(job.config_dict))
    energy(x[:2])
    seconds = seconds_of(lambda: energy(x), repeats)
    print(f"single energy: {len(x) / statistics.median(seconds):.0f} conformations/s",
          flush=True)
    return seconds


def energy_pool(plan: Plan, backend: Any, job: Job, x: np.ndarray, cores: int, repeats: int,
                work: Path, uri: str) -> dict[str, Any]:
    """``repeats`` launches of the energy stage, then ``repeats`` calls of the trainer's
    pooled energy function."""
    from actors import PooledEnergy
    from boltzgen.settings import JobSettings

    windows, per_launch = [], []
    for repeat in range(repeats):
        summary, _, driver = launch(plan, backend, {job.job_id: [energy_task(job, work, x)]},
                                    uri, f"{work.name}-{repeat}")
        records = summary.finished[0].tasks
        windows.append(window(records))
        per_launch.append({"pieces": len(records), **overhead(records, cores), **driver})
    pooled = PooledEnergy(JobSettings.of(job.config_dict), backend.pools["energy_evaluator"])
    trainer = seconds_of(lambda: pooled(x), repeats)
    print(f"pool energy: stage {len(x) / statistics.median(windows):.0f}, pooled function "
          f"{len(x) / statistics.median(trainer):.0f} conformations/s", flush=True)
    return {"window_s": windows, "launches": per_launch, "trainer_pooled_energy_s": trainer}


def run_bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Single arms, then the pools, then the single arms again, nested (MD, energy, MD
    pool, energy pool, energy pool, MD pool, energy, MD), so that a steady drift of the
    machine's speed cancels; Ray runs only for the pools."""
    import ray

    from boltzgen.settings import JobSettings

    plan = make_plan(parse_spec(bench_spec(args.md_ps, args.cores, args.energy_batch,
                                           tmp / "work", args.platform)))
    alanine = plan.jobs[0]
    x = conformations(alanine, args.samples)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    md_before = md_single(plan, args.md_ps, tmp / "single-0")
    energy_before = energy_single(alanine, x, args.repeats)
    # The actors import this checkout, not an installed copy of the project.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    started = time.perf_counter()
    # Both pools stay up (2 x cores logical CPUs); one works at a time, the other idles.
    ray.init(num_cpus=2 * args.cores, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    try:
        backend, start_up = start_pools(plan, {
            "reference": [(t.function, t.args) for job in plan.jobs
                          for t in md_tasks(job, tmp / "warm", 1, production_ps=0.5)],
            "energy_evaluator": [("boltzgen.pipeline.job:energy_piece_task", {
                "job": JobSettings.of(alanine.config_dict), "name": "warm", "x": x[:2]})]})
        md = [md_pool(plan, backend, args.md_ps, args.cores, tmp / "md-pool-0", uri)]
        energy = [energy_pool(plan, backend, alanine, x, args.cores, args.repeats,
                              tmp / f"energy-pool-{k}", uri) for k in range(2)]
        md.append(md_pool(plan, backend, args.md_ps, args.cores, tmp / "md-pool-1", uri))
    finally:
        ray.shutdown()
    energy_after = energy_single(alanine, x, args.repeats)
    md_after = md_single(plan, args.md_ps, tmp / "single-1")
    return {"machine_cpus": os.cpu_count(), "cores": args.cores, "platform": args.platform,
            "goal_ratio": 0.9 * args.cores,
            "ray_start_s": ray_start_s, "pools_start_up": start_up,
            "md": summarise_md(args, [md_before, md_after], md),
            "energy": summarise_energy(args, [energy_before, energy_after], energy)}


def summarise_md(args: argparse.Namespace, single: list[dict], pools: list[dict]
                 ) -> dict[str, Any]:
    """ns/day from the mean seconds of the two single arms and of the two pool launches."""
    ps, cores = args.md_ps, args.cores
    per_peptide = {}
    for sequence in single[0]:
        walls = [arm[sequence]["wall_s"] for arm in single]
        windows = [pool["per_peptide"][sequence]["window_s"] for pool in pools]
        row = {"single_ns_per_day": ns_per_day(ps, statistics.mean(walls)),
               "pool_ns_per_day": cores * ns_per_day(ps, statistics.mean(windows)),
               "single_drift": walls[1] / walls[0], "pool_drift": windows[1] / windows[0],
               "in_actor_ns_per_day_per_run": [
                   v for pool in pools
                   for v in pool["per_peptide"][sequence]["in_actor_ns_per_day_per_run"]]}
        row["ratio"] = row["pool_ns_per_day"] / row["single_ns_per_day"]
        per_peptide[sequence] = row
    singles = [sum(run["wall_s"] for run in arm.values()) for arm in single]
    windows = [pool["window_s"] for pool in pools]
    mixed_single = ns_per_day(ps * len(single[0]), statistics.mean(singles))
    mixed_pool = ns_per_day(ps * len(single[0]) * cores, statistics.mean(windows))
    return {"production_ps_per_run": ps, "timestep_fs": 1.0, "friction_per_ps": 1.0,
            "per_peptide": per_peptide,
            "mixed_single_ns_per_day_time_weighted": mixed_single,
            "mixed_pool_ns_per_day": mixed_pool, "ratio_mixed": mixed_pool / mixed_single,
            "goal_met": mixed_pool / mixed_single >= 0.9 * cores,
            "single_drift": singles[1] / singles[0], "pool_drift": windows[1] / windows[0],
            "single_arms": single, "pool_launches": pools}


def summarise_energy(args: argparse.Namespace, single: list[list[float]], pools: list[dict]
                     ) -> dict[str, Any]:
    """Conformations/s from the medians over both single arms and both pool blocks."""
    n, median = args.samples, statistics.median
    single_s = median(single[0] + single[1])
    stage_s = median([s for pool in pools for s in pool["window_s"]])
    trainer_s = median([s for pool in pools for s in pool["trainer_pooled_energy_s"]])
    return {"samples": n, "noise_nm": NOISE_NM, "energy_batch_size": args.energy_batch,
            "repeats_per_arm": args.repeats,
            "single_conformations_per_s": n / single_s,
            "pool_energy_stage_conformations_per_s": n / stage_s,
            "ratio_energy_stage": single_s / stage_s,
            "trainer_pooled_energy_conformations_per_s": n / trainer_s,
            "ratio_trainer_pooled_energy": single_s / trainer_s,
            "goal_met": single_s / stage_s >= 0.9 * args.cores,
            "single_drift": median(single[1]) / median(single[0]),
            "pool_drift": median(pools[1]["window_s"]) / median(pools[0]["window_s"]),
            "single_seconds": single, "pools": pools}


def report(result: dict[str, Any]) -> None:
    md, energy, goal = result["md"], result["energy"], result["goal_ratio"]
    start = result["pools_start_up"]
    print(f"\n{result['machine_cpus']} CPUs, pools of {result['cores']} actors x 1 CPU, OpenMM "
          f"platform {result.get('platform', 'CPU')}; load "
          f"average before: {' '.join(f'{v:.2f}' for v in result['load_average_before'])}; "
          f"Ray start {result['ray_start_s']:.1f} s, actors ready "
          f"{start['actors_ready_s']:.1f} s, warm-up {start['warm_up_s']:.1f} s (not timed)")
    print(f"(a) MD, {md['production_ps_per_run']:g} ps per run, single arms before and after "
          "the pools, two pool launches")
    print(f"{'':14}{'single ns/day':>14}{'pool ns/day':>13}{'ratio':>7}"
          f"{'in-actor ns/day per run':>30}")
    for sequence, row in md["per_peptide"].items():
        in_actor = ", ".join(f"{v:.0f}" for v in row["in_actor_ns_per_day_per_run"])
        print(f"{sequence:14}{row['single_ns_per_day']:14.0f}{row['pool_ns_per_day']:13.0f}"
              f"{row['ratio']:7.2f}{in_actor:>30}")
    pools = md["pool_launches"]
    print(f"{'mixed set':14}{md['mixed_single_ns_per_day_time_weighted']:14.0f}"
          f"{md['mixed_pool_ns_per_day']:13.0f}{md['ratio_mixed']:7.2f}   (goal >= {goal:.2f};"
          " single time-weighted)")
    print("pool launches: " + "; ".join(
        f"window {p['window_s']:.1f} s, actors busy {p['actor_busy_fraction']:.1%}, "
        f"orchestration {p['orchestration_s_per_task'] * 1e3:.0f} ms per task, driver "
        f"{p['driver_cpu_s']:.1f} CPU s" for p in pools))
    print(f"(b) U and forces of {energy['samples']} alanine-dipeptide conformations, medians "
          f"of 2 x {energy['repeats_per_arm']}")
    print(f"single Context:                {energy['single_conformations_per_s']:9.0f} conf/s")
    print(f"pool, energy stage ({energy['pools'][0]['launches'][0]['pieces']} pieces):    "
          f"{energy['pool_energy_stage_conformations_per_s']:9.0f} conf/s  ratio "
          f"{energy['ratio_energy_stage']:.2f} (goal >= {goal:.2f})")
    print(f"pool, trainer's PooledEnergy:  "
          f"{energy['trainer_pooled_energy_conformations_per_s']:9.0f} conf/s  ratio "
          f"{energy['ratio_trainer_pooled_energy']:.2f}")
    drifts = {"MD single": md["single_drift"], "MD pool": md["pool_drift"],
              "energy single": energy["single_drift"], "energy pool": energy["pool_drift"]}
    print("second / first arm, seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in drifts.items()))
    if any(not 0.8 < v < 1.25 for v in drifts.values()):
        print("WARNING: the machine's speed changed by more than 20 % between the arms; "
              "the ratios are not reliable")
    print(f"bench took {result['bench_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md-ps", type=float, default=100.0, help="production ps per MD run")
    parser.add_argument("--samples", type=int, default=10_000, help="conformations, part (b)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="actors per pool (1 CPU each)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="energy batches per arm (two arms of each kind)")
    parser.add_argument("--energy-batch", type=int, default=2500,
                        help="rows per energy piece (specs/peptides.yaml's energy_batch_size)")
    parser.add_argument("--platform", choices=("Reference", "CPU"), default="Reference",
                        help="OpenMM platform of every Context, both arms")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/peptides-<platform>.json")
    args = parser.parse_args()
    if args.out is None:
        args.out = ROOT / "bench" / "results" / f"peptides-{args.platform.lower()}.json"
    load = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_bench(args, Path(tmp))
    result["load_average_before"] = load
    result["bench_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
