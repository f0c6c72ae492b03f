"""Energy evaluations per second for data-free training of alanine dipeptide: the energy pool
against one OpenMM Context.

Data-free training (objective ``adaptive_tempering``, ``reverse_kl``) needs U and ∇U of every
configuration of every training batch, so on a CPU it is energy-bound. A trainer sends each
batch to the campaign's energy pool through ``actors.roles.PooledEnergy`` (the batch split
evenly over the EnergyEvaluator actors, the answers gathered in order); this bench times that
very function against the job's own energy function on one Context in this process (1 thread).

Setup: a local Ray instance with ``--cores`` EnergyEvaluator actors of 1 CPU each
(``actors.make_actor``, as the campaign makes them); the job is alanine dipeptide
(ACE-ALA-NME, amber99sbildn-obc, 300 K, ``energy.backend: openmm`` on ``--platform``);
batches of ``--batch`` conformations (the minimised structure plus N(0, 0.005 nm) per
coordinate, as a trained flow's samples are near it). Every arm is warmed up first (imports,
the Contexts), never inside a measured window. The arms are nested against the machine's drift:
single, pool, pool, single, each ``--repeats`` batches; the ratio uses the median of both arms
of each kind, and the second arm's seconds over the first's are reported.

Goal (the data-free issue): pool / single >= 0.9 x cores.

Third arm: the same force field re-implemented in PyTorch (``energy.backend:
torch_forcefield``, :mod:`boltzgen.forcefield_torch`; U and ∇U of the whole batch at once by
autograd, in this process) with ``--cores`` torch threads, as a trainer with that backend
computes its energies (no pool). Arms nested: single, pool, forcefield, forcefield, pool,
single.

    python bench/bench_datafree_energy.py [--cores 2] [--batch 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import numpy as np

NOISE_NM = 0.005


def job_settings(platform: str) -> Any:
    from boltzgen.settings import JobSettings

    return JobSettings.of({
        "seed": 0, "temperature": 300.0,
        "system": {"kind": "peptide", "sequence": "ACE-ALA-NME",
                   "force_field": "amber99sbildn-obc"},
        "flow": {"kind": "internal_coordinates"}, "reference": {"sampler": "none"},
        "training": {"objective": "reverse_kl"},
        "energy": {"backend": "openmm", "platform": platform}})


def conformations(job: Any, n: int, seed: int) -> np.ndarray:
    from boltzgen.systems import make_system

    x0 = make_system(job.dump["system"]).ideal_coordinates()
    return x0 + np.random.default_rng(seed).normal(0.0, NOISE_NM, (n, len(x0)))


def timed(call: Any, batches: list[np.ndarray]) -> list[float]:
    seconds = []
    for x in batches:
        started = time.perf_counter()
        u, grad = call(x)
        seconds.append(time.perf_counter() - started)
        assert np.isfinite(u).all() and grad.shape == x.shape
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--platform", default="Reference", choices=["CPU", "Reference"])
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()

    import ray

    from actors import make_actor
    from actors.roles import PooledEnergy
    from boltzgen.pipeline.graph import TaskContext
    from boltzgen.pipeline.job import energy_function

    job = job_settings(args.platform)
    batches = [conformations(job, args.batch, seed) for seed in range(args.repeats)]
    single = energy_function(TaskContext(threads=1), job)
    single(batches[0][:2])  # builds the Context (untimed)

    started = time.perf_counter()
    ray.init(num_cpus=args.cores, include_dashboard=False, logging_level=logging.ERROR)
    ray_start = time.perf_counter() - started
    actors = [make_actor("energy_evaluator", 1.0, 0.0, max_restarts=0)
              for _ in range(args.cores)]
    ray.get([actor.ready.remote() for actor in actors])
    pool = PooledEnergy(job, actors)
    # Untimed: every actor builds its Context, then one whole batch (the first full-size
    # calls of an actor ran ~1.7x slower than later ones: Ray's object store and the
    # actors' buffers warming up).
    pool(batches[0][: 2 * args.cores])
    pool(batches[0])
    actors_start = time.perf_counter() - started - ray_start

    import torch

    from boltzgen.pipeline.energy_backends import ENERGY_BACKENDS
    from boltzgen.systems import make_system

    torch.set_num_threads(args.cores)
    forcefield = ENERGY_BACKENDS.get("torch_forcefield").make(
        make_system(job.dump["system"]), job.energy)
    forcefield(batches[0])  # untimed: the parameters read from the OpenMM System
    single(batches[0])
    arms = {"single_1": timed(single, batches), "pool_1": timed(pool, batches),
            "forcefield_1": timed(forcefield, batches),
            "forcefield_2": timed(forcefield, batches),
            "pool_2": timed(pool, batches), "single_2": timed(single, batches)}
    ray.shutdown()
    rate = {name: args.batch / statistics.median(seconds) for name, seconds in arms.items()}
    single_rate = args.batch / statistics.median(arms["single_1"] + arms["single_2"])
    pool_rate = args.batch / statistics.median(arms["pool_1"] + arms["pool_2"])
    forcefield_rate = args.batch / statistics.median(arms["forcefield_1"]
                                                     + arms["forcefield_2"])
    result = {
        "cores": args.cores, "batch": args.batch, "repeats": args.repeats,
        "platform": args.platform, "ray_start_s": ray_start, "actors_start_s": actors_start,
        "evaluations_per_second": rate,
        "single_evaluations_per_second": single_rate,
        "pool_evaluations_per_second": pool_rate,
        "pool_over_single": pool_rate / single_rate,
        "forcefield_evaluations_per_second": forcefield_rate,
        "forcefield_over_single": forcefield_rate / single_rate,
        "forcefield_over_pool": forcefield_rate / pool_rate,
        "goal": 0.9 * args.cores,
        "drift_single_second_over_first": statistics.median(arms["single_2"])
        / statistics.median(arms["single_1"]),
        "drift_pool_second_over_first": statistics.median(arms["pool_2"])
        / statistics.median(arms["pool_1"]),
    }
    print(f"alanine dipeptide, amber99sbildn-obc, {args.platform} platform, batches of "
          f"{args.batch} (U and forces), {args.repeats} batches per arm")
    print(f"  one Context (1 thread):      {single_rate:8.0f} evaluations/s")
    print(f"  energy pool ({args.cores} x 1 CPU):   {pool_rate:8.0f} evaluations/s")
    print(f"  PyTorch force field ({args.cores} threads): {forcefield_rate:8.0f} evaluations/s")
    print(f"  pool / single:               {result['pool_over_single']:8.2f}  "
          f"(goal >= {result['goal']:.2f})")
    print(f"  force field / single:        {result['forcefield_over_single']:8.2f}, "
          f"/ pool {result['forcefield_over_pool']:.2f}")
    print(f"  drift (second arm / first):  single {result['drift_single_second_over_first']:.2f}"
          f", pool {result['drift_pool_second_over_first']:.2f}")
    print(f"  not timed: Ray start {ray_start:.1f} s, actors and Contexts {actors_start:.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
