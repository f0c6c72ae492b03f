"""Ice XI benchmarks: (a) energy-pool throughput, (b) training speed, (c) the cost of ΔF.

(a) ``energy``: U and forces of a batch (``--batch``, default 1024) of perturbed ice XI
    configurations (N16 and N128 by default), by a pool of ``--pool`` EnergyEvaluator Ray
    actors (default: one per CPU, 1 OpenMM CPU thread each, the batch split evenly, as the
    campaign's trainer does) against one OpenMM Context (1 thread) looping over the same
    batch in this process. Reported: configurations/s of each and the speedup pool / single
    (goal: >= 0.9 x the pool size). Ray start-up and Context creation are not timed (one
    warm-up batch first); the median of ``--repeats`` batches is reported.

(b) ``training``: reverse-KL (LFEP) steps of the specs/ice.yaml flow on configurations near
    the crystal, batch ``--train-batch``, 1 torch thread, energies by one OpenMM Context in
    this process. Reported: steps/s and the fraction of a step spent in OpenMM (energy plus
    forces) against the flow (forward, log-det and backward) and the rest.

(c) ``cost``: from a finished ``campaign launch specs/ice.yaml`` (read through MLflow):
    CPU-seconds LFEP spent (the shared base MD run + training + the energy stage) against the
    CPU-seconds of the MBAR ladder's MD (every rung), per job, with whether LFEP is within
    0.01 kT per molecule of MBAR. Every actor runs 1 thread, so its wall seconds are its
    CPU-seconds. Goal: LFEP at most a third of the ladder's cost.

Ratios, not absolute speeds, are the numbers to compare across machines (they are noisy).
Results go to bench/results/bench_ice_<part>.json. Run:

    .venv/bin/python bench/bench_ice.py energy [--sizes 16 128] [--batch 1024] [--pool 2]
    .venv/bin/python bench/bench_ice.py training [--sizes 16 128] [--steps 5]
    .venv/bin/python bench/bench_ice.py cost specs/ice.yaml [--tracking-uri sqlite:///mlflow.db]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def perturbed_crystals(system, n: int, seed: int, scale_nm: float = 0.01) -> np.ndarray:
    """``n`` flow coordinates near the ideal crystal: oxygens moved by N(0, scale²) nm and
    quaternions by N(0, (2 scale)²) before normalization (molecule 0 stays at the origin)."""
    import torch

    layout = system.rigid_layout()
    g = torch.Generator().manual_seed(seed)
    positions, q = layout.split(torch.as_tensor(system.ideal_coordinates()).repeat(n, 1))
    positions = system.box.wrap(positions + scale_nm * torch.randn(
        positions.shape, generator=g, dtype=torch.float64))
    positions[:, 0] = 0.0
    q = q + 2 * scale_nm * torch.randn(q.shape, generator=g, dtype=torch.float64)
    return layout.join(positions, q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)).numpy()


def bench_energy(args: argparse.Namespace) -> dict:
    import ray

    from actors import make_actor
    from actors.roles import PooledEnergy
    from boltzgen.pipeline import make_energy_function
    from boltzgen.systems import make_system

    # One thread for the in-process baseline as for the actors: OpenMM's CPU PME ignores the
    # Context's Threads property and would use every core here, not one.
    os.environ["OPENMM_CPU_THREADS"] = "1"
    pool_size = args.pool or os.cpu_count() or 1
    ray.init(num_cpus=pool_size, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        actors = [make_actor("energy_evaluator", 1.0, 0.0) for _ in range(pool_size)]
        ray.get([a.ready.remote() for a in actors])
        for molecules in args.sizes:
            config = {"system": {"kind": "ice_xi", "molecules": molecules},
                      "energy": {"backend": "openmm", "platform": "CPU"}}
            system = make_system(config["system"])
            x = perturbed_crystals(system, args.batch, seed=molecules)
            single = make_energy_function(config, threads=1)
            pool = PooledEnergy(config, actors)
            timings = {}
            for name, fn in (("single", single), ("pool", pool)):
                fn(x)  # warm-up: Context creation
                seconds = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    u, _ = fn(x)
                    seconds.append(time.perf_counter() - start)
                timings[name] = statistics.median(seconds)
            row = {"molecules": molecules, "batch": args.batch, "pool_size": pool_size,
                   "single_configs_per_s": args.batch / timings["single"],
                   "pool_configs_per_s": args.batch / timings["pool"],
                   "speedup": timings["single"] / timings["pool"],
                   "goal_speedup": 0.9 * pool_size}
            rows.append(row)
            print(f"N{molecules:<4d} single {row['single_configs_per_s']:9.1f} conf/s   pool of "
                  f"{pool_size} {row['pool_configs_per_s']:9.1f} conf/s   speedup "
                  f"{row['speedup']:.2f} (goal >= {row['goal_speedup']:.2f})", flush=True)
    finally:
        ray.shutdown()
    return {"part": "energy", "rows": rows, "cpus": os.cpu_count()}


def bench_training(args: argparse.Namespace) -> dict:
    import torch
    import yaml

    from boltzgen.flows import build_flow
    from boltzgen.objectives import reverse_kl_loss
    from boltzgen.systems import make_system

    torch.set_num_threads(1)
    spec = yaml.safe_load((ROOT / "specs" / "ice.yaml").read_text())
    rows = []
    for molecules in args.sizes:
        system = make_system({"kind": "ice_xi", "molecules": molecules})
        flow = build_flow(system.layout(), spec["flow"])
        x = torch.as_tensor(perturbed_crystals(system, 256, seed=molecules))
        flow.fit_thermal_scaling(x, (100.0 / 250.0) ** 0.5)
        optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4)
        kt = system.boltzmann_constant * 100.0
        energy_seconds = [0.0]

        def u_b(y: torch.Tensor, system=system, kt=kt, energy_seconds=energy_seconds
                ) -> torch.Tensor:
            start = time.perf_counter()
            u = system.potential(y) / kt
            energy_seconds[0] += time.perf_counter() - start
            return u

        def u_a(z: torch.Tensor) -> torch.Tensor:
            return z.new_zeros(len(z))

        generator = torch.Generator().manual_seed(0)
        steps = []
        for step in range(args.steps + 1):  # the first step (Context creation) is not counted
            batch = x[torch.randint(len(x), (args.train_batch,), generator=generator)]
            energy_seconds[0] = 0.0
            start = time.perf_counter()
            loss = reverse_kl_loss(flow, batch, u_a, u_b)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step:
                steps.append((time.perf_counter() - start, energy_seconds[0]))
        total = sum(s for s, _ in steps)
        energy = sum(e for _, e in steps)
        # OpenMMPotential's backward only multiplies stored forces: the energy time is all in
        # the forward call, which is timed above.
        row = {"molecules": molecules, "batch": args.train_batch, "steps": args.steps,
               "steps_per_s": args.steps / total, "seconds_per_step": total / args.steps,
               "energy_fraction": energy / total, "flow_and_rest_fraction": 1 - energy / total}
        rows.append(row)
        print(f"N{molecules:<4d} batch {args.train_batch}: {row['steps_per_s']:.3f} steps/s "
              f"({row['seconds_per_step']:.3f} s/step); OpenMM {100 * row['energy_fraction']:.0f} %"
              f", flow and the rest {100 * row['flow_and_rest_fraction']:.0f} %", flush=True)
    return {"part": "training", "rows": rows, "threads": 1}


def bench_cost(args: argparse.Namespace) -> dict:
    from campaign.plan import make_plan
    from campaign.report import comparison_records
    from campaign.spec import load_spec

    plan = make_plan(load_spec(args.spec))
    rows = []
    for record in comparison_records(plan, args.tracking_uri):
        m = record["metrics"]
        if record["status"] != "FINISHED":
            print(f"{record['job_id']}: {record['status']}, skipped")
            continue
        ladder = m["md_seconds_all_rungs"]
        base = m["md_seconds_base"]
        lfep = base + m["time_train"] + m["time_sample"] + m["time_energy"]
        per_molecule_gap = abs(m["delta_f_lfep_per_molecule"] - m["delta_f_mbar_per_molecule"])
        row = {"job_id": record["job_id"], "target_temperature_k": record["params"].get(
                   "target_temperature_k"),
               "ladder_md_cpu_s": ladder, "lfep_cpu_s": lfep, "lfep_base_md_cpu_s": base,
               "lfep_training_cpu_s": m["time_train"],
               "ratio_lfep_to_ladder": lfep / ladder,
               "lfep_minus_mbar_per_molecule_kt": per_molecule_gap,
               "lfep_within_0p01_per_molecule": per_molecule_gap <= 0.01,
               "mbar_err_per_molecule_kt": m["delta_f_mbar_per_molecule_err"]}
        rows.append(row)
        print(f"T = {row['target_temperature_k']} K: ladder MD {ladder:8.0f} CPU-s, LFEP "
              f"{lfep:8.0f} CPU-s (base MD {base:.0f} + training {m['time_train']:.0f} + "
              f"sampling/energies), ratio {row['ratio_lfep_to_ladder']:.2f} (goal <= 0.33); "
              f"|LFEP - MBAR| = {per_molecule_gap:.4f} kT/molecule "
              f"(MBAR +- {row['mbar_err_per_molecule_kt']:.4f})", flush=True)
    return {"part": "cost", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts = parser.add_subparsers(dest="part", required=True)
    energy = parts.add_parser("energy")
    energy.add_argument("--sizes", type=int, nargs="+", default=[16, 128])
    energy.add_argument("--batch", type=int, default=1024)
    energy.add_argument("--pool", type=int, default=0, help="actors (default: CPUs)")
    energy.add_argument("--repeats", type=int, default=3)
    training = parts.add_parser("training")
    training.add_argument("--sizes", type=int, nargs="+", default=[16, 128])
    training.add_argument("--steps", type=int, default=5)
    training.add_argument("--train-batch", type=int, default=64)
    cost = parts.add_parser("cost")
    cost.add_argument("spec")
    cost.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    result = {"energy": bench_energy, "training": bench_training, "cost": bench_cost}[
        args.part](args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"bench_ice_{args.part}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
