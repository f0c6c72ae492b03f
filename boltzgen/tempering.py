"""Data-free training with adaptive tempering (Stupp & Koutsourelakis 2025).

The flow q is trained by the reverse KL divergence to the tempered target p_β ∝ exp(−β u),
u the reduced energy at the job's temperature (kT), from model samples only:

    L_β = E_q[log q(y) + β u(y)] = KL(q ‖ p_β) − ln Z_β,        y = T(x), x ~ prior,

with log q(y) = log p(x) − log|det J_T(x)|. β starts at ``beta0`` (the paper: 1e-2 for the
double well, 1e-3 for the Gaussian mixture, 1e-4 for alanine dipeptide), where p_β is nearly
flat and q spreads over every mode, and rises to 1 in steps chosen from the current model.

The step (after ``steps_per_level`` optimizer steps at β): draw M = ``check_samples`` samples
y_i ~ q and estimate, by self-normalized importance sampling, the KL divergence of q to p_β',

    KL̂(β') = ln[(1/M) Σ_i exp(ℓ_i(β'))] − (1/M) Σ_i ℓ_i(β'),    ℓ_i(β') = −β' u(y_i) − log q(y_i)

(Jensen: KL̂ ≥ 0; the first term estimates ln Z_β' − ln Z_q, the second E_q[−β' u − log q]).
The proposal β' = 1 is shrunk, Δβ ← ``shrink`` · Δβ (paper: 0.6), until the increase
KL̂(β + Δβ) − KL̂(β) is at most ``delta`` nats (paper: 0.1-0.2): the model trained at β must be
a good enough importance sampler of the next target for training there to start from it. The
same M samples serve every proposal, so a step costs M energy evaluations. When β reaches 1
the tempering phase ends and plain reverse KL at β = 1 follows for ``final_steps`` steps (the
paper trains at β = 1 twice as long as at the other levels).

A schedule that cannot advance (Δβ shrunk below ``min_step``) or has not reached β = 1 when
the phase's budget (``training.steps``) runs out fails the job with that cause and the β
reached. Samples whose energy is not finite (an OpenMM blow-up) are counted per check and
given zero weight (left out of both sums of KL̂ and of the training loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from boltzgen.objectives import OBJECTIVES, EnergyFn, Objective, reverse_kl_loss
from boltzgen.settings import SettingError, TemperingSettings

if TYPE_CHECKING:
    from boltzgen.settings import JobSettings, TrainingSettings
    from boltzgen.systems.base import System

__all__ = ["AdaptiveTempering", "TemperingStalled", "importance_weighted_kl"]


class TemperingStalled(RuntimeError):
    """The schedule cannot reach β = 1 (a step below the floor, or the step budget spent)."""


def importance_weighted_kl(log_q: torch.Tensor, u: torch.Tensor, beta: float) -> float:
    """KL̂(q ‖ p_β) in nats from samples of q (module docstring): log q(y_i) and the reduced
    energies u(y_i) (kT), rows with a non-finite u or log q left out (weight zero)."""
    ell = -beta * u - log_q
    ell = ell[torch.isfinite(ell)]
    if len(ell) == 0:
        return math.nan
    return float(torch.logsumexp(ell, 0) - math.log(len(ell)) - ell.mean())


@OBJECTIVES.register("adaptive_tempering")
class AdaptiveTempering(Objective):
    """Reverse KL to p_β with β raised adaptively from ``training.tempering.beta0`` to 1
    (module docstring), then ``final_steps`` of reverse KL at β = 1."""

    uses_tempering: ClassVar[bool] = True
    trains_on_energy: ClassVar[bool] = True
    reads_forward_kl_weight: ClassVar[bool] = True

    def __init__(self, settings: TemperingSettings,
                 forward_kl_weight: float | None = None) -> None:
        self.settings = settings
        self.forward_kl_weight = forward_kl_weight  # training.forward_kl_weight, at every β
        self.beta = float(settings.beta0)
        self.level_start = 0  # optimizer step at which training at the current β began
        # One entry per accepted step: what the MLflow series and the schedule plot show.
        self.levels: list[dict[str, float]] = []
        self.nonfinite = 0  # samples with a non-finite energy seen by the checks

    # -- settings ---------------------------------------------------------------------------
    @classmethod
    def phases(cls, training: TrainingSettings) -> list[tuple[str, int]]:
        tempering = training.tempering or TemperingSettings()
        return [(cls.name, training.steps), ("reverse_kl", tempering.final_steps)]

    @classmethod
    def from_settings(cls, training: TrainingSettings) -> AdaptiveTempering:
        return cls(training.tempering or TemperingSettings(), training.forward_kl_weight)

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        tempering = job.training.tempering or TemperingSettings()
        if tempering.steps_per_level > job.training.steps:
            yield SettingError("training.tempering.steps_per_level", tempering.steps_per_level,
                               f"must be at most training.steps ({job.training.steps}), the "
                               "budget of the tempering phase")
        if job.training.warm_start_steps is not None:
            yield SettingError("training.warm_start_steps", job.training.warm_start_steps,
                               "adaptive tempering trains from the energy alone; leave it out")

    def validate(self, sample_a: Callable[[int], torch.Tensor] | None,
                 data_b: torch.Tensor | Any | None) -> None:
        if sample_a is None:
            raise ValueError("sample_a: None is not allowed for objective 'adaptive_tempering'; "
                             "pass a sampler of the flow's prior")

    # -- training ---------------------------------------------------------------------------
    def learning_rate(self, step: int, steps: int, lr0: float, lr_end: float) -> float:
        """Constant while tempering: the phase's length is not known in advance (the cosine
        decay belongs to the β = 1 phase that follows)."""
        return lr0

    def finished(self) -> bool:
        return self.beta >= 1.0

    def loss(self, flow: nn.Module, step: int, batch_size: int, generator: torch.Generator,
             u_a: EnergyFn, u_b: EnergyFn, sample_a: Callable[[int], torch.Tensor] | None,
             data_b: torch.Tensor | Any | None) -> torch.Tensor:
        assert sample_a is not None  # validate() refused a missing sampler
        if step - self.level_start >= self.settings.steps_per_level:
            self._advance(flow, step, u_a, u_b, sample_a)
        beta = self.beta
        # The reverse KL to the tempered target β u_B: E[β u_B(T x) − log|det J| − u_A(x)],
        # u_A = −log p of the normalized prior, so the per-sample term is log q + β u_B; with
        # forward_kl_weight, plus the reweighted forward KL to p_β.
        return reverse_kl_loss(flow, sample_a(batch_size), u_a, lambda y: beta * u_b(y),
                               self.forward_kl_weight)

    def check_budget(self, steps: int) -> None:
        """Called when the phase's ``steps`` are spent: a schedule short of β = 1 fails."""
        if self.beta < 1.0:
            raise TemperingStalled(
                f"training.steps: the adaptive tempering schedule reached beta = "
                f"{self.beta:.6g} after {steps} steps ({len(self.levels)} steps of beta); "
                "raise training.steps, or training.tempering.delta for larger steps")

    def _advance(self, flow: nn.Module, step: int, u_a: EnergyFn, u_b: EnergyFn,
                 sample_a: Callable[[int], torch.Tensor]) -> None:
        s = self.settings
        with torch.no_grad():
            x = sample_a(s.check_samples)
            y, logdet = flow(x)
            log_q = -u_a(x) - logdet
            u = u_b(y)
        bad = ~(torch.isfinite(u) & torch.isfinite(log_q))
        self.nonfinite += int(bad.sum())
        log_q, u = log_q[~bad], u[~bad]
        kl_now = importance_weighted_kl(log_q, u, self.beta)
        delta_beta, shrinks = 1.0 - self.beta, 0
        while True:
            increase = importance_weighted_kl(log_q, u, self.beta + delta_beta) - kl_now
            if math.isfinite(increase) and increase <= s.delta:
                break
            delta_beta *= s.shrink
            shrinks += 1
            if delta_beta < s.min_step:
                raise TemperingStalled(
                    f"training.tempering.min_step: the step of beta shrank below "
                    f"{s.min_step:g} at beta = {self.beta:.6g} (step {step}; KL estimate "
                    f"{kl_now:.4g} nats, {int(bad.sum())} of {len(bad)} samples with a "
                    "non-finite energy); train longer per level or raise delta")
        self.beta = 1.0 if self.beta + delta_beta >= 1.0 - 1e-12 else self.beta + delta_beta
        self.level_start = step
        self.levels.append({"step": float(step), "beta": self.beta, "delta_beta": delta_beta,
                            "kl_estimate": kl_now, "kl_increase": increase,
                            "shrinks": float(shrinks), "nonfinite": float(int(bad.sum()))})

    # -- what is recorded and checkpointed ---------------------------------------------------
    def series(self) -> dict[str, list[float]]:
        """Per accepted step of β (MLflow series, index = the step's number): the new β, Δβ,
        the KL estimate at the old β and its increase at the new one (nats), the optimizer
        step at which it was taken."""
        keys = {"beta": "tempering_beta", "delta_beta": "tempering_delta_beta",
                "kl_estimate": "tempering_kl_estimate_nats",
                "kl_increase": "tempering_kl_increase_nats", "step": "tempering_at_step"}
        return {name: [level[key] for level in self.levels] for key, name in keys.items()}

    def summary(self) -> dict[str, float]:
        return {"tempering_beta_reached": self.beta,
                "tempering_levels": float(len(self.levels)),
                "tempering_nonfinite_energies": float(self.nonfinite),
                "tempering_steps": float(self.levels[-1]["step"]) if self.levels else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "level_start": self.level_start,
                "levels": [dict(level) for level in self.levels], "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.beta, self.level_start = float(state["beta"]), int(state["level_start"])
            self.levels = [dict(level) for level in state["levels"]]
            self.nonfinite = int(state["nonfinite"])
