"""Training stage: fit the flow A -> B (maximum likelihood or the LFEP reverse-KL loss), with
checkpoints in the work directory that a restarted trainer or a relaunch continues from."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from boltzgen._files import write_atomically
from boltzgen.bases import AnalyticBase, ThermodynamicBase
from boltzgen.flows import build_flow
from boltzgen.pipeline.energies import BatchEnergy
from boltzgen.pipeline.problem import (
    EnergyFunction,
    Problem,
    check_injected_failure,
    float64_tensor,
    stage_seed,
)
from boltzgen.pipeline.reference import ReferenceData
from boltzgen.systems import make_system
from boltzgen.training import TrainingState, train_flow


@dataclass
class TrainedFlow:
    """A trained flow (its checkpoint) and the record of how training went."""

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


PROGRESS_FILE = "progress.pt"


def train(config: Mapping[str, Any], reference: ReferenceData, device: str = "cpu",
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
        frames = float64_tensor(reference.base_train)
        # With symmetry_augmentation, images of the frames under the crystal's space group;
        # an image has the frame's potential (U is invariant under the group).
        pool = SymmetryImages(problem.system, frames) if augment else frames
        pool_u = None if reference.base_train_potential is None else float64_tensor(
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
        flow.fit_thermal_scaling(float64_tensor(reference.base_train).to(device),
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

    target_train = float64_tensor(reference.target_train).to(device)
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
    steps_due = sum(steps for _, steps in phases)
    for index in range(first_phase, len(phases)):
        objective, steps = phases[index]
        done_before = list(losses), skipped

        def step_done(step: int, loss: float, offset: int = sum(
                n for _, n in phases[:index])) -> None:
            if on_step is not None:
                on_step(offset + step, steps_due, loss)

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
            checkpoint_every=checkpoint_every, on_checkpoint=save, on_step=step_done,
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


