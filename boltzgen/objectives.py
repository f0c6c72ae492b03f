"""Training objectives for a flow T from state A (base side) to state B (target side).

Reduced units (kT). With log w(x) = u_A(x) + log|det J_T(x)| - u_B(T(x)) (docs/architecture.md,
Conventions):

- Reverse KL / LFEP loss, x ~ A:  L = E_A[-log w] = KL(T#A || B) + ΔF >= ΔF = f_B - f_A
  (Gibbs/Jensen bound; Wirnsberger et al. 2020). With a normalized Gaussian base
  (f_A = 0) this is the data-free energy-based loss E_q[log q(y) + u_B(y)] of Noé et al. 2019
  and Stupp & Koutsourelakis 2025, from model samples only.
- Reverse KL plus a reweighted forward KL, x ~ A, weight λ (``training.forward_kl_weight``):
  L = E_A[-log w] + λ Σ_i w̄_i [-log q(y_i)], y_i = T x_i held fixed, w̄_i = w_i / Σ_j w_j. The
  second term is the forward KL(B || T#A) up to a constant, estimated from the flow's own
  samples by self-normalized importance sampling (no data). Its gradient moves probability
  between well-separated modes directly (through log q of each mode's samples), where reverse
  KL moves it only through the few samples that fall between them (mode weights drift slowly).
- Flow matching (continuous flows, :mod:`boltzgen.flow_matching`): regress the flow's velocity
  onto straight paths between paired prior and data samples; no ODE, no energy.
- Maximum likelihood / forward KL, y ~ B:  L = E_B[u_A(T^-1 y) - log|det J_{T^-1}(y)|]. When
  exp(-u_A) is a normalized density this is the negative log-likelihood -E_B[log q(y)] of the
  data under the flow; in general it is KL(B || T#A) up to a constant.

Samples whose per-sample term is not finite are excluded from the mean. To keep their
non-finite values out of the gradient, the loss is recomputed on the finite subset only (the
common all-finite case costs a single pass). If no term is finite the loss is a NaN tensor
that does not require grad; :func:`boltzgen.training.train_flow` skips such steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from boltzgen.registry import Registry
from boltzgen.settings import SettingError

if TYPE_CHECKING:
    from boltzgen.settings import JobSettings, TrainingSettings
    from boltzgen.systems.base import System

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


def _finite_terms(
    per_sample: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor | None:
    """The per-sample terms of the rows whose term is finite (recomputed on those rows when
    some are not, so that no non-finite value reaches the gradient); None if none is."""
    terms = per_sample(inputs)
    finite = torch.isfinite(terms)
    if bool(finite.all()):
        return terms
    if not bool(finite.any()):
        return None
    return per_sample(inputs[finite])


def _finite_mean(
    per_sample: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    terms = _finite_terms(per_sample, inputs)
    return inputs.new_tensor(float("nan")) if terms is None else terms.mean()


def _negative_log_likelihood(flow: nn.Module, y: torch.Tensor, u_a: EnergyFn) -> torch.Tensor:
    """−log q(y) per sample, u_A(T⁻¹ y) − log|det J_T⁻¹(y)| (kT), by the flow's inverse."""
    x, logdet_inv = flow.inverse(y)
    return u_a(x) - logdet_inv


def reverse_kl_loss(
    flow: nn.Module, x_a: torch.Tensor, u_a: EnergyFn, u_b: EnergyFn,
    forward_kl_weight: float | None = None,
) -> torch.Tensor:
    """mean over x ~ A of t = -log w = u_B(T x) - log|det J_T(x)| - u_A(x), in kT (upper bound
    on ΔF); with ``forward_kl_weight`` λ, plus λ times the reweighted forward KL of the same
    batch (module docstring):

        L = mean_i t_i + λ · Σ_i softmax(−t)_i · [u_A(T⁻¹ y_i) − log|det J_T⁻¹(y_i)|],

    the weights and y_i = T(x_i) detached, so the second term's gradient is the importance-
    weighted maximum-likelihood gradient −Σ w̄_i ∇ log q(y_i) (an inverse pass of the flow;
    of the slow part alone where the flow has one, :meth:`Flow.slow_log_density`).

    ``x_a`` (batch, dim) samples of A; ``u_a``, ``u_b`` reduced energies (batch, dim) -> (batch,).
    Rows whose t_i is not finite are left out of both sums (recomputed without them, so no
    non-finite value reaches the gradient); rows whose −log q is not finite, out of the
    forward one; NaN if no row is finite.
    """
    mapped: dict[str, torch.Tensor] = {}

    def per_sample(x: torch.Tensor) -> torch.Tensor:
        y, logdet = flow(x)
        mapped["y"] = y  # of the rows kept, for the forward term
        return u_b(y) - logdet - u_a(x)

    terms = _finite_terms(per_sample, x_a)
    if terms is None:
        return x_a.new_tensor(float("nan"))
    if not forward_kl_weight:
        return terms.mean()
    y = mapped["y"].detach()
    slow = flow.slow_log_density(y)
    # the modes' weights live in the slow density where the flow has one (its docstring)
    nll = -slow if slow is not None else _negative_log_likelihood(flow, y, u_a)
    usable = torch.isfinite(nll)
    weights = torch.softmax(-terms.detach()[usable], 0)
    return terms.mean() + forward_kl_weight * (weights * nll[usable]).sum()


