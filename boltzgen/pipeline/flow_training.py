"""Training stage: fit the flow A -> B (maximum likelihood or the LFEP reverse-KL loss), with
checkpoints in the work directory that a restarted trainer or a relaunch continues from."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from boltzgen._files import write_atomically
from boltzgen.flows import Flow, build_flow
from boltzgen.layouts import layout_from_dict
from boltzgen.objectives import OBJECTIVES
from boltzgen.pipeline.energies import BatchEnergy
from boltzgen.pipeline.energy_backends import ENERGY_BACKENDS
from boltzgen.pipeline.problem import (
    EnergyFunction,
    Problem,
    check_injected_failure,
    float64_tensor,
    stage_seed,
)
from boltzgen.pipeline.reference import ReferenceData
from boltzgen.priors import Prior, prior_from_dict
from boltzgen.settings import JobSettings
from boltzgen.systems import make_system
from boltzgen.training import TrainingState, train_flow


@dataclass
class TrainedFlow:
    """A trained flow (its checkpoint) and the record of how training went."""

    # torch.save of {"state_dict", "flow_config", "dim", "system", "layout", "prior"}
    checkpoint: bytes
    losses: list[float]
    seconds: float
    skipped_steps: int = 0  # steps whose loss or gradient was not finite
    n_parameters: int = 0  # trainable parameters of the flow
    energy_evaluations: int = 0  # configurations whose system energy training computed
    checkpoint_path: str | None = None  # the final checkpoint in the work directory, if any
    resumed_from_step: int = 0  # optimizer steps (all phases) taken from a progress checkpoint
    steps_run: int = 0  # optimizer steps this call computed
    energy_chunks_resent: int = 0  # energy chunks evaluated again after their evaluator died
    # What the objectives recorded (adaptive tempering: the schedule of beta per accepted step,
    # and the beta reached): MLflow series and metrics.
    series: dict[str, list[float]] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = math.nan  # CPU time of the training process (all threads), this call


PROGRESS_FILE = "progress.pt"


def train(settings: JobSettings | Mapping[str, Any], reference: ReferenceData | None,
          device: str = "cpu",
          checkpoint_dir: str | None = None, energy: EnergyFunction | None = None,
          checkpoint_every: int = 0,
          on_step: Callable[[int, int, float], None] | None = None) -> TrainedFlow:
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

    ``on_step(step, steps, loss)``: called after every optimizer step with the steps done and
    due over all phases (a progress display).
    """
    job = JobSettings.of(settings)
    check_injected_failure(job, "train")
    start, cpu_start = time.perf_counter(), time.process_time()
    problem = Problem.from_settings(job)
    seed = stage_seed(job, "train")
    torch.manual_seed(seed)
    flow = problem.build_flow(job.flow).to(device)
    generator = torch.Generator().manual_seed(seed)
    training = job.training
    augment = bool(training.symmetry_augmentation)
    energies = _TrainingEnergies(problem, flow, energy, training.energy_cap_kt,
                                 ENERGY_BACKENDS.get(job.energy.backend).training_potential(
                                     problem.system, job.energy) if energy is None else None)
    sample_a = _base_batches(problem, flow, reference, generator, energies, augment, device)
    if (job.flow.parameters().get("thermal_scaling") and problem.base.temperature_ladder
            and reference is not None and len(reference.base_train)):
        # A harmonic crystal's ensembles at T_A and T map onto each other by scaling every
        # displacement from the mean structure by sqrt(T / T_A) (ThermalScalingLayer).
        flow.fit_thermal_scaling(float64_tensor(reference.base_train).to(device),
                                 math.sqrt(problem.temperature / problem.base.temperature))
    # None: a data-free job's training, which waits for no reference (job_graph).
    target_train = (float64_tensor(reference.target_train).to(device) if reference is not None
                    else torch.zeros((0, problem.system.dim), dtype=torch.float64, device=device))
    progress = _Progress(job, checkpoint_dir if checkpoint_every > 0 else None)
    saved = progress.load()
    if (saved is None and problem.system.supports_ideal_coordinates()
            and type(flow).fit_to_structure is not Flow.fit_to_structure):
        # e.g. internal-coordinate centres at the minimised structure (no data needed)
        flow.fit_to_structure(float64_tensor(problem.system.ideal_coordinates()).to(device))
    if (saved is None and len(target_train)
            and OBJECTIVES.get(training.objective).needs_target_data(training)):
        flow.fit_to_data(target_train)  # e.g. a normalization; a resumed state already has it
    if augment and len(target_train):
        target_train = SymmetryImages(problem.system, target_train)
    phases = OBJECTIVES.get(training.objective).phases(training)
    checkpoint_every = checkpoint_every if progress.path is not None else 0
    losses: list[float] = []
    series: dict[str, list[float]] = {}
    summary: dict[str, float] = {}
    skipped = first_phase = resumed = 0
    if saved is not None:
        flow.load_state_dict(saved["flow"])
        generator.set_state(saved["generator"])
        losses, skipped, first_phase = saved["losses"], saved["skipped"], saved["phase"]
        energies.evaluations = saved["evaluations"]
        series, summary = saved.get("series", {}), saved.get("summary", {})
        resumed = len(losses) + saved["state"].step
    steps_due = sum(steps for _, steps in phases)
    for index in range(first_phase, len(phases)):
        objective, steps = phases[index]
        done_before = list(losses), skipped

        def step_done(step: int, loss: float, offset: int = sum(
                n for _, n in phases[:index])) -> None:
            if on_step is not None:
                on_step(offset + step, steps_due, loss)

        def save(state: TrainingState, index: int = index,
                 done_before: tuple[list[float], int] = done_before,
                 recorded: tuple[dict, dict] = (dict(series), dict(summary))) -> None:
            progress.save({"phase": index, "state": state, "flow": flow.state_dict(),
                           "generator": generator.get_state(), "losses": done_before[0],
                           "skipped": done_before[1], "evaluations": energies.evaluations,
                           "series": recorded[0], "summary": recorded[1]})

        result = train_flow(
            flow, OBJECTIVES.get(objective).from_settings(training), steps,
            training.batch_size, training.learning_rate,
            u_a=energies.u_a, u_b=energies.u_b, sample_a=sample_a,
            data_b=target_train, seed=seed + index,
            final_learning_rate=training.final_learning_rate,
            resume=saved["state"] if saved is not None and index == first_phase else None,
            checkpoint_every=checkpoint_every, on_checkpoint=save, on_step=step_done,
        )
        losses += result.losses
        skipped += result.n_skipped
        series.update(result.series)
        summary.update(result.summary)
    checkpoint = _checkpoint_bytes(flow, job, problem)
    path = _save_checkpoint(checkpoint, checkpoint_dir) if checkpoint_dir else None
    n_parameters = sum(p.numel() for p in flow.parameters() if p.requires_grad)
    return TrainedFlow(checkpoint, losses, time.perf_counter() - start, skipped,
                       n_parameters, energies.evaluations, path, resumed, len(losses) - resumed,
                       series=series, summary=summary,
                       cpu_seconds=time.process_time() - cpu_start)


