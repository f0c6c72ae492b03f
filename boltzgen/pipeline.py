"""One free-energy job as stages: reference -> train -> sample -> energy -> estimate.

Each stage is a plain function of the job's resolved configuration (a mapping, as the campaign
spec resolves it) and the previous stages' outputs, so that the same code runs in Ray actors, in
one plain Python process (the benchmark's baseline) and in a notebook.

The estimand is ΔF = f_B − f_A in kT (reduced units), f = −ln Z, with B the system at the job's
``temperature`` and A the base state (DESIGN.md §3):

* ``base.kind = normal``: A = N(0, scale² I) in flow coordinates, normalized, f_A = 0, so ΔF is
  the absolute reduced free energy −ln ∫ exp(−U(x)/k_B T) dx in flow coordinates;
* ``base.kind = thermodynamic``: A = the same system at ``base.temperature``, so ΔF = f(T) − f(T_A).

A flow T maps A to B. With x ~ A, the LFEP log weights are
log w = u_A(x) + log|det J_T(x)| − u_B(T(x)) and ΔF ≈ ln N − logsumexp(log w)
(Jarzynski-type targeted free-energy perturbation; Wirnsberger et al. 2020). With y ~ B mapped
back by T⁻¹, BAR over both directions gives LBAR. The references are exact (quadrature) where
the system knows its partition function, else MBAR (Shirts & Chodera 2008) over a replica-exchange
MCMC ladder geomspace(T, T_A, K).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzgen._files import write_atomically
from boltzgen.estimators import (
    importance_free_energy,
    importance_free_energy_err_bootstrap,
    kish_ess_fraction,
    kish_ess_fraction_err,
    lbar,
    lbar_err_bootstrap,
    lfep_log_weights,
    mbar_ladder,
)
from boltzgen.flows import build_flow
from boltzgen.mcmc import decorrelated, replica_exchange
from boltzgen.md import MDProtocol, cache_key, cached_md, held_out_blocks
from boltzgen.observables import PairHistograms, overlay_statistics
from boltzgen.openmm_bridge import OpenMMEvaluator
from boltzgen.states import AnalyticBase, NormalBase, ThermodynamicBase, UniformBase
from boltzgen.systems import System, make_system
from boltzgen.training import TrainingState, train_flow

EnergyFunction = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""x (B, dim) flow coordinates -> (U (B,) energy units, ∇U (B, dim))."""


class InjectedFailure(RuntimeError):
    """Raised on purpose when a job's ``inject_failure`` names the running stage."""


def check_injected_failure(config: Mapping[str, Any], stage: str) -> None:
    if config.get("inject_failure") == stage:
        raise InjectedFailure(f"failure injected on purpose in stage '{stage}' (inject_failure)")


def stage_seed(config: Mapping[str, Any], stage: str) -> int:
    """A seed per (job configuration, stage): reproducible, independent across jobs and stages."""
    return _seed_of(f"{json.dumps(config, sort_keys=True, default=str)}|{stage}")


def _seed_of(text: str) -> int:
    """A 31-bit seed from the sha256 of ``text`` (the same on every machine)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class Problem:
    """System, target temperature and base state of one job."""

    system: System
    temperature: float
    base: NormalBase | UniformBase | ThermodynamicBase

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Problem:
        system = make_system(config["system"])
        base_cfg = config["base"]
        if base_cfg["kind"] == "normal":
            base: NormalBase | UniformBase | ThermodynamicBase = NormalBase(system.dim,
                                                                            base_cfg["scale"])
        elif base_cfg["kind"] == "uniform":
            base = UniformBase(system)
        else:
            base = ThermodynamicBase(system, base_cfg["temperature"])
        return cls(system=system, temperature=float(config["temperature"]), base=base)

    @property
    def kt(self) -> float:
        """k_B T of the target in the system's energy units."""
        return self.system.boltzmann_constant * self.temperature

    def target_reduced_energy(self, y: torch.Tensor) -> torch.Tensor:
        return self.system.reduced_energy(y, self.temperature)

    def ladder(self, reference: Mapping[str, Any]) -> np.ndarray:
        """Temperatures of the replica-exchange ladder, ascending."""
        k = int(reference["ladder_size"])
        if isinstance(self.base, ThermodynamicBase):
            ends = (self.temperature, self.base.temperature)
        else:
            ends = (self.temperature, self.temperature * reference["hot_temperature_factor"])
        return np.sort(np.geomspace(ends[0], ends[1], k)) if k > 1 else np.array([ends[0]])

    def estimand(self) -> str:
        if isinstance(self.base, ThermodynamicBase):
            return (
                f"f(T={self.temperature:g}) - f(T_A={self.base.temperature:g}) in kT, "
                f"f = -ln Z; {self.system.estimand_note}"
            )
        base = "Gaussian" if isinstance(self.base, NormalBase) else "uniform"
        return (
            f"-ln Z at T={self.temperature:g} in kT (f of the normalized {base} base is 0); "
            f"{self.system.estimand_note}"
        )

    def build_flow(self, flow_config: Mapping[str, Any]) -> torch.nn.Module:
        return build_flow(self.system.dim, flow_config, layout=self.system.rigid_layout())


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