def maximum_likelihood_loss(flow: nn.Module, y_b: torch.Tensor, u_a: EnergyFn) -> torch.Tensor:
    """mean over y ~ B of u_A(T^-1 y) - log|det J_{T^-1}(y)|, in kT.

    This is the negative log-likelihood of the data under the flow when exp(-u_A) is normalized.

    ``y_b`` (batch, dim) data from B; ``u_a`` reduced energy of A, (batch, dim) -> (batch,).
    """

    return _finite_mean(lambda y: _negative_log_likelihood(flow, y, u_a), y_b)


class Objective:
    """A training objective, registered in :data:`OBJECTIVES` under ``training.objective``.

    One instance per phase of a training run: :meth:`validate` checks the inputs before the
    first step and :meth:`loss` makes step ``step``'s loss. An objective that changes during
    training (an annealed temperature) keeps what changes in the instance and returns it from
    :meth:`state_dict`, which training checkpoints save and restore. ``phases`` says which
    objectives a job's training runs, in order, for how many steps (a warm start is a phase).
    """

    name: ClassVar[str]

    @classmethod
    def phases(cls, training: TrainingSettings) -> list[tuple[str, int]]:
        """(objective name, steps) of each training phase; by default this objective alone."""
        return [(cls.name, training.steps)]

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        """How this objective goes with the job's other settings (nothing to say by default)."""
        return iter(())

    @classmethod
    def needs_target_data(cls, training: TrainingSettings) -> bool:
        """Whether any phase trains on samples of the target (a data-free job has none)."""
        return any(OBJECTIVES.get(name).trains_on_target_data
                   for name, _ in cls.phases(training))

    trains_on_target_data: ClassVar[bool] = False
    uses_coupling: ClassVar[bool] = False  # reads training.coupling / sigma_min (flow matching)
    uses_tempering: ClassVar[bool] = False  # reads training.tempering (adaptive tempering)
    trains_on_energy: ClassVar[bool] = False  # its loss reads u_B (training.energy_cap_kt)
    reads_forward_kl_weight: ClassVar[bool] = False  # training.forward_kl_weight

    @classmethod
    def from_settings(cls, training: TrainingSettings) -> Objective:
        """The instance a job's training runs (objectives with settings of their own read
        them from ``training``)."""
        return cls()

    def validate(self, sample_a: Callable[[int], torch.Tensor] | None,
                 data_b: torch.Tensor | Any | None) -> None:
        """Refuse inputs the objective cannot train from (ValueError naming the argument)."""

    def loss(self, flow: nn.Module, step: int, batch_size: int, generator: torch.Generator,
             u_a: EnergyFn, u_b: EnergyFn, sample_a: Callable[[int], torch.Tensor] | None,
             data_b: torch.Tensor | Any | None) -> torch.Tensor:
        raise NotImplementedError

    def learning_rate(self, step: int, steps: int, lr0: float, lr_end: float) -> float:
        """Step ``step``'s learning rate: by default the cosine decay from lr0 to lr_end over
        the phase's ``steps`` (:mod:`boltzgen.training`)."""
        return lr_end + 0.5 * (lr0 - lr_end) * (1.0 + math.cos(math.pi * step / steps))

    def finished(self) -> bool:
        """True when the phase is done before its ``steps`` are spent (an annealing schedule
        that has reached its end); never, by default."""
        return False

    def check_budget(self, steps: int) -> None:
        """Called when the phase has spent all its ``steps``: raise if that leaves the
        objective short of its goal (nothing to check by default)."""

    def series(self) -> dict[str, list[float]]:
        """Named values over the phase (recorded as MLflow series); none by default."""
        return {}

    def summary(self) -> dict[str, float]:
        """Numbers that sum up the phase (recorded as metrics); none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (stateless objectives have nothing)."""


