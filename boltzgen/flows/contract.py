"""The contract every flow implements, discrete (coupling) or continuous, and the flow registry.

A flow is an ``nn.Module`` built for a layout (:mod:`boltzgen.layouts`) that owns its prior
(``flow.prior``, :mod:`boltzgen.priors`), as a normalizing flow is a transform with a base
distribution. With T the flow's map and p its prior (docs/architecture.md, Conventions):

- ``forward(x, context=None) -> (y, log|det J_T(x)|)``: prior / state-A side to target side;
- ``inverse(y, context=None) -> (x, log|det J_T⁻¹(y)|)`` with x = T⁻¹(y);
- ``sample_and_log_prob(n, context=None, generator=...) -> (y, log q(y))``: x ~ p pushed
  forward, log q(y) = log p(x) − log|det J_T(x)| (one pass, no inverse);
- ``log_prob(y, context=None) = log p(T⁻¹ y) + log|det J_T⁻¹(y)|``.

Log-dets are shaped like the batch, on the input's device and dtype (float64). On a manifold
(rigid bodies: torus × S³) J is taken between tangent spaces and densities are with respect to
the layout's normalized measure.

Class attributes a flow declares:

- ``accepts``: the layout kinds it can be built for (:func:`boltzgen.flows.build_flow` refuses
  the others, naming the flows that do accept the system's layout), and ``layout_requirement``,
  a phrase for that message ("acts on R^dim");
- ``takes_context``: whether it is conditional. A flow that takes none raises ValueError when
  given a context (``context=None`` is always accepted): a context silently ignored would hide
  a mistake;
- ``needs_autograd_for_sampling``: True for a flow whose forward map itself differentiates
  (e.g. a continuous flow with an exact divergence by autograd); sampling code then runs it
  with gradients enabled (:meth:`Flow.sampling_context`) instead of under ``torch.no_grad()``;
- ``owns_prior``: True for a flow whose prior is part of its definition, on a latent space of
  its own (``latent_dim`` numbers, not the layout's ``dim``: e.g. the 3n − 6 internal
  coordinates of a molecule, :mod:`boltzgen.flows.internal`). Such a prior is never replaced by
  a job's base (a normal base then means the flow's own normalized prior, and f_A = 0 still);
  for every other flow ``latent_dim == dim`` and the job's analytic base is its prior.

Hooks with a default: ``reset_statistics()`` / ``solve_statistics()`` (what the maps since
the reset cost: a continuous flow's NFE and path length; empty by default) and
``fit_to_data(y)`` (target-side samples (M, dim)) sets whatever the flow
takes from data before training, e.g. a normalization stored in buffers (so in the state_dict);
training calls it once, with the training target samples, for a job that trains on them (not
when it resumes from a checkpoint). By default it does nothing. ``fit_to_structure(x0)``
(the system's own structure (dim,), e.g. a molecule's minimised one) does the same from
the system alone, no data: training calls it first, for every job of a system that has one
(the coarse-grained model centres its internal coordinates there).

A subclass implements ``_run(x, name, inverse)`` (the map in one direction and its log-det;
``name`` is "x" or "y" for error messages) and calls ``Flow.__init__(layout)``.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
from torch import nn

from boltzgen._checks import check_int
from boltzgen.layouts import Layout, as_layout
from boltzgen.priors import Prior, default_prior
from boltzgen.registry import Registry

__all__ = ["EUCLIDEAN_LAYOUTS", "FLOWS", "Flow"]

EUCLIDEAN_LAYOUTS: tuple[str, ...] = ("vector", "particles", "molecule")
"""Layout kinds whose flow coordinates are R^dim with the Lebesgue measure."""


class Flow(nn.Module):
    """Base class of the flows: layout, prior, context check and the sampling methods."""

    accepts: ClassVar[tuple[str, ...]] = ()
    layout_requirement: ClassVar[str] = ""
    takes_context: ClassVar[bool] = False
    needs_autograd_for_sampling: ClassVar[bool] = False
    owns_prior: ClassVar[bool] = False

    def __init__(self, layout: Layout | int) -> None:
        super().__init__()
        layout = as_layout(layout)
        if not self.accepts_layout(layout):
            raise ValueError(f"layout: {type(self).__name__} {self.layout_requirement}; this "
                             f"layout is {layout.description}")
        self.layout = layout
        self.dim = layout.dim
        self.prior: Prior = default_prior(layout)

    @classmethod
    def accepts_layout(cls, layout: Layout) -> bool:
        """Whether this kind of flow can be built for ``layout``."""
        return layout.kind in cls.accepts

    @property
    def latent_dim(self) -> int:
        """Numbers per sample on the prior side: the layout's ``dim`` unless the flow owns a
        prior on a latent space of its own (``owns_prior``)."""
        return self.dim

    def fit_to_data(self, y: torch.Tensor) -> None:
        """Set what the flow takes from target-side samples ``y`` (M, dim) before training
        (module docstring); nothing by default."""
        del y

    def fit_to_structure(self, x0: torch.Tensor) -> None:
        """Set what the flow takes from the system's own structure ``x0`` (dim,) before
        training (module docstring); nothing by default."""
        del x0

    def slow_log_density(self, y: torch.Tensor) -> torch.Tensor | None:
        """log q_slow(z(y)), the density of the variables that carry the modes' weights at
        the slow coordinates z(y) of configurations ``y`` (batch, dim), the map from z to y
        held fixed (no gradient through it), for the reweighted forward KL of
        :func:`boltzgen.objectives.reverse_kl_loss` with a forward-KL weight; None (the
        default): the flow has no such part, and the whole log q(y) is fitted."""
        del y
        return None

    # -- statistics of the map (continuous flows count their ODE solves) ----------------------
    def reset_statistics(self) -> None:
        """Forget what :meth:`solve_statistics` reports (nothing to forget by default)."""

    def solve_statistics(self) -> dict[str, float]:
        """Cost and shape of the maps computed since :meth:`reset_statistics`: a continuous
        flow reports ``nfe`` and ``path_length`` (:mod:`boltzgen.flows.cnf`); empty by
        default."""
        return {}

    # -- the map ----------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, name: str, inverse: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _check_euclidean_input(self, name: str, x: torch.Tensor, size: int | None = None
                               ) -> None:
        """Refuse what is not a float64 tensor of shape (..., size) (TypeError / ValueError
        naming ``name``; ``size`` defaults to dim): the input check of every flow on R^dim."""
        size = self.dim if size is None else size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x)}")
        if x.ndim < 1 or x.shape[-1] != size:
            raise ValueError(f"{name}: shape {tuple(x.shape)} is not allowed; need (..., "
                             f"{size})")
        if x.dtype != torch.float64:
            raise TypeError(f"{name}: dtype {x.dtype} is not allowed; the flow is float64")

    def _check_context(self, context: Any) -> None:
        if context is not None and not self.takes_context:
            raise ValueError(f"context: {type(self).__name__} takes no context; pass None "
                             f"(got {type(context).__name__})")

    def forward(self, x: torch.Tensor, context: Any = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior side -> target side: (y, log|det J_T(x)|), log-det shaped like the batch."""
        self._check_context(context)
        return self._run(x, "x", inverse=False)

    def inverse(self, y: torch.Tensor, context: Any = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target side -> prior side: (x, log|det J_T⁻¹(y)|) = (T⁻¹ y, −log|det J_T(T⁻¹ y)|)."""
        self._check_context(context)
        return self._run(y, "y", inverse=True)

    # -- densities and sampling -------------------------------------------------------------
    def log_prob(self, y: torch.Tensor, context: Any = None) -> torch.Tensor:
        """log q(y) = log p(T⁻¹ y) + log|det J_T⁻¹(y)|, shaped like the batch."""
        x, log_det = self.inverse(y, context)
        return self.prior.log_prob(x) + log_det

    def sample_and_log_prob(self, n: int, context: Any = None, *,
                            generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples y = T(x), x ~ prior (drawn with ``generator`` on its device, then moved to
        the flow's device), and log q(y) = log p(x) − log|det J_T(x)|; both (n, ...) on the
        flow's device. Gradients flow as usual; wrap the call in :meth:`sampling_context` to
        sample without them."""
        self._check_context(context)
        x = self.prior.sample(check_int("n", n, minimum=1), generator).to(self.device)
        y, log_det = self.forward(x, context)
        return y, self.prior.log_prob(x) - log_det

    def sample(self, n: int, context: Any = None, *,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples y = T(x), x ~ prior (see :meth:`sample_and_log_prob`)."""
        return self.sample_and_log_prob(n, context, generator=generator)[0]

    def sampling_context(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.no_grad()``, or a null context for a flow that needs autograd to sample."""
        return contextlib.nullcontext() if self.needs_autograd_for_sampling else torch.no_grad()

    @property
    def device(self) -> torch.device:
        """Where the flow's parameters (or buffers) are; the CPU for a flow without any."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")


FLOWS: Registry[Flow] = Registry("flow", field="flow.kind")
"""Flow kinds by name (registered in :mod:`boltzgen.flows`)."""