def run_reference(config: Mapping[str, Any], work_dir: str | None = None, threads: int = 1
                  ) -> ReferenceData:
    """Reference data and ΔF (kT): replica-exchange MCMC over the ladder with an exact or MBAR
    reference, (``reference.sampler = exact``) the system's exact sampler and exact f, or
    (``md``) OpenMM MD over the ladder, cached under ``work_dir``, with MBAR."""
    check_injected_failure(config, "reference")
    start = time.perf_counter()
    problem = Problem.from_config(config)
    ref = config["reference"]
    if ref.get("sampler", "mcmc") == "exact":
        return _exact_reference(config, problem, start)
    if ref.get("sampler") == "md":
        if work_dir is None:
            raise ValueError("work_dir: None is not allowed for reference.sampler 'md'; MD "
                             "frames are cached in the campaign's work directory")
        return _md_reference(config, problem, start, work_dir, threads)
    ladder = problem.ladder(ref)
    seed = stage_seed(config, "reference")
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(
        ref["n_chains"], problem.system.dim, generator=generator, dtype=torch.float64
    ) * config["base"].get("scale", 1.0)
    result = replica_exchange(
        problem.system.potential,
        ladder.tolist(),
        x0,
        n_steps=ref["n_steps"],
        burn_in=ref["burn_in"],
        n_chains=ref["n_chains"],
        thin=ref["thin"],
        step_size=ref["step_size"],
        exchange_every=ref["exchange_every"],
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
    }
    base_train = base_test = base_pot = None
    exact_target = problem.system.exact_free_energy(problem.temperature)
    if isinstance(problem.base, ThermodynamicBase):
        base_k = int(np.argmin(np.abs(ladder - problem.base.temperature)))
        base_train, base_test, _, base_pot = _split(per_state[base_k], ref, rng)
        exact_base = problem.system.exact_free_energy(problem.base.temperature)
        if exact_target is not None and exact_base is not None:
            ref_f, ref_err, method = exact_target - exact_base, 0.0, "exact"
        else:
            # MBAR's bootstrap costs n_bootstraps solves over all pooled samples; an evenly
            # strided subset of the (already decorrelated) samples keeps it to seconds, and the
            # bootstrap error describes the subset actually used.
            cap = int(ref.get("mbar_max_samples_per_state", 2000))
            f_k, df_k = mbar_ladder(
                [p[:: max(1, -(-len(p) // cap))] for _, p, _ in per_state],
                ladder.tolist(),
                problem.system.boltzmann_constant,
                n_bootstraps=ref["n_bootstraps"],
                seed=seed,
            )
            # f_k are relative to state 0; ΔF = f(target) − f(base). The bootstrap error of the
            # difference is reported for the non-zero end (state 0 is one of the two ends).
            ref_f = float(f_k[target_k] - f_k[base_k])
            ref_err = float(df_k[target_k] if target_k else df_k[base_k])
            method = f"MBAR over {len(ladder)} temperatures"
    else:
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
        seconds=time.perf_counter() - start,
    )


def _exact_reference(config: Mapping[str, Any], problem: Problem, start: float
                     ) -> ReferenceData:
    """Independent samples from the system's exact sampler at the target (and a thermodynamic
    base's) temperature; exact f from the system (quadrature)."""
    ref = config["reference"]
    seed = stage_seed(config, "reference")
    rng = np.random.default_rng(seed)
    system = problem.system

    def draw(temperature: float, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                       np.ndarray, float]:
        samples, proposals = system.exact_samples(ref["n_exact_samples"], temperature,
                                                  seed + offset)
        potentials = system.potential(_tensor(samples)).detach().numpy()
        train_x, test_x, _, test_u = _split((samples, potentials, 1.0), ref, rng)
        return train_x, test_x, test_u, potentials, len(samples) / proposals

    target_train, target_test, target_pot, _, acceptance = draw(problem.temperature, 0)
    diagnostics = {"exact_sampler_acceptance": acceptance}
    base_train = base_test = base_pot = None
    f_target = system.exact_free_energy(problem.temperature)
    if isinstance(problem.base, ThermodynamicBase):
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
        seconds=time.perf_counter() - start,
    )


def md_protocol(config: Mapping[str, Any], temperature: float) -> MDProtocol:
    """The MD protocol of one ladder temperature. Its seed depends on the campaign seed, the
    system and the temperature only, so every job that needs this run shares one cache entry."""
    md = config["reference"].get("md") or {}
    seed = _seed_of(json.dumps([config["seed"], config["system"], round(float(temperature), 6)],
                               sort_keys=True))
    return MDProtocol(temperature=round(float(temperature), 6), seed=seed,
                      **{k: float(v) for k, v in md.items()})


def md_runs(config: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(cache key, temperature K) of every MD run a job's reference needs (none unless
    ``reference.sampler`` is ``md``); jobs that need the same run get the same key."""
    if config["reference"].get("sampler") != "md":
        return []
    problem = Problem.from_config(config)
    return [(cache_key(problem.system, md_protocol(config, t)), float(t))
            for t in problem.ladder(config["reference"])]


def run_md_rung(config: Mapping[str, Any], temperature: float, work_dir: str,
                threads: int = 1) -> float:
    """Run (or find in the cache) one MD run of the job's ladder; wall seconds it took.
    (``inject_failure: reference`` acts in :func:`run_reference`: an MD run can be shared by
    jobs that do not inject anything.)"""
    system = make_system(config["system"])
    platform = (config.get("energy") or {}).get("platform", "CPU")
    run = cached_md(system, md_protocol(config, temperature), work_dir, threads, platform)
    return 0.0 if run.reused else run.seconds


def _md_reference(config: Mapping[str, Any], problem: Problem, start: float, work_dir: str,
                  threads: int) -> ReferenceData:
    """MD at every ladder temperature (ascending, so jobs sharing the base temperature reach
    it at different times), decorrelated with pymbar's statistical inefficiency, MBAR ΔF."""
    ref = config["reference"]
    system = problem.system
    ladder = problem.ladder(ref)
    platform = (config.get("energy") or {}).get("platform", "CPU")
    runs = [cached_md(system, md_protocol(config, t), work_dir, threads, platform)
            for t in ladder]
    per_state = [decorrelated(run.flow_coordinates[None], run.potential_kj_per_mol[None])
                 for run in runs]
    seed = stage_seed(config, "reference")
    target_k = int(np.argmin(np.abs(ladder - problem.temperature)))
    base_k = int(np.argmin(np.abs(ladder - problem.base.temperature)))
    blocks = ref.get("holdout_blocks") or 1
    target_train, target_test, _, target_pot, target_heldout = _time_split(
        runs[target_k], ref["holdout_fraction"], blocks)
    base_train, base_test, base_train_pot, base_pot, base_heldout = _time_split(
        runs[base_k], ref["holdout_fraction"], blocks)
    f_k, df_k = mbar_ladder([p for _, p, _ in per_state], ladder.tolist(),
                            system.boltzmann_constant, n_bootstraps=ref["n_bootstraps"], seed=seed)
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
        ladder=ladder.tolist(), diagnostics=diagnostics,
        seconds=time.perf_counter() - start, base_train_potential=base_train_pot,
        base_heldout=base_heldout, target_heldout=target_heldout,
    )


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
    state: tuple[np.ndarray, np.ndarray, float], ref: Mapping[str, Any], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    samples, potentials, _ = state
    order = rng.permutation(len(samples))
    n_test = max(1, int(round(len(samples) * ref["holdout_fraction"])))
    test, train = order[:n_test], order[n_test:]
    return samples[train], samples[test], potentials[train], potentials[test]


@dataclass
class TrainedFlow:
    checkpoint: bytes  # torch.save of {"state_dict", "flow_config", "dim", "system"}
    losses: list[float]
    seconds: float
    skipped_steps: int = 0  # steps whose loss or gradient was not finite
    n_parameters: int = 0  # trainable parameters of the flow
    energy_evaluations: int = 0  # configurations whose system energy training computed
    checkpoint_path: str | None = None  # the final checkpoint in the work directory, if any
    resumed_from_step: int = 0  # optimizer steps (all phases) taken from a progress checkpoint
    steps_run: int = 0  # optimizer steps this call computed
    energy_chunks_resent: int = 0  # energy chunks evaluated again after their evaluator died


class BatchEnergy(torch.autograd.Function):
    """U(x) (B,) in energy units from a batch energy function x -> (U, ∇U) (numpy), with
    ∇U as the gradient: how training differentiates energies computed elsewhere (the
    EnergyEvaluator pool's OpenMM Contexts). Non-finite U stay non-finite."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, energy: EnergyFunction) -> torch.Tensor:
        u, grad = energy(x.detach().cpu().numpy())
        ctx.save_for_backward(torch.as_tensor(np.asarray(grad, dtype=np.float64),
                                              device=x.device))
        return torch.as_tensor(np.asarray(u, dtype=np.float64), device=x.device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad,) = ctx.saved_tensors
        # A non-finite U makes the loss non-finite, and training skips that step before any
        # gradient is used; nothing is zeroed here.
        return grad_output[:, None] * grad, None


PROGRESS_FILE = "progress.pt"


def train(config: Mapping[str, Any], reference: ReferenceData, device: str = "cpu",
          checkpoint_dir: str | None = None, energy: EnergyFunction | None = None,
          checkpoint_every: int = 0) -> TrainedFlow:
    """Fit the flow A -> B by maximum likelihood on B's reference data or by reverse KL (the
    LFEP loss), after ``training.warm_start_steps`` maximum-likelihood steps where asked.

    ``device`` is where the flow trains ("cuda" when the caller holds a GPU); the checkpoint is
    always saved from CPU tensors so that any process can load it. With a ``checkpoint_dir``
    the final flow is also written to ``<checkpoint_dir>/flow.pt``. ``energy`` (a batch
    function x -> (U, ∇U), e.g. over the EnergyEvaluator pool) replaces the system's own
    potential for every energy training needs.

    With ``checkpoint_every`` > 0 (and a ``checkpoint_dir``), the whole training state (flow,
    Adam moments, random generators, losses) goes to ``<checkpoint_dir>/progress.pt`` every
    that many steps; a later call for the same configuration (a restarted trainer, a relaunch
    after a lost driver) continues from there and ends with the same flow as an uninterrupted
    run.
    """
    check_injected_failure(config, "train")
    start = time.perf_counter()
    problem = Problem.from_config(config)
    seed = stage_seed(config, "train")
    torch.manual_seed(seed)
    flow = problem.build_flow(config["flow"]).to(device)
    generator = torch.Generator().manual_seed(seed)
    training = config["training"]
    augment = bool(training.get("symmetry_augmentation"))
    evaluations = [0]  # rows sent to the system's energy (OpenMM for molecular systems)
    last: dict[str, torch.Tensor] = {}  # the latest base batch and its known u_A (MD pools)
    if isinstance(problem.base, AnalyticBase):

        def sample_a(n: int) -> torch.Tensor:
            return problem.base.sample(n, generator).to(device)
    else:
        frames = _tensor(reference.base_train)
        # With symmetry_augmentation, images of the frames under the crystal's space group;
        # an image has the frame's potential (U is invariant under the group).
        pool = SymmetryImages(problem.system, frames) if augment else frames
        pool_u = None if reference.base_train_potential is None else _tensor(
            reference.base_train_potential) / (problem.system.boltzmann_constant
                                               * problem.base.temperature)

        def sample_a(n: int) -> torch.Tensor:
            index = torch.randint(len(pool), (n,), generator=generator)
            x = pool[index].to(device)
            if pool_u is not None:  # remember u_A of this batch: no energy call for it
                last["x"], last["u"] = x, pool_u[index % len(frames)].to(device)
            return x

    if (config["flow"].get("thermal_scaling") and isinstance(problem.base, ThermodynamicBase)
            and len(reference.base_train)):
        # A harmonic crystal's ensembles at T_A and T map onto each other by scaling every
        # displacement from the mean structure by sqrt(T / T_A) (ThermalScalingLayer).
        flow.fit_thermal_scaling(_tensor(reference.base_train).to(device),
                                 math.sqrt(problem.temperature / problem.base.temperature))

    def potential(x: torch.Tensor) -> torch.Tensor:
        evaluations[0] += len(x)
        return problem.system.potential(x) if energy is None else BatchEnergy.apply(x, energy)

    def u_a(x: torch.Tensor) -> torch.Tensor:
        if last.get("x") is x:
            return last["u"]
        if isinstance(problem.base, AnalyticBase):
            return problem.base.reduced_energy(x)
        return potential(x) / (problem.system.boltzmann_constant * problem.base.temperature)

    def u_b(y: torch.Tensor) -> torch.Tensor:
        return potential(y) / problem.kt

    target_train = _tensor(reference.target_train).to(device)
    if augment and len(target_train):
        target_train = SymmetryImages(problem.system, target_train)
    phases = [(training["objective"], training["steps"])]
    warm = int(training.get("warm_start_steps") or 0)
    if warm and training["objective"] == "reverse_kl":
        phases.insert(0, ("maximum_likelihood", warm))
    progress = _Progress(config, checkpoint_dir if checkpoint_every > 0 else None)
    saved = progress.load()
    checkpoint_every = checkpoint_every if progress.path is not None else 0
    losses: list[float] = []
    skipped = first_phase = resumed = 0
    if saved is not None:
        flow.load_state_dict(saved["flow"])
        generator.set_state(saved["generator"])
        losses, skipped, first_phase = saved["losses"], saved["skipped"], saved["phase"]
        evaluations[0] = saved["evaluations"]
        resumed = len(losses) + saved["state"].step
    for index in range(first_phase, len(phases)):
        objective, steps = phases[index]
        done_before = list(losses), skipped

        def save(state: TrainingState, index: int = index,
                 done_before: tuple[list[float], int] = done_before) -> None:
            progress.save({"phase": index, "state": state, "flow": flow.state_dict(),
                           "generator": generator.get_state(), "losses": done_before[0],
                           "skipped": done_before[1], "evaluations": evaluations[0]})

        result = train_flow(
            flow, objective, steps, training["batch_size"], training["learning_rate"],
            u_a=u_a, u_b=u_b, sample_a=sample_a,
            data_b=target_train, seed=seed + index,
            final_learning_rate=training.get("final_learning_rate"),
            resume=saved["state"] if saved is not None and index == first_phase else None,
            checkpoint_every=checkpoint_every, on_checkpoint=save,
        )
        losses += result.losses
        skipped += result.n_skipped
    buffer = io.BytesIO()
    torch.save(
        {
            "state_dict": {k: v.cpu() for k, v in flow.state_dict().items()},
            "flow_config": dict(config["flow"]),
            "dim": problem.system.dim,
            "system": dict(config["system"]),
        },
        buffer,
    )
    path = _save_checkpoint(buffer.getvalue(), checkpoint_dir) if checkpoint_dir else None
    n_parameters = sum(p.numel() for p in flow.parameters() if p.requires_grad)
    return TrainedFlow(buffer.getvalue(), losses, time.perf_counter() - start, skipped,
                       n_parameters, evaluations[0], path, resumed, len(losses) - resumed)


class SymmetryImages:
    """Frames (M, dim) and their images under a system's G symmetry operations, as one set of
    G M rows indexed like a tensor (row g M + m: image g of frame m), computed per minibatch:
    memory of M frames, not of G M (an N128 crystal has G = 64)."""

    def __init__(self, system: Any, frames: torch.Tensor) -> None:
        self.system, self.frames = system, frames
        self.copies = int(system.symmetry_operation_count)
        self.ndim = 2
        self.shape = (self.copies * len(frames), frames.shape[1])
        self.device = frames.device

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index).cpu()
        frame, operation = index % len(self.frames), index // len(self.frames)
        images = self.system.symmetry_images(self.frames[frame.to(self.device)].cpu().numpy(),
                                             operation.numpy())
        return torch.as_tensor(images, dtype=self.frames.dtype, device=self.device)


class _Progress:
    """The training state in ``<directory>/progress.pt``, tied to one job configuration (a file
    written for another configuration is ignored). Written atomically, so a process killed
    while writing leaves the previous state."""

    def __init__(self, config: Mapping[str, Any], directory: str | None) -> None:
        self.path = Path(directory) / PROGRESS_FILE if directory else None
        self.key = json.dumps(config, sort_keys=True, default=str)

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        # CPU tensors: generator states must stay on the CPU; load_state_dict moves the rest.
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        return saved if saved.get("config") == self.key else None

    def save(self, content: dict[str, Any]) -> None:
        assert self.path is not None
        write_atomically(self.path, lambda staging: torch.save({**content, "config": self.key},
                                                               staging))


def _save_checkpoint(data: bytes, directory: str) -> str:
    """Write ``data`` to <directory>/flow.pt atomically (a temporary name, then rename)."""
    return str(write_atomically(Path(directory) / "flow.pt", lambda staging:
                                staging.write_bytes(data)))


def load_flow(checkpoint: bytes) -> torch.nn.Module:
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    layout = make_system(state["system"]).rigid_layout() if "system" in state else None
    flow = build_flow(state["dim"], state["flow_config"], layout=layout)
    flow.load_state_dict(state["state_dict"])
    return flow.eval()


@dataclass
class SampleSet:
    """Base samples pushed forward, target samples pulled back (flow coordinates)."""

    u_a: np.ndarray  # u_A(x), kT, for x ~ A
    mapped: np.ndarray  # y = T(x)
    logdet: np.ndarray  # log|det J_T(x)|
    pulled_back: np.ndarray  # T⁻¹(y_B) for held-out y_B ~ B
    logdet_inverse: np.ndarray  # log|det J_T⁻¹(y_B)|
    u_a_pulled_back: np.ndarray | None  # u_A(T⁻¹ y_B) in kT where A is analytic, else None
    seconds: float
    # An MD base: every held-out base frame (ReferenceData.base_heldout) mapped, for
    # structural observables, and which of its rows ``mapped`` is; None otherwise.
    mapped_heldout: np.ndarray | None = None
    logdet_heldout: np.ndarray | None = None
    u_a_heldout: np.ndarray | None = None  # u_A in kT of those base frames
    heldout_rows: np.ndarray | None = None


def sample(
    config: Mapping[str, Any],
    trained: TrainedFlow,
    reference: ReferenceData,
    batch_size: int = 8192,
) -> SampleSet:
    """Draw x ~ A (fresh for a normal base, held-out MCMC for a thermodynamic one) and map."""
    check_injected_failure(config, "sample")
    start = time.perf_counter()
    problem = Problem.from_config(config)
    flow = load_flow(trained.checkpoint)
    n = int(config["sampling"]["n_samples"])
    if isinstance(problem.base, AnalyticBase):
        generator = torch.Generator().manual_seed(stage_seed(config, "sample"))
        x = problem.base.sample(n, generator)
        u_a = problem.base.reduced_energy(x)
    else:
        x = _tensor(reference.base_test[:n])
        u_a = _tensor(reference.base_test_potential[:n]) / (
            problem.system.boltzmann_constant * problem.base.temperature
        )
    y_b = _tensor(reference.target_test)
    every = None if isinstance(problem.base, AnalyticBase) else reference.base_heldout
    heldout: dict[str, Any] = {}
    with torch.no_grad():
        if every is not None:
            # Every held-out base frame once; the decorrelated ones are rows of it.
            mapped_every, logdet_every = _batched(flow.forward, _tensor(every.frames),
                                                  batch_size)
            rows = every.decorrelated[:n]
            mapped, logdet = mapped_every[rows], logdet_every[rows]
            heldout = {"mapped_heldout": mapped_every.numpy(),
                       "logdet_heldout": logdet_every.numpy(),
                       "u_a_heldout": every.potential / (problem.system.boltzmann_constant
                                                         * problem.base.temperature),
                       "heldout_rows": rows}
        else:
            mapped, logdet = _batched(flow.forward, x, batch_size)
        back, logdet_inv = _batched(flow.inverse, y_b, batch_size)
        u_a_back = (
            problem.base.reduced_energy(back).numpy()
            if isinstance(problem.base, AnalyticBase)
            else None
        )
    return SampleSet(
        u_a=u_a.detach().numpy(),
        mapped=mapped.numpy(),
        logdet=logdet.numpy(),
        pulled_back=back.numpy(),
        logdet_inverse=logdet_inv.numpy(),
        u_a_pulled_back=u_a_back,
        seconds=time.perf_counter() - start,
        **heldout,
    )


def _tensor(array: np.ndarray) -> torch.Tensor:
    """float64 tensor of a copy: arrays that arrive through Ray's object store are read-only."""
    return torch.from_numpy(np.array(array, dtype=np.float64))