OBJECTIVES: Registry[Objective] = Registry("objective", field="training.objective")


@OBJECTIVES.register("reverse_kl")
class ReverseKL(Objective):
    """The LFEP / reverse-KL loss on batches x ~ A (:func:`reverse_kl_loss`), after
    ``warm_start_steps`` maximum-likelihood steps where the settings ask for them; with
    ``forward_kl_weight`` λ > 0, plus λ times the reweighted forward KL of the same batch."""

    trains_on_energy: ClassVar[bool] = True
    reads_forward_kl_weight: ClassVar[bool] = True

    def __init__(self, forward_kl_weight: float | None = None) -> None:
        self.forward_kl_weight = forward_kl_weight

    @classmethod
    def from_settings(cls, training: TrainingSettings) -> ReverseKL:
        return cls(training.forward_kl_weight)

    @classmethod
    def phases(cls, training: TrainingSettings) -> list[tuple[str, int]]:
        warm = [("maximum_likelihood", training.warm_start_steps)] if (
            training.warm_start_steps) else []
        return [*warm, (cls.name, training.steps)]

    def validate(self, sample_a: Callable[[int], torch.Tensor] | None,
                 data_b: torch.Tensor | Any | None) -> None:
        if sample_a is None:
            raise ValueError("sample_a: None is not allowed for objective 'reverse_kl'; pass a "
                             "sampler of A")

    def loss(self, flow: nn.Module, step: int, batch_size: int, generator: torch.Generator,
             u_a: EnergyFn, u_b: EnergyFn, sample_a: Callable[[int], torch.Tensor] | None,
             data_b: torch.Tensor | Any | None) -> torch.Tensor:
        assert sample_a is not None  # validate() refused a missing sampler
        return reverse_kl_loss(flow, sample_a(batch_size), u_a, u_b, self.forward_kl_weight)


@OBJECTIVES.register("maximum_likelihood")
class MaximumLikelihood(Objective):
    """The negative log-likelihood of B's data (:func:`maximum_likelihood_loss`) on
    minibatches at random indices drawn from the training generator."""

    trains_on_target_data = True

    @classmethod
    def complaints(cls, job: JobSettings, system: System) -> Iterator[SettingError]:
        if job.training.warm_start_steps is not None:
            yield SettingError("training.warm_start_steps", job.training.warm_start_steps,
                               "a maximum-likelihood warm start precedes reverse_kl training; "
                               "leave it out for maximum_likelihood")

    def validate(self, sample_a: Callable[[int], torch.Tensor] | None,
                 data_b: torch.Tensor | Any | None) -> None:
        if data_b is None:
            raise ValueError(
                "data_b: None is not allowed for objective 'maximum_likelihood'; pass samples of B"
            )
        # A tensor, or a set indexed like one (pipeline.SymmetryImages computes its rows).
        if getattr(data_b, "ndim", None) != 2 or data_b.shape[0] == 0:
            raise ValueError(
                f"data_b: {type(data_b).__name__} of shape {tuple(getattr(data_b, 'shape', ()))} "
                "is not allowed; need a non-empty (M, dim) tensor"
            )

    def loss(self, flow: nn.Module, step: int, batch_size: int, generator: torch.Generator,
             u_a: EnergyFn, u_b: EnergyFn, sample_a: Callable[[int], torch.Tensor] | None,
             data_b: torch.Tensor | Any | None) -> torch.Tensor:
        assert data_b is not None  # validate() refused missing data
        idx = torch.randint(0, data_b.shape[0], (batch_size,), generator=generator)
        return maximum_likelihood_loss(flow, data_b[idx.to(data_b.device)], u_a)


# Flow matching and adaptive tempering register themselves in OBJECTIVES; import them so that
# the registry is complete whatever is imported first.
import boltzgen.flow_matching  # noqa: E402, F401
import boltzgen.tempering  # noqa: E402, F401
