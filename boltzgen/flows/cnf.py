"""Continuous normalizing flows (Chen et al. 2018): T = the flow of dz/dt = v(t, z) from t = 0
(prior) to t = 1 (target), solved by torchdiffeq, with

    log|det J_T(z_0)| = ∫_0^1 div v(t, z_t) dt,    log q(z_1) = log p(z_0) − ∫_0^1 div v dt.

``forward`` integrates the augmented state (z, ∫ div v dt, ∫ |v| dt) from 0 to 1, ``inverse``
from 1 to 0 (its log-det is then −∫_0^1 div v dt along the same path). The divergence is
exact (:mod:`.divergence`: one backward pass per dimension by default, the fastest exact
method measured on a CPU; ``exact_vectorized`` batches those passes; the hollow field's closed
form); ``training_divergence: hutchinson`` may replace it
while the flow is in training mode (likelihood training), never in eval mode, where every
reported likelihood is computed.

Solver: ``solver`` dopri5 (adaptive, ``atol`` / ``rtol`` on the whole augmented state; the
setting for reported numbers, TBG uses 1e-4 / 1e-4) or fixed steps (``rk4``, ``euler``,
``midpoint`` with ``n_steps`` steps). A failed solve (step size underflow, a non-finite state)
raises :class:`ODESolveError` with the cause.

Statistics of the solves since :meth:`ContinuousFlow.reset_statistics`
(:meth:`ContinuousFlow.solve_statistics`): the number of vector-field evaluations per solve
(NFE, mean over solves; the divergence's own passes are not counted) and the path length
∫_0^1 |v(t, z_t)| dt per sample (flow-coordinate units; for particle layouts the Cartesian
length, the Helmert coordinates being an isometry).

Kinds (registered in :mod:`boltzgen.flows`): ``egnn_cnf`` (:class:`EquivariantCNF`, the
EGNN field), ``hollow_cnf`` (:class:`HollowCNF`, the equivariant field with a closed-form
divergence) and ``mlp_cnf`` (:class:`MLPCNF`, the non-equivariant baseline). The particle kinds
need a centre-of-mass-free particle layout: with the default N(0, I) prior on its Helmert
coordinates, the prior is the centre-of-mass-free Gaussian, normalised over the (n − 1) d
dimensional subspace, invariant under rotations, reflections and permutations, so that an
equivariant field gives an invariant density (Köhler, Klein, Noé 2020).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torchdiffeq import odeint

from boltzgen._checks import check_float, check_int
from boltzgen.flows.contract import EUCLIDEAN_LAYOUTS, Flow
from boltzgen.flows.divergence import DIVERGENCES, EXACT_DIVERGENCES
from boltzgen.flows.vector_fields import (
    EGNNField,
    HollowEGNNField,
    MLPField,
    VectorField,
)
from boltzgen.layouts import Layout, ParticleLayout

ADAPTIVE_SOLVERS = ("dopri5",)
FIXED_STEP_SOLVERS = ("rk4", "euler", "midpoint")


class ODESolveError(RuntimeError):
    """The ODE solve of a continuous flow failed; the message says why."""


class ContinuousFlow(Flow):
    """A CNF with a vector field built by :meth:`make_field` (module docstring)."""

    accepts: ClassVar[tuple[str, ...]] = EUCLIDEAN_LAYOUTS
    layout_requirement: ClassVar[str] = "acts on R^dim"
    needs_autograd_for_sampling: ClassVar[bool] = True
    default_divergence: ClassVar[str] = "exact_per_dimension"
    is_continuous: ClassVar[bool] = True

    # A kind's own defaults for the field's size and the samples per ODE solve.
    default_hidden: ClassVar[int] = 64
    default_n_layers: ClassVar[int] = 4
    default_chunk_size: ClassVar[int] = 4096
    field_class: ClassVar[type[VectorField]]

    def __init__(self, layout: Layout, hidden: int | None = None, n_layers: int | None = None,
                 solver: str = "dopri5", atol: float = 1e-4, rtol: float = 1e-4,
                 n_steps: int = 20, divergence: str | None = None,
                 training_divergence: str | None = None, chunk_size: int | None = None) -> None:
        super().__init__(layout)
        hidden = self.default_hidden if hidden is None else hidden
        n_layers = self.default_n_layers if n_layers is None else n_layers
        chunk_size = self.default_chunk_size if chunk_size is None else chunk_size
        solvers = ADAPTIVE_SOLVERS + FIXED_STEP_SOLVERS
        if solver not in solvers:
            raise ValueError(f"solver: {solver!r} is not allowed; choose one of "
                             f"{', '.join(solvers)}")
        self.solver = solver
        self.atol = check_float("atol", atol, positive=True)
        self.rtol = check_float("rtol", rtol, positive=True)
        self.n_steps = check_int("n_steps", n_steps, minimum=1)
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self.divergence = divergence or self.default_divergence
        allowed = [d for d in EXACT_DIVERGENCES if self._divergence_available(d)]
        if self.divergence not in allowed:
            raise ValueError(f"divergence: {self.divergence!r} is not allowed; reported "
                             f"likelihoods need an exact divergence: {', '.join(allowed)}")
        self.training_divergence = training_divergence or self.divergence
        allowed_training = [*allowed, "hutchinson"]
        if self.training_divergence not in allowed_training:
            raise ValueError(f"training_divergence: {self.training_divergence!r} is not "
                             f"allowed; choose one of {', '.join(allowed_training)}")
        self.field: VectorField = self.make_field(check_int("hidden", hidden, minimum=1),
                                                  check_int("n_layers", n_layers, minimum=1))
        self._sampling = False
        self.reset_statistics()

    def _divergence_available(self, name: str) -> bool:
        return name != "analytic" or hasattr(self.field_class, "velocity_and_divergence")

    def make_field(self, hidden: int, n_layers: int) -> VectorField:
        """The kind's vector field (``field_class``) for this flow's layout."""
        return self.field_class(self.layout, hidden, n_layers)

    @contextlib.contextmanager
    def _without_graph(self) -> Iterator[None]:
        previous, self._sampling = self._sampling, True
        try:
            yield
        finally:
            self._sampling = previous

    def sampling_context(self) -> contextlib.AbstractContextManager[Any]:
        """Gradients stay on (the divergence needs them inside each step), but no graph
        through the solve is kept: what comes out is detached, as under ``no_grad``."""
        return self._without_graph()

    # -- statistics -------------------------------------------------------------------------
    def reset_statistics(self) -> None:
        """Forget the solves so far (:meth:`solve_statistics`)."""
        self._solves = 0
        self._evaluations = 0
        self._path_lengths: list[torch.Tensor] = []

    def solve_statistics(self) -> dict[str, float]:
        """``nfe``: vector-field evaluations per solve (mean); ``path_length``: mean over
        samples of ∫_0^1 |v| dt (flow-coordinate units); ``solves``: how many."""
        lengths = torch.cat(self._path_lengths) if self._path_lengths else torch.zeros(0)
        return {"nfe": self._evaluations / self._solves if self._solves else float("nan"),
                "path_length": float(lengths.mean()) if len(lengths) else float("nan"),
                "solves": float(self._solves)}

    # -- the map ----------------------------------------------------------------------------
    def velocity(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """v(t, z) (B, D) for times t (B,) or a scalar: what flow matching regresses."""
        return self.field(t, z)

    def _run(self, x: torch.Tensor, name: str, inverse: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_euclidean_input(name, x)
        batch = x.shape[:-1]
        outs, logdets = [], []
        for chunk in torch.split(x.reshape(-1, self.dim), self.chunk_size):
            out, logdet = self._solve(chunk, inverse)
            outs.append(out)
            logdets.append(logdet)
        return torch.cat(outs).reshape(*batch, self.dim), torch.cat(logdets).reshape(batch)

    def _solve(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        method = self.training_divergence if self.training else self.divergence
        divergence = DIVERGENCES.get(method)
        # The graph through the solve is kept for training, or when the caller differentiates
        # the map itself (its input requires grad); sampling keeps none.
        keep_graph = torch.is_grad_enabled() and not self._sampling and (
            self.training or x.requires_grad)
        evaluations = 0

        def dynamics(t: torch.Tensor, state: tuple[torch.Tensor, ...]
                     ) -> tuple[torch.Tensor, ...]:
            nonlocal evaluations
            evaluations += 1
            z = state[0]
            v, div = divergence(self.field, t, z, keep_graph)
            if not keep_graph:
                v, div = v.detach(), div.detach()
            return v, div, torch.linalg.vector_norm(v, dim=-1)


        times = torch.tensor([1.0, 0.0] if inverse else [0.0, 1.0], dtype=x.dtype,
                             device=x.device)
        zeros = x.new_zeros(x.shape[0])
        options: dict[str, Any] = {}
        if self.solver in FIXED_STEP_SOLVERS:
            options["step_size"] = 1.0 / self.n_steps
        try:
            z, div_integral, length = odeint(
                dynamics, (x, zeros, zeros.clone()), times, method=self.solver,
                atol=self.atol, rtol=self.rtol, options=options)
        except (AssertionError, RuntimeError) as exc:
            # torchdiffeq signals a step-size underflow by an AssertionError.
            raise ODESolveError(f"ODE solve failed ({self.solver}, atol={self.atol}, rtol="
                                f"{self.rtol}): {exc}") from exc
        y, logdet = z[-1], div_integral[-1]
        if not (bool(torch.isfinite(y).all()) and bool(torch.isfinite(logdet).all())):
            raise ODESolveError(f"ODE solve failed ({self.solver}): the state is not finite "
                                "at the end of the integration")
        self._solves += 1
        self._evaluations += evaluations
        self._path_lengths.append(length[-1].detach().abs().cpu())
        # Integrated from 1 to 0, ∫ div dt comes out as −∫_0^1 div dt = log|det J_T⁻¹|.
        return y, logdet


class ParticleCNF(ContinuousFlow):
    """A CNF on a centre-of-mass-free particle layout (module docstring)."""

    accepts = ("particles",)
    layout_requirement = "needs particles with the centre of mass removed (dw4, lj)"

    @classmethod
    def accepts_layout(cls, layout: Layout) -> bool:
        return isinstance(layout, ParticleLayout) and layout.com_free


class EquivariantCNF(ParticleCNF):
    """CNF whose field is an EGNN (``hidden`` features, ``n_layers`` message-passing layers)."""

    field_class = EGNNField


class HollowCNF(ParticleCNF):
    """CNF whose equivariant field has a closed-form exact divergence (``analytic`` by
    default; ``hidden`` width and ``n_layers`` per MLP of the field)."""

    default_divergence = "analytic"
    default_n_layers = 3
    default_chunk_size = 1024  # its pair tensors carry a leave-one-out axis
    field_class = HollowEGNNField


class MLPCNF(ContinuousFlow):
    """CNF whose field is an MLP of (z, t): no symmetry, the baseline (any Euclidean layout)."""

    default_hidden = 128
    default_n_layers = 3
    field_class = MLPField
