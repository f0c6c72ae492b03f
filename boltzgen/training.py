"""Stochastic-gradient training of a flow with the objectives of :mod:`boltzgen.objectives`.

Adam (Kingma & Ba 2015) with a cosine decay of the learning rate from ``learning_rate`` to
``final_learning_rate`` (Loshchilov & Hutter 2017):

    lr_t = lr_end + (lr_0 - lr_end) (1 + cos(pi t / steps)) / 2,   t = 0 .. steps - 1,

and gradient-norm clipping. A step whose loss or gradient norm is not finite is skipped
(no parameter update) and counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from boltzgen._checks import check_float, check_int
from boltzgen.objectives import OBJECTIVES, Objective


@dataclass
class TrainingResult:
    """Loss per step (kT; NaN/inf where the step was skipped) and wall-clock seconds."""

    losses: list[float]
    seconds: float
    n_skipped: int = 0  # steps skipped because the loss or the gradient norm was not finite
    # What the objective recorded over the run (an annealing schedule): Objective.series and
    # Objective.summary.
    series: dict[str, list[float]] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingState:
    """Where a run of :func:`train_flow` stands after ``step`` optimizer steps: enough, with
    the flow's own parameters, to continue it exactly (Adam moments, the minibatch generator,
    the losses so far)."""

    step: int
    optimizer: dict[str, Any]
    generator: torch.Tensor
    losses: list[float] = field(default_factory=list)
    n_skipped: int = 0
    # What a changing objective (an annealed temperature) needs to go on (a state saved
    # before objectives had one lacks it: read with getattr).
    objective: dict[str, Any] = field(default_factory=dict)


def train_flow(
    flow: nn.Module,
    objective: str | Objective,
    steps: int,
    batch_size: int,
    learning_rate: float,
    *,
    u_a: Callable[[torch.Tensor], torch.Tensor],
    u_b: Callable[[torch.Tensor], torch.Tensor],
    sample_a: Callable[[int], torch.Tensor] | None,
    data_b: torch.Tensor | Any | None,
    seed: int = 0,
    final_learning_rate: float | None = None,
    grad_clip: float = 10.0,
    resume: TrainingState | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[TrainingState], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Train ``flow`` in place.

    Args:
        objective: a registered objective (:data:`boltzgen.objectives.OBJECTIVES`) by name,
            or an instance: "reverse_kl" (batches x ~ A from ``sample_a(batch_size)``; the
            sampler owns its randomness) or "maximum_likelihood" (minibatches of ``data_b``
            (M, dim) at random indices drawn from a torch.Generator seeded with ``seed``).
        steps, batch_size: number of optimizer steps and samples per step.
        learning_rate: initial Adam learning rate; decays by a cosine to
            ``final_learning_rate`` (default learning_rate / 10).
        u_a, u_b: reduced energies (kT) of states A and B, (batch, dim) -> (batch,).
        grad_clip: maximum global gradient norm.
        resume: continue from this state (the flow must already hold the parameters saved with
            it); the result is the same as that of an uninterrupted run.
        checkpoint_every, on_checkpoint: call ``on_checkpoint`` with the state after every
            ``checkpoint_every`` steps and after the last one (0: never).
        on_step: called with (steps done, loss) after every step (progress displays).
    """
    chosen = OBJECTIVES.get(objective)() if isinstance(objective, str) else objective
    steps = check_int("steps", steps, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    lr0 = check_float("learning_rate", learning_rate, positive=True)
    lr_end = lr0 / 10.0 if final_learning_rate is None else final_learning_rate
    lr_end = check_float("final_learning_rate", lr_end, positive=True)
    grad_clip = check_float("grad_clip", grad_clip, positive=True)
    seed = check_int("seed", seed)
    chosen.validate(sample_a, data_b)

    params = [p for p in flow.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    n_skipped = 0
    first = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        gen.set_state(resume.generator)
        losses, n_skipped, first = list(resume.losses), resume.n_skipped, resume.step
        chosen.load_state_dict(getattr(resume, "objective", {}))
    start = time.perf_counter()
    was_training = flow.training
    flow.train()

    def checkpoint(done: int) -> None:
        if on_checkpoint is not None and checkpoint_every > 0 and (
                done % checkpoint_every == 0 or done == steps):
            on_checkpoint(TrainingState(done, optimizer.state_dict(), gen.get_state(),
                                        list(losses), n_skipped, chosen.state_dict()))

    for step in range(first, steps):
        if chosen.finished():  # an annealing schedule at its end: the phase is done
            if on_checkpoint is not None and checkpoint_every > 0 and step % checkpoint_every:
                on_checkpoint(TrainingState(step, optimizer.state_dict(), gen.get_state(),
                                            list(losses), n_skipped, chosen.state_dict()))
            break
        for group in optimizer.param_groups:
            group["lr"] = chosen.learning_rate(step, steps, lr0, lr_end)
        loss = chosen.loss(flow, step, batch_size, gen, u_a, u_b, sample_a, data_b)
        value = float(loss.detach())
        losses.append(value)
        if on_step is not None:
            on_step(step + 1, value)
        if not math.isfinite(value) or not loss.requires_grad:
            n_skipped += 1
            checkpoint(step + 1)
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if not bool(torch.isfinite(grad_norm)):
            n_skipped += 1
            optimizer.zero_grad(set_to_none=True)
            checkpoint(step + 1)
            continue
        optimizer.step()
        checkpoint(step + 1)
    else:
        if not chosen.finished():
            chosen.check_budget(steps)
    flow.train(was_training)
    return TrainingResult(losses=losses, seconds=time.perf_counter() - start, n_skipped=n_skipped,
                          series=chosen.series(), summary=chosen.summary())
