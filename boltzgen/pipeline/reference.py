"""Reference stage: samples of the target (and a thermodynamic base) and the reference ΔF (kT),
by replica-exchange MCMC with MBAR or exact f, by a system's exact sampler, by OpenMM MD
over a temperature ladder (cached in the work directory) with MBAR, or by one MD run of the
target (plain or replica exchange) with the free energy between its metastable states."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from boltzgen.estimators import mbar_ladder
from boltzgen.mcmc import decorrelated, replica_exchange
from boltzgen.md import MDProtocol, cache_key, cached_md, held_out_blocks
from boltzgen.pipeline.problem import (
    Problem,
    check_injected_failure,
    float64_tensor,
    seed_of,
    stage_seed,
)
from boltzgen.settings import JobSettings, ReferenceSettings
from boltzgen.systems import make_system


@dataclass(frozen=True)
class HeldOutFrames:
    """Every frame of one MD run's held-out blocks, in time order (correlated frames).

    ``frames`` (F, dim) flow coordinates, ``potential`` (F,) U in the system's energy units,
    ``segment`` (F,) the held-out block each frame lies in, ``statistical_inefficiency`` g of
    the run's U in frames (pymbar); ``decorrelated``: the rows of ``frames`` that form the
    decorrelated held-out set (every ceil(g)-th frame; ``base_test``/``target_test``), in order.
    """

    frames: np.ndarray
    potential: np.ndarray
    segment: np.ndarray
    statistical_inefficiency: float
    decorrelated: np.ndarray

    @property
    def block_frames(self) -> int:
        """Block length for the moving-block bootstrap of averages over these frames:
        3 ceil(g). A block keeps only the correlations within it; for an AR(1) series with
        g = 9, blocks of g frames keep 57 % of the variance of the mean, blocks of 3g 84 %."""
        return 3 * int(math.ceil(self.statistical_inefficiency))


@dataclass
class ReferenceData:
    """Decorrelated MCMC samples split into train/test, and the reference ΔF (kT)."""

    target_train: np.ndarray
    target_test: np.ndarray
    target_test_potential: np.ndarray  # U in energy units
    base_train: np.ndarray | None
    base_test: np.ndarray | None
    base_test_potential: np.ndarray | None
    reference_delta_f: float | None
    reference_delta_f_err: float | None
    method: str
    ladder: list[float]
    diagnostics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    base_train_potential: np.ndarray | None = None  # U of base_train (energy units), if known
    # MD references: every frame of the held-out blocks (base_test and target_test are their
    # decorrelated subsets), over which structural observables average: all of them, with
    # block-bootstrap errors, rather than the ~1/g of them the estimators need independent.
    base_heldout: HeldOutFrames | None = None
    target_heldout: HeldOutFrames | None = None


def run_reference(settings: JobSettings | Mapping[str, Any], work_dir: str | None = None,
                  threads: int = 1) -> ReferenceData:
    """Reference data and ΔF (kT) by the job's registered reference sampler
    (:data:`boltzgen.pipeline.samplers.REFERENCE_SAMPLERS`): replica-exchange MCMC over the
    ladder with an exact or MBAR reference, the system's exact sampler and exact f, or OpenMM
    MD over the ladder, cached under ``work_dir``, with MBAR."""
    from boltzgen.pipeline.samplers import REFERENCE_SAMPLERS

    job = JobSettings.of(settings)
    check_injected_failure(job, "reference")
    start = time.perf_counter()
    problem = Problem.from_settings(job)
    reference = REFERENCE_SAMPLERS.get(job.reference.sampler).run(job, problem, work_dir,
                                                                  threads)
    reference.seconds = time.perf_counter() - start
    return reference


def mcmc_reference(job: JobSettings, problem: Problem) -> ReferenceData:
    """Replica-exchange MCMC over the ladder from chains started at N(0, base.scale²);
    decorrelated per temperature, split train/test; ΔF exact or by MBAR
    (:func:`_ladder_free_energy`)."""
    ref = job.reference
    ladder = problem.ladder(ref)
    seed = stage_seed(job, "reference")
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(
        ref.n_chains, problem.system.dim, generator=generator, dtype=torch.float64
    ) * job.base.scale
    result = replica_exchange(
        problem.system.potential,
        ladder.tolist(),
        x0,
        n_steps=ref.n_steps,
        burn_in=ref.burn_in,
        n_chains=ref.n_chains,
        thin=ref.thin,
        step_size=ref.step_size,
        exchange_every=ref.exchange_every,
        boltzmann_constant=problem.system.boltzmann_constant,
        seed=seed,
    )
    per_state = [decorrelated(result.samples[k], result.potentials[k]) for k in range(len(ladder))]
    rng = np.random.default_rng(seed)
    target_k = int(np.argmin(np.abs(ladder - problem.temperature)))
    target_train, target_test, _, target_pot = _split(per_state[target_k], ref, rng)
    diagnostics = {
        "mcmc_acceptance_min": float(np.min(result.acceptance)),
        "mcmc_exchange_acceptance_min": float(np.min(result.exchange_acceptance))
        if len(result.exchange_acceptance)
        else float("nan"),
        "mcmc_statistical_inefficiency_max": float(max(g for _, _, g in per_state)),
        "mcmc_target_decorrelated_samples": float(len(per_state[target_k][0])),
        **_configurational_temperature(problem, per_state[target_k][0]),
    }
    base_train = base_test = base_pot = None
    if problem.base.temperature_ladder:
        base_k = int(np.argmin(np.abs(ladder - problem.base.temperature)))
        base_train, base_test, _, base_pot = _split(per_state[base_k], ref, rng)
        ref_f, ref_err, method = _ladder_free_energy(problem, ladder, per_state, target_k,
                                                     base_k, ref, seed)
    else:
        exact_target = problem.system.exact_free_energy(problem.temperature)
        ref_f, ref_err = (exact_target, 0.0) if exact_target is not None else (None, None)
        method = "exact" if exact_target is not None else "none"
    return ReferenceData(
        target_train=target_train,
        target_test=target_test,
        target_test_potential=target_pot,
        base_train=base_train,
        base_test=base_test,
        base_test_potential=base_pot,
        reference_delta_f=ref_f,
        reference_delta_f_err=ref_err,
        method=method,
        ladder=ladder.tolist(),
        diagnostics=diagnostics,
    )


def _configurational_temperature(problem: Problem, samples: np.ndarray,
                                 at_most: int = 2000) -> dict[str, float]:
    """``reference_configurational_temperature`` (with ``_err``) of the target's decorrelated
    MCMC samples (at most ``at_most``), in the system's temperature units: it equals the
    target temperature within its error when the samples are Boltzmann distributed there
    (:func:`boltzgen.observables.configurational_temperature`). Left out where it is not
    defined (⟨∇²U⟩ <= 0, non-finite derivatives)."""
    from boltzgen.observables import configurational_temperature

    if len(samples) < 40:
        return {}
    try:
        value, error = configurational_temperature(
            problem.system.potential, samples[:at_most],
            problem.system.boltzmann_constant)
    except ValueError:
        return {}
    return {"reference_configurational_temperature": value,
            "reference_configurational_temperature_err": error}


def _ladder_free_energy(problem: Problem, ladder: np.ndarray, per_state: list[Any],
                        target_k: int, base_k: int, ref: ReferenceSettings, seed: int
                        ) -> tuple[float, float, str]:
    """ΔF = f(target) − f(base) in kT and its error: exact where the system knows f(T) at
    both ends, else MBAR over the ladder's decorrelated MCMC samples."""
    exact_target = problem.system.exact_free_energy(problem.temperature)
    exact_base = problem.system.exact_free_energy(problem.base.temperature)
    if exact_target is not None and exact_base is not None:
        return exact_target - exact_base, 0.0, "exact"
    # MBAR's bootstrap costs n_bootstraps solves over all pooled samples; an evenly strided
    # subset of the (already decorrelated) samples keeps it to seconds, and the bootstrap error
    # describes the subset actually used.
    cap = ref.mbar_max_samples_per_state
    f_k, df_k = mbar_ladder(
        [p[:: max(1, -(-len(p) // cap))] for _, p, _ in per_state],
        ladder.tolist(),
        problem.system.boltzmann_constant,
        n_bootstraps=ref.n_bootstraps,
        seed=seed,
    )
    # f_k are relative to state 0; ΔF = f(target) − f(base). The bootstrap error of the
    # difference is reported for the non-zero end (state 0 is one of the two ends).
    return (float(f_k[target_k] - f_k[base_k]), float(df_k[target_k] if target_k
            else df_k[base_k]), f"MBAR over {len(ladder)} temperatures")


def exact_reference(job: JobSettings, problem: Problem) -> ReferenceData:
    """Independent samples from the system's exact sampler at the target (and a thermodynamic
    base's) temperature; exact f from the system (quadrature)."""
    ref = job.reference
    seed = stage_seed(job, "reference")
    rng = np.random.default_rng(seed)
    system = problem.system

    def draw(temperature: float, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                       np.ndarray, float]:
        samples, proposals = system.exact_samples(ref.n_exact_samples, temperature,
                                                  seed + offset)
        potentials = system.potential(float64_tensor(samples)).detach().numpy()
        train_x, test_x, _, test_u = _split((samples, potentials, 1.0), ref, rng)
        return train_x, test_x, test_u, potentials, len(samples) / proposals

    target_train, target_test, target_pot, _, acceptance = draw(problem.temperature, 0)
    diagnostics = {"exact_sampler_acceptance": acceptance}
    base_train = base_test = base_pot = None
    f_target = system.exact_free_energy(problem.temperature)
    if problem.base.temperature_ladder:
        base_train, base_test, base_pot, _, _ = draw(problem.base.temperature, 1)
        f_base = system.exact_free_energy(problem.base.temperature)
        ref_f = None if f_target is None or f_base is None else f_target - f_base
    else:
        ref_f = f_target
    return ReferenceData(
        target_train=target_train, target_test=target_test, target_test_potential=target_pot,
        base_train=base_train, base_test=base_test, base_test_potential=base_pot,
        reference_delta_f=ref_f, reference_delta_f_err=None if ref_f is None else 0.0,
        method="exact (system quadrature); samples by the system's exact sampler"
        if ref_f is not None else "none; samples by the system's exact sampler",
        ladder=[problem.temperature], diagnostics=diagnostics,
    )


def data_free_reference(job: JobSettings, problem: Problem) -> ReferenceData:
    """No target samples for training (a data-free job); the system's exact ΔF where it knows
    f(T), and, where the system has an exact sampler, ``reference.n_exact_samples`` held-out
    samples of the target for evaluation only (NLL, marginals, energy histograms): training
    never sees them (``target_train`` stays empty)."""
    system = problem.system
    empty = np.zeros((0, system.dim))
    f_target = system.exact_free_energy(problem.temperature)
    test, test_u, note = empty, np.zeros(0), "no samples (data-free)"
    # Only where f(T) is known: the mixture's exact sampler works at its normalised T alone.
    if system.supports_exact_sampling() and f_target is not None:
        test, _ = system.exact_samples(job.reference.n_exact_samples, problem.temperature,
                                       stage_seed(job, "reference"))
        test_u = system.potential(float64_tensor(test)).detach().numpy()
        note = ("no training samples (data-free); held-out samples by the system's exact "
                "sampler for evaluation only")
    return ReferenceData(
        target_train=empty, target_test=test, target_test_potential=test_u,
        base_train=None, base_test=None, base_test_potential=None,
        reference_delta_f=f_target, reference_delta_f_err=None if f_target is None else 0.0,
        method=f"exact (system quadrature); {note}" if f_target is not None
        else f"none; {note}", ladder=[problem.temperature])


def md_protocol(job: JobSettings, temperature: float) -> MDProtocol:
    """The MD protocol of one ladder temperature. Its seed depends on the campaign seed, the
    system and the temperature only, so every job that needs this run shares one cache entry."""
    seed = seed_of(json.dumps([job.seed, job.dump["system"], round(float(temperature), 6)],
                              sort_keys=True))
    return MDProtocol(temperature=round(float(temperature), 6), seed=seed,
                      **job.reference.md_protocol.protocol_fields())


def md_runs(settings: JobSettings | Mapping[str, Any]) -> list[tuple[str, float]]:
    """(cache key, temperature K) of every MD run a job's reference needs (none unless its
    reference sampler runs MD); jobs that need the same run get the same key."""
    from boltzgen.pipeline.samplers import REFERENCE_SAMPLERS

    job = JobSettings.of(settings)
    return REFERENCE_SAMPLERS.get(job.reference.sampler).md_runs(job, Problem.from_settings(job))


def run_md_rung(system_settings: Mapping[str, Any], protocol: MDProtocol, work_dir: str,
                threads: int = 1, platform: str = "CPU") -> float:
    """Run (or find in the cache) one MD run of a job's ladder; wall seconds it took.
    (``inject_failure: reference`` acts in :func:`run_reference`: an MD run can be shared by
    jobs that do not inject anything.)"""
    system = make_system(system_settings)
    run = cached_md(system, protocol, work_dir, threads, platform)
    return 0.0 if run.reused else run.seconds


def md_reference(job: JobSettings, problem: Problem, work_dir: str, threads: int
                 ) -> ReferenceData:
    """MD at every ladder temperature (ascending, so jobs sharing the base temperature reach
    it at different times), decorrelated with pymbar's statistical inefficiency, MBAR ΔF."""
    ref = job.reference
    system = problem.system
    ladder = problem.ladder(ref)
    runs = [cached_md(system, md_protocol(job, t), work_dir, threads, job.energy.platform)
            for t in ladder]
    per_state = [decorrelated(run.flow_coordinates[None], run.potential_kj_per_mol[None])
                 for run in runs]
    seed = stage_seed(job, "reference")
    target_k = int(np.argmin(np.abs(ladder - problem.temperature)))
    base_k = int(np.argmin(np.abs(ladder - problem.base.temperature)))
    blocks = ref.holdout_blocks or 1
    target_train, target_test, _, target_pot, target_heldout = _time_split(
        runs[target_k], ref.holdout_fraction, blocks)
    base_train, base_test, base_train_pot, base_pot, base_heldout = _time_split(
        runs[base_k], ref.holdout_fraction, blocks)
    f_k, df_k = mbar_ladder([p for _, p, _ in per_state], ladder.tolist(),
                            system.boltzmann_constant, n_bootstraps=ref.n_bootstraps, seed=seed)
    diagnostics = {
        "md_statistical_inefficiency_max": float(max(g for _, _, g in per_state)),
        "md_target_decorrelated_frames": float(len(per_state[target_k][0])),
        "md_base_decorrelated_frames": float(len(per_state[base_k][0])),
        "md_seconds_run": float(sum(r.seconds for r in runs if not r.reused)),
        "md_seconds_all_rungs": float(sum(r.seconds for r in runs)),
        "md_seconds_base": float(runs[base_k].seconds),
        "md_runs_reused": float(sum(r.reused for r in runs)),
    }
    return ReferenceData(
        target_train=target_train, target_test=target_test, target_test_potential=target_pot,
        base_train=base_train, base_test=base_test, base_test_potential=base_pot,
        reference_delta_f=float(f_k[target_k] - f_k[base_k]),
        reference_delta_f_err=float(df_k[target_k] if target_k else df_k[base_k]),
        method=f"MBAR over {len(ladder)} MD temperatures "
        f"({', '.join(f'{t:.1f}' for t in ladder)} K)",
        ladder=ladder.tolist(), diagnostics=diagnostics, base_train_potential=base_train_pot,
        base_heldout=base_heldout, target_heldout=target_heldout,
    )


def md_target_reference(job: JobSettings, problem: Problem, work_dir: str, threads: int
                        ) -> ReferenceData:
    """One MD run of the target (plain, or replica exchange over
    ``reference.md.replica_temperatures`` with the frames at the target temperature), split in
    time into training and held-out frames (:func:`_time_split`); no reference for −ln Z but
    the system's exact one where known; the free energy between the system's metastable states
    over every frame of the run (:func:`boltzgen.pipeline.states.md_state_metrics`)."""
    from boltzgen.pipeline.states import md_state_metrics

    ref = job.reference
    system = problem.system
    protocol = md_protocol(job, problem.temperature)
    run = cached_md(system, protocol, work_dir, threads, job.energy.platform)
    train, test, _, test_u, heldout = _time_split(run, ref.holdout_fraction,
                                                  ref.holdout_blocks or 1)
    diagnostics = {
        "md_ns": float(protocol.n_frames * protocol.frame_interval_ps / 1000.0),
        "md_frames": float(len(run.flow_coordinates)),
        "md_seconds_run": 0.0 if run.reused else float(run.seconds),
        "md_seconds_all_rungs": float(run.seconds),
        "md_runs_reused": float(run.reused),
        "md_replicas": float(max(1, len(protocol.replica_temperatures))),
        **_replica_exchange_diagnostics(run.replica_exchange),
        # Seeded by the run itself, so that every job sharing the run reports the same error.
        **md_state_metrics(system, run.flow_coordinates,
                           seed_of(f"md_states|{cache_key(system, protocol)}")),
    }
    exact = system.exact_free_energy(problem.temperature)
    how = (f"replica-exchange MD over {', '.join(f'{t:g}' for t in protocol.replica_temperatures)}"
           " K, frames at the target" if protocol.replica_temperatures
           else f"MD at {problem.temperature:g} K")
    return ReferenceData(
        target_train=train, target_test=test, target_test_potential=test_u,
        base_train=None, base_test=None, base_test_potential=None,
        reference_delta_f=exact, reference_delta_f_err=None if exact is None else 0.0,
        method=("exact (system quadrature); " if exact is not None else "none for -ln Z; ")
        + how, ladder=[problem.temperature], diagnostics=diagnostics, target_heldout=heldout)


def _replica_exchange_diagnostics(stats: Any) -> dict[str, float]:
    """The lowest and mean exchange acceptance between neighbouring rungs and the round
    trips T_0 -> T_max -> T_0 of all walkers, for a replica-exchange run (else nothing)."""
    if stats is None:
        return {}
    acceptance = stats.acceptance
    return {"md_exchange_acceptance_min": float(np.nanmin(acceptance)),
            "md_exchange_acceptance_mean": float(np.nanmean(acceptance)),
            "md_round_trips": float(np.sum(stats.round_trips))}


def _time_split(run: Any, holdout_fraction: float, blocks: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, HeldOutFrames]:
    """(train x, test x, train U, test U, every held-out frame) of one MD run, split in time.

    ``blocks = 1``: training frames are the first (1 − h) of the run, held-out frames the last
    h. ``blocks = B > 1``: the run is cut into B contiguous blocks and block i is held out when
    floor((i + 1) h) > floor(i h), so that held-out and training blocks alternate through the
    run and both see its slow fluctuations (a drifting run otherwise trains the flow on one
    part of phase space and tests it on another).

    Training frames: every frame of the training part (correlated frames are still samples of
    the ensemble, and more distinct ones help the fit). Held-out frames: every ceil(g)-th frame
    of the held-out part, g the statistical inefficiency of the potential (pymbar), so that
    estimators that assume independent samples get honest error bars; a held-out block also
    drops its first and last ceil(g) frames where they touch a training block, so that no
    held-out frame is within one correlation time of a training frame. Every frame between
    those ends is returned as well (:class:`HeldOutFrames`), for averages over correlated
    frames.
    """
    x, u = run.flow_coordinates, run.potential_kj_per_mol
    if blocks <= 1:
        n_test = min(len(x) - 1, max(1, int(round(len(x) * holdout_fraction))))
        cut = len(x) - n_test
        test_x, test_u, g = decorrelated(x[None, cut:], u[None, cut:])
        every = HeldOutFrames(frames=x[cut:], potential=u[cut:],
                              segment=np.zeros(n_test, dtype=np.int64),
                              statistical_inefficiency=float(g),
                              decorrelated=np.arange(0, n_test, max(1, math.ceil(g))))
        return x[:cut], test_x, u[:cut], test_u, every
    edges = np.linspace(0, len(x), blocks + 1).round().astype(int)
    held_out = held_out_blocks(blocks, holdout_fraction)
    g = float(decorrelated(x[None], u[None])[2])
    stride = int(np.ceil(g))
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    every_idx: list[np.ndarray] = []
    for i in range(blocks):
        lo, hi = int(edges[i]), int(edges[i + 1])
        if not held_out[i]:
            train_idx.append(np.arange(lo, hi))
            continue
        lo += stride if i > 0 and not held_out[i - 1] else 0
        hi -= stride if i < blocks - 1 and not held_out[i + 1] else 0
        test_idx.append(np.arange(lo, hi, stride))
        every_idx.append(np.arange(lo, max(lo, hi)))
    train, test = np.concatenate(train_idx), np.concatenate(test_idx)
    if len(test) == 0:
        raise ValueError(f"reference.holdout_blocks: {blocks} blocks of {len(x)} frames are "
                         f"shorter than two correlation times ({stride} frames each); use fewer")
    every = np.concatenate(every_idx)
    segment = np.concatenate([np.full(len(idx), k) for k, idx in enumerate(every_idx)])
    return x[train], x[test], u[train], u[test], HeldOutFrames(
        frames=x[every], potential=u[every], segment=segment.astype(np.int64),
        statistical_inefficiency=g, decorrelated=np.searchsorted(every, test))


def _split(
    state: tuple[np.ndarray, np.ndarray, float], ref: ReferenceSettings,
    rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    samples, potentials, _ = state
    order = rng.permutation(len(samples))
    n_test = max(1, int(round(len(samples) * ref.holdout_fraction)))
    # At most max_holdout_samples of the held-out ones are kept (each costs a pull-back
    # through the flow: for a CNF with an exact divergence, the dominant cost); the others
    # are still left out of training.
    kept = n_test if ref.max_holdout_samples is None else min(n_test, ref.max_holdout_samples)
    test, train = order[:kept], order[n_test:]
    return samples[train], samples[test], potentials[train], potentials[test]