def _batched(fn: Any, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    outs, logdets = [], []
    for chunk in torch.split(x, batch_size):
        out, logdet = fn(chunk)
        outs.append(out)
        logdets.append(logdet)
    return torch.cat(outs), torch.cat(logdets)


def make_energy_function(config: Mapping[str, Any], threads: int = 1) -> EnergyFunction:
    """x (B, dim) flow coordinates -> (U (B,) energy units, ∇U (B, dim)) by the job's backend.

    ``energy.backend = torch``: the system's own potential, gradient by autograd.
    ``energy.backend = openmm``: the system's OpenMM form on ``energy.platform`` with
    ``threads`` CPU threads; the Context is built on first use, in the calling process.
    """
    system = make_system(config["system"])
    energy = config.get("energy") or {"backend": "torch"}
    if energy["backend"] == "openmm":
        import openmm

        evaluator = OpenMMEvaluator(openmm.XmlSerializer.serialize(system.openmm_system()),
                                    platform=energy.get("platform", "CPU"), threads=threads)

        def openmm_energy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            u, forces = evaluator.energies_and_forces(system.openmm_positions(x))
            return u, system.flow_gradient(forces, x)

        return openmm_energy

    def torch_energy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xt = _tensor(x).requires_grad_(True)
        u = system.potential(xt)
        (grad,) = torch.autograd.grad(u.sum(), xt)
        return u.detach().numpy(), grad.numpy()

    return torch_energy


def potential_energy(config: Mapping[str, Any], x: np.ndarray,
                     energy_function: EnergyFunction | None = None) -> np.ndarray:
    """U(x) in the system's energy units for a batch of flow coordinates (energy stage)."""
    check_injected_failure(config, "energy")
    return (energy_function or make_energy_function(config))(x)[0]


def energy_requests(samples: SampleSet) -> dict[str, np.ndarray]:
    """Coordinates whose potential energy the energy stage must evaluate: the mapped samples,
    or every mapped held-out base frame where the mapped samples are rows of those
    (:func:`estimate` takes their energies from it); T⁻¹(y_B) for a thermodynamic base."""
    if samples.mapped_heldout is not None and samples.heldout_rows is not None:
        requests = {"mapped_heldout": samples.mapped_heldout}
    else:
        requests = {"mapped": samples.mapped}
    if samples.u_a_pulled_back is None:  # a thermodynamic base needs U at T⁻¹(y_B) too
        requests["pulled_back"] = samples.pulled_back
    return requests


Curve = tuple[np.ndarray, np.ndarray, np.ndarray]  # r (nm), g(r), its standard error


@dataclass
class Estimates:
    metrics: dict[str, float]
    log_weights: np.ndarray
    notes: dict[str, str]
    mapped_potential: np.ndarray | None = None  # U(T(x)) in the system's energy units
    # The same for every held-out base frame, and its LFEP log weights (where mapped).
    mapped_heldout_potential: np.ndarray | None = None
    heldout_log_weights: np.ndarray | None = None
    reverse_work: np.ndarray | None = None  # kT, per held-out target sample (LBAR's input)
    # Pair type -> sample set -> (r nm, g(r), its error), for systems with pair histograms.
    structure: dict[str, dict[str, Curve]] = field(default_factory=dict)


def estimate(
    config: Mapping[str, Any],
    reference: ReferenceData,
    samples: SampleSet,
    potentials: Mapping[str, np.ndarray],
) -> Estimates:
    """LFEP and LBAR ΔF (kT) with 1-sigma errors, Kish ESS fraction, NLL where defined."""
    problem = Problem.from_config(config)
    if "mapped" not in potentials and samples.heldout_rows is not None:
        potentials = {**potentials,
                      "mapped": np.asarray(potentials["mapped_heldout"])[samples.heldout_rows]}
    u_b_mapped = potentials["mapped"] / problem.kt
    log_w = lfep_log_weights(samples.u_a, samples.logdet, u_b_mapped)
    lfep = importance_free_energy(log_w)
    metrics: dict[str, float] = {
        "delta_f": lfep.delta_f,
        "delta_f_err": lfep.delta_f_err,
        "ess": lfep.ess,
        "ess_err": kish_ess_fraction_err(log_w) if len(log_w) >= 2 else float("nan"),
        "delta_f_err_bootstrap": importance_free_energy_err_bootstrap(log_w)
        if len(log_w) >= 2 else float("nan"),
        "n_samples": float(lfep.n_samples),
        "n_nonfinite": float(lfep.n_nonfinite),
        "training_loss_bound": float(np.mean(-log_w[np.isfinite(log_w)]))
        if np.isfinite(log_w).any()
        else float("nan"),
    }
    if reference.reference_delta_f is not None:
        metrics["reference_delta_f"] = reference.reference_delta_f
        metrics["reference_delta_f_err"] = float(reference.reference_delta_f_err or 0.0)
    if samples.u_a_pulled_back is not None:
        u_a_back = samples.u_a_pulled_back
        # −log q(y) = u_A(T⁻¹ y) − log|det J_T⁻¹(y)| for a normalized base.
        metrics["nll"] = float(np.mean(u_a_back - samples.logdet_inverse))
    else:
        u_a_back = potentials["pulled_back"] / (
            problem.system.boltzmann_constant * problem.base.temperature
        )
    u_b_test = reference.target_test_potential / problem.kt
    if "nll" in metrics and reference.reference_delta_f is not None:
        # KL(p_B || q) = E_B[log p_B − log q], log p_B(y) = −u_B(y) + f_B on the base's
        # normalized measure (f_A = 0, so f_B is the reference ΔF); paired per test sample.
        kl_terms = -u_b_test + reference.reference_delta_f + (u_a_back - samples.logdet_inverse)
        finite = np.isfinite(kl_terms)
        if finite.sum() >= 2:
            metrics["forward_kl"] = float(np.mean(kl_terms[finite]))
            metrics["forward_kl_err"] = float(np.std(kl_terms[finite], ddof=1)
                                              / np.sqrt(finite.sum()))
    metrics.update(_mode_metrics(problem, samples.mapped, log_w))
    forward_work = u_b_mapped - samples.logdet - samples.u_a
    reverse_work = u_a_back - samples.logdet_inverse - u_b_test
    if len(reverse_work) >= 2 and np.isfinite(forward_work).sum() >= 2:
        lbar_f, lbar_err = lbar(forward_work, reverse_work)
        metrics["delta_f_lbar"], metrics["delta_f_lbar_err"] = lbar_f, lbar_err
        if np.isfinite(lbar_f):
            metrics["delta_f_lbar_err_bootstrap"] = lbar_err_bootstrap(forward_work,
                                                                       reverse_work)
    if np.isfinite(reverse_work).any():
        # Backward weights w(y) ∝ p_A(T⁻¹ y)|det J_T⁻¹(y)| / p_B(y) = exp(−reverse work), y ~ B.
        metrics["ess_backward"] = kish_ess_fraction(-reverse_work)
        if len(reverse_work) >= 2:
            metrics["ess_backward_err"] = kish_ess_fraction_err(-reverse_work)
    metrics.update(_named_free_energies(problem, reference, metrics))
    every_potential = potentials.get("mapped_heldout")  # present where samples has those
    every_log_w = None
    if every_potential is not None:
        every_log_w = lfep_log_weights(samples.u_a_heldout, samples.logdet_heldout,
                                       np.asarray(every_potential) / problem.kt)
    structure, structure_metrics = _structure(problem, reference, samples, log_w, every_log_w,
                                              stage_seed(config, "observables"))
    metrics.update(structure_metrics)
    metrics.update(reference.diagnostics)
    metrics = {k: float(v) for k, v in metrics.items()}
    notes = {
        "estimand": problem.estimand(),
        "reference_method": reference.method,
        "estimator": "LFEP: ln N - logsumexp(u_A + log|det J| - u_B); error by the delta "
        "method sqrt((1/ESS_fraction - 1)/N)",
        "nll_convention": f"mean -log q(y) in nats over held-out reference samples of the "
        f"target ({reference.method.split(';')[-1].strip()}), density on the base's measure: "
        f"{problem.system.estimand_note}; forward_kl = nll - entropy of the target (nats)"
        if "nll" in metrics
        else "not defined",
    }
    return Estimates(metrics=metrics, log_weights=log_w, notes=notes,
                     mapped_potential=np.asarray(potentials["mapped"]), structure=structure,
                     reverse_work=reverse_work,
                     mapped_heldout_potential=None if every_potential is None
                     else np.asarray(every_potential),
                     heldout_log_weights=every_log_w)


def _normalized_weights(log_w: np.ndarray) -> np.ndarray:
    """exp(log w − max) with non-finite log weights as 0 (all 0 when none is finite)."""
    finite = np.isfinite(log_w)
    w = np.zeros_like(log_w, dtype=np.float64)
    if finite.any():
        w[finite] = np.exp(log_w[finite] - log_w[finite].max())
    return w


def _structure(problem: Problem, reference: ReferenceData, samples: SampleSet,
               log_w: np.ndarray, heldout_log_w: np.ndarray | None, seed: int
               ) -> tuple[dict[str, dict[str, Curve]], dict[str, float]]:
    """For a system with pair histograms: curves, pair type -> {sample set -> (r nm, g(r),
    bootstrap standard error of g)}, of the held-out target reference ("target MD"), its
    training part ("target MD, other frames"; no error given), the flow samples reweighted to
    the target and as drawn; and metrics, per pair type (``O_O``, ``O_H``):

    - ``rdf_<pair>_max_difference``: largest |g_flow,reweighted − g_target MD| over r;
    - ``rdf_<pair>_md_split_difference``: the same between the held-out and the training target
      MD frames (MD against MD, for scale);
    - ``rdf_<pair>_max_z``, ``rdf_<pair>_max_z_noise95``, ``rdf_<pair>_shells``: the largest
      difference in units of its bootstrap σ, shell by shell, and the 95th percentile of that
      statistic under sampling noise alone (:func:`boltzgen.observables.overlay_statistics`);

    and ``rdf_flow_frames``, ``rdf_target_frames``, ``rdf_flow_block_frames``,
    ``rdf_target_block_frames``: the frames behind each curve and the bootstrap's block length.

    With an MD reference the curves average over every frame of the held-out blocks (the
    base frames mapped by the flow, the target frames as they are): g(r) is an average, for
    which correlated frames are as valid as independent ones and about g times more
    plentiful; their errors come from the moving-block bootstrap over blocks of
    :attr:`HeldOutFrames.block_frames`. (With the ~80 decorrelated base frames of the
    ``ice.yaml`` jobs, 24–37 effective samples after reweighting, the O–H overlay statistic
    failed in one realisation and passed in another; the same jobs over all 551 held-out
    base frames gave O–H max_z 2.5 and 1.7 against noise95 3.4 and 3.1.) Otherwise: the
    decorrelated held-out frames, with the ordinary bootstrap.
    """
    if (not hasattr(problem.system, "pair_histograms") or len(samples.mapped) == 0
            or len(reference.target_test) == 0):
        return {}, {}
    every_base, every_target = reference.base_heldout, reference.target_heldout
    if heldout_log_w is not None and every_base is not None:
        flow_x, w = samples.mapped_heldout, _normalized_weights(heldout_log_w)
        flow_blocks = (every_base.segment, every_base.block_frames)
    else:
        flow_x, w, flow_blocks = samples.mapped, _normalized_weights(log_w), (None, 1)
    if every_target is not None:
        target_x = every_target.frames
        target_blocks = (every_target.segment, every_target.block_frames)
    else:
        target_x, target_blocks = reference.target_test, (None, 1)
    flow = problem.system.pair_histograms(flow_x)
    target = problem.system.pair_histograms(target_x)
    other = (problem.system.pair_histograms(reference.target_train)
             if len(reference.target_train) else {})
    curves: dict[str, dict[str, Curve]] = {}
    metrics: dict[str, float] = {
        "rdf_flow_frames": float(len(flow_x)), "rdf_target_frames": float(len(target_x)),
        "rdf_flow_block_frames": float(flow_blocks[1]),
        "rdf_target_block_frames": float(target_blocks[1]),
    }
    for pair, hist in target.items():
        name = pair.replace("-", "_")
        by_label = curves.setdefault(pair, {})
        g_target, target_replicas = _curve(hist, None, target_blocks, seed, by_label,
                                           "target MD")
        if pair in other:
            g_other = other[pair].g()
            by_label["target MD, other frames"] = (other[pair].r_nm, g_other,
                                                   np.full(len(hist.r_nm), np.nan))
            metrics[f"rdf_{name}_md_split_difference"] = float(np.abs(g_other - g_target).max())
        if w.sum() > 0:
            g_flow, flow_replicas = _curve(flow[pair], w, flow_blocks, seed + 1, by_label,
                                           "flow, reweighted")
            metrics[f"rdf_{name}_max_difference"] = float(np.abs(g_flow - g_target).max())
            overlay = overlay_statistics(g_flow, flow_replicas, g_target, target_replicas)
            metrics.update({f"rdf_{name}_{key}": value for key, value in overlay.items()})
        _curve(flow[pair], None, flow_blocks, seed + 2, by_label, "flow, as drawn")
    return curves, metrics


def _curve(hist: PairHistograms, weights: np.ndarray | None,
           blocks: tuple[np.ndarray | None, int], seed: int, by_label: dict[str, Curve],
           label: str) -> tuple[np.ndarray, np.ndarray]:
    """Store ``label``'s (r, g, bootstrap standard error; NaN with fewer than 2 frames) in
    ``by_label``; return g and its bootstrap replicas (blocks: the frames' segment labels and
    the block length, :meth:`PairHistograms.g_replicas`)."""
    g = hist.g(weights)
    segments, block_frames = blocks
    replicas = hist.g_replicas(weights, seed=seed, segments=segments,
                               block_frames=block_frames)
    err = (replicas.std(axis=0, ddof=1) if len(hist.counts) >= 2 and len(replicas) >= 2
           else np.full(len(g), np.nan))
    by_label[label] = (hist.r_nm, g, err)
    return g, replicas


def _named_free_energies(problem: Problem, reference: ReferenceData, metrics: dict[str, float]
                         ) -> dict[str, float]:
    """ΔF by estimator under its own name, in kT for the whole system and, for a molecular
    system, ``..._per_molecule`` (kT per molecule), each with its 1-sigma ``_err``:
    ``delta_f_lfep`` (= ``delta_f``; error by the delta method), ``delta_f_lbar`` (pymbar's
    asymptotic error), ``delta_f_mbar`` (the reference where it is MBAR over a temperature
    ladder; bootstrap error); LFEP and LBAR also with ``_err_bootstrap``, the standard
    deviation over bootstrap resamples of their samples."""
    out = {"delta_f_lfep": metrics["delta_f"], "delta_f_lfep_err": metrics["delta_f_err"]}
    if "delta_f_err_bootstrap" in metrics:
        out["delta_f_lfep_err_bootstrap"] = metrics["delta_f_err_bootstrap"]
    if "delta_f_lbar" in metrics:
        out["delta_f_lbar"] = metrics["delta_f_lbar"]
        out["delta_f_lbar_err"] = metrics["delta_f_lbar_err"]
        if "delta_f_lbar_err_bootstrap" in metrics:
            out["delta_f_lbar_err_bootstrap"] = metrics["delta_f_lbar_err_bootstrap"]
    if reference.method.startswith("MBAR") and "reference_delta_f" in metrics:
        out["delta_f_mbar"] = metrics["reference_delta_f"]
        out["delta_f_mbar_err"] = metrics["reference_delta_f_err"]
    molecules = problem.system.molecule_count
    if molecules:
        for name in ("delta_f_lfep", "delta_f_lbar", "delta_f_mbar"):
            if name in out:
                out[f"{name}_per_molecule"] = out[name] / molecules
                out[f"{name}_per_molecule_err"] = out[f"{name}_err"] / molecules
                if f"{name}_err_bootstrap" in out:
                    out[f"{name}_per_molecule_err_bootstrap"] = (
                        out[f"{name}_err_bootstrap"] / molecules)
    return out


def _mode_metrics(problem: Problem, mapped: np.ndarray, log_w: np.ndarray) -> dict[str, float]:
    """Largest absolute error of a mode's probability: flow samples as drawn (``mode_weight_error``)
    and importance-reweighted (``..._reweighted``), against the system's exact mode weights;
    ``..._noise`` is the largest one-sigma sampling error sqrt(p(1 − p)/N) of an exact sampler."""
    exact = problem.system.exact_mode_probabilities(problem.temperature)
    if exact is None or len(mapped) == 0:
        return {}
    labels = problem.system.mode_index(mapped)
    drawn = np.bincount(labels, minlength=len(exact)) / len(labels)
    weights = _normalized_weights(log_w)
    reweighted = np.bincount(labels, weights=weights, minlength=len(exact)) / max(
        weights.sum(), 1e-300)
    return {
        "mode_weight_error": float(np.abs(drawn - exact).max()),
        "mode_weight_error_reweighted": float(np.abs(reweighted - exact).max()),
        "mode_weight_error_noise": float(np.sqrt(exact * (1 - exact) / len(labels)).max()),
    }


@dataclass
class EstimateReport:
    """What the driver records of a job's estimates: metrics, notes, and where the figures
    were written (name -> PNG path in the campaign's work directory)."""

    metrics: dict[str, float]
    notes: dict[str, str]
    plots: dict[str, str]
    # The estimators' inputs, kT: "forward_work" w_F = u_B(T x) - u_A(x) - log|det J_T(x)|
    # for x ~ A and "reverse_work" w_R = u_A(T⁻¹ y) - u_B(y) - log|det J_T⁻¹(y)| for held-out
    # y ~ B, so that users can rerun or cross-check LFEP, LBAR and the ESS.
    works: dict[str, np.ndarray] = field(default_factory=dict)


def estimate_and_plot(
    config: Mapping[str, Any], reference: ReferenceData, samples: SampleSet,
    potentials: Mapping[str, np.ndarray], plot_dir: str
) -> EstimateReport:
    """:func:`estimate`, then :func:`figures` written as PNG files to ``plot_dir`` (runs in an
    actor, so that the driver, the single MLflow writer, only logs the files)."""
    from boltzgen.plots import save_figures

    check_injected_failure(config, "estimate")
    estimates = estimate(config, reference, samples, potentials)
    plots = save_figures(figures(config, reference, samples, estimates), plot_dir)
    works = {"forward_work": -estimates.log_weights}
    if estimates.reverse_work is not None:
        works["reverse_work"] = estimates.reverse_work
    return EstimateReport(metrics=dict(estimates.metrics), notes=dict(estimates.notes),
                          plots=plots, works=works)


def figures(
    config: Mapping[str, Any], reference: ReferenceData, samples: SampleSet, estimates: Estimates
) -> dict[str, Any]:
    """Matplotlib figures: log-weight distribution, sampled vs reference marginals, and for
    molecular systems radial distribution functions and potential-energy histograms."""
    from boltzgen.plots import log_weight_histogram, marginals

    problem = Problem.from_config(config)
    title = f"{problem.system.kind} T={problem.temperature:g}"
    sampled = problem.system.observables(samples.mapped)
    ref_obs = problem.system.observables(reference.target_test)
    log_w = estimates.log_weights
    w = _normalized_weights(log_w)
    weights = {}
    for key, values in sampled.items():
        per_sample = len(values) // len(w) if len(w) else 0
        if per_sample and per_sample * len(w) == len(values):
            weights[key] = np.repeat(w, per_sample)
    out = {
        "log_weights.png": log_weight_histogram(log_w, title),
        "marginals.png": marginals(sampled, ref_obs, weights, title),
    }
    layout = problem.system.rigid_layout()
    if layout is not None:
        from boltzgen.plots import axis_direction_maps
        from boltzgen.rigid.quaternions import quaternion_to_matrix

        def axes_of(x: np.ndarray) -> dict[str, np.ndarray]:
            _, q = layout.split(torch.as_tensor(np.array(x, dtype=np.float64)))
            columns = quaternion_to_matrix(q).numpy()  # (N, bodies, 3, 3); column a is R e_a
            return {a: columns[..., i].reshape(-1, 3) for i, a in enumerate("xyz")}

        out["axis_directions.png"] = axis_direction_maps(axes_of(samples.mapped),
                                                         axes_of(reference.target_test), title)
    curves = estimates.structure
    if curves:
        from boltzgen.plots import energy_histograms, radial_distributions

        out["radial_distributions.png"] = radial_distributions(curves, title)
        if estimates.mapped_potential is not None:
            # Every held-out frame where there are such (as for the RDFs), else the
            # decorrelated ones.
            every_base, every_target = reference.base_heldout, reference.target_heldout
            mapped_u, flow_w, base_u = estimates.mapped_potential, w, reference.base_test_potential
            if (estimates.mapped_heldout_potential is not None
                    and estimates.heldout_log_weights is not None and every_base is not None):
                mapped_u = estimates.mapped_heldout_potential
                flow_w = _normalized_weights(estimates.heldout_log_weights)
                base_u = every_base.potential
            energies = {"target MD": reference.target_test_potential if every_target is None
                        else every_target.potential,
                        "flow, reweighted": mapped_u, "flow, as drawn": mapped_u}
            if base_u is not None:
                energies["base MD (flow input)"] = base_u
            out["energy_histograms.png"] = energy_histograms(
                energies, {"flow, reweighted": flow_w}, "kJ/mol", title)
    return out