class _TrainingEnergies:
    """The reduced energies training needs (kT): u_A of base batches and u_B of mapped ones,
    by the system's potential or ``energy`` (a batch function over the EnergyEvaluator pool),
    counting the configurations sent to it. A batch drawn from an MD pool whose u_A is known
    (:func:`_base_batches` stores it in ``known``) costs no energy call."""

    def __init__(self, problem: Problem, flow: Flow, energy: EnergyFunction | None,
                 energy_cap_kt: float | None = None,
                 potential: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.problem, self.flow, self.energy = problem, flow, energy
        self.energy_cap_kt = energy_cap_kt  # training.energy_cap_kt
        # The backend's own in-process U (torch_forcefield), else the system's potential.
        self.own_potential = potential or problem.system.potential
        self.evaluations = 0  # rows sent to the system's energy (OpenMM for molecules)
        self.known: dict[str, torch.Tensor] = {}  # the latest base batch and its u_A

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        self.evaluations += len(x)
        if self.energy is None:
            return self.own_potential(x)
        return BatchEnergy.apply(x, self.energy)

    def u_a(self, x: torch.Tensor) -> torch.Tensor:
        if self.known.get("x") is x:
            return self.known["u"]
        problem = self.problem
        if problem.base.samples_directly:
            return self.flow.prior.reduced_energy(x)
        return self.potential(x) / (problem.system.boltzmann_constant * problem.base.temperature)

    def u_b(self, y: torch.Tensor) -> torch.Tensor:
        u = self.potential(y) / self.problem.kt
        cap = self.energy_cap_kt
        if cap is None:
            return u
        # c + ln(1 + u − c) above the cap (training.energy_cap_kt); clamped inside the log so
        # that no NaN from the branch not taken reaches the gradient.
        return torch.where(u > cap, cap + torch.log1p((u - cap).clamp(min=0.0)), u)


def _base_batches(problem: Problem, flow: Flow, reference: ReferenceData | None,
                  generator: torch.Generator, energies: _TrainingEnergies, augment: bool,
                  device: str) -> Callable[[int], torch.Tensor]:
    """Batches x ~ A: drawn by the flow's prior where the base has a density it samples
    directly, else drawn with replacement from the reference's base frames (with
    ``augment``, their images under the crystal's space group; an image has its frame's
    potential, U being invariant under the group)."""
    if problem.base.samples_directly:

        def from_prior(n: int) -> torch.Tensor:
            return flow.prior.sample(n, generator).to(device)

        return from_prior
    assert reference is not None  # job_graph gives training the reference of such a base
    frames = float64_tensor(reference.base_train)
    pool = SymmetryImages(problem.system, frames) if augment else frames
    pool_u = None if reference.base_train_potential is None else float64_tensor(
        reference.base_train_potential) / (problem.system.boltzmann_constant
                                           * problem.base.temperature)

    def from_frames(n: int) -> torch.Tensor:
        index = torch.randint(len(pool), (n,), generator=generator)
        x = pool[index].to(device)
        if pool_u is not None:  # remember u_A of this batch: no energy call for it
            energies.known["x"], energies.known["u"] = x, pool_u[index % len(frames)].to(device)
        return x

    return from_frames


def _checkpoint_bytes(flow: Flow, job: JobSettings, problem: Problem) -> bytes:
    """torch.save of the flow's state (CPU tensors, loadable anywhere), its settings, the
    system, the layout and the prior (:func:`load_flow`)."""
    buffer = io.BytesIO()
    torch.save(
        {
            "state_dict": {k: v.cpu() for k, v in flow.state_dict().items()},
            "flow_config": dict(job.dump["flow"]),
            "dim": problem.system.dim,
            "system": dict(job.dump["system"]),
            "layout": flow.layout.to_dict(),
            "prior": flow.prior.to_dict(),
        },
        buffer,
    )
    return buffer.getvalue()


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

    def __init__(self, job: JobSettings, directory: str | None) -> None:
        self.path = Path(directory) / PROGRESS_FILE if directory else None
        self.key = json.dumps(job.dump, sort_keys=True, default=str)

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


def load_flow(checkpoint: bytes, prior: Prior | None = None) -> Flow:
    """The flow of a :func:`train` checkpoint, in eval mode, with its layout and prior.

    A checkpoint saved before layouts were stored gets its system's layout (or R^dim); one
    saved before priors were stored gets ``prior`` (the job's base, where the caller knows it)
    or the layout's default prior; a flow that owns its prior (``owns_prior``) keeps its own.
    """
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    if "layout" in state:
        layout = layout_from_dict(state["layout"])
    elif "system" in state or "dim" in state:
        layout = make_system(state["system"]).layout() if "system" in state else state["dim"]
    else:
        raise ValueError("checkpoint: it holds neither a layout nor a system; it is not a flow "
                         "checkpoint of boltzgen.pipeline.train")
    flow = build_flow(layout, state["flow_config"])
    if "prior" in state:
        flow.prior = prior_from_dict(flow.layout, state["prior"])
    elif prior is not None and not flow.owns_prior:
        flow.prior = prior
    flow.load_state_dict(state["state_dict"])
    return flow.eval()


