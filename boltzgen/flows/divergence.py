"""The divergence div v = Σ_k ∂v_k/∂z_k of a vector field, for the CNF's log-likelihood

    log q(z_1) = log p(z_0) − ∫_0^1 div v(t, z_t) dt      (Chen et al. 2018).

Each function takes the field ``v(t, z)``, a time, z (B, D) and ``create_graph`` (keep the
result differentiable with respect to the parameters: likelihood training) and returns
(v (B, D), div (B,)). Registered in :data:`DIVERGENCES` under the flow's ``divergence`` and
``training_divergence`` settings:

- ``exact_per_dimension``: one forward pass, then one backward pass of Σ_b v_k per dimension
  k (the published approach, e.g. TBG's brute-force estimator). Each backward reuses the
  forward's graph and costs about one forward: about D forwards per divergence.
- ``exact_vectorized``: the same D vector-Jacobian products (cotangents e_k) batched into a
  few backward passes over the one forward graph (``is_grads_batched``, vmap underneath). On
  a GPU this replaces D small launches by a few large ones; on a 2-core CPU the batched
  intermediates (D × the pair tensors) leave the cache and it is slower than the loop
  (``bench/bench_cnf.py`` measures both; the loop is therefore the default).
- ``hutchinson``: ε ~ N(0, I), div ≈ εᵀ (∂v/∂z) ε from one vector-Jacobian product
  (Hutchinson 1989; Grathwohl et al. 2019). Unbiased for the divergence, but exp of its noise
  biases importance weights: allowed for training only, never for reported ESS, NLL or ΔF.
- a field with a closed-form divergence (``velocity_and_divergence``, the hollow field)
  provides ``analytic``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from boltzgen.registry import Registry

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Divergence = Callable[..., tuple[torch.Tensor, torch.Tensor]]

DIVERGENCES: Registry = Registry("divergence", field="flow.divergence")


def _tracked(z: torch.Tensor) -> torch.Tensor:
    return z if z.requires_grad else z.detach().requires_grad_(True)


VECTORIZED_CHUNK = 12
"""Dimensions per batched backward pass of ``exact_vectorized`` (bounds its memory)."""


@DIVERGENCES.register("exact_vectorized")
def exact_divergence_vectorized(field: Field, t: torch.Tensor, z: torch.Tensor,
                                create_graph: bool, generator: torch.Generator | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact divergence by batched vector-Jacobian products over one forward pass (module
    docstring), ``VECTORIZED_CHUNK`` dimensions per backward pass."""
    b, dim = z.shape
    with torch.enable_grad():
        z = _tracked(z)
        v = field(t, z)
        div = z.new_zeros(b)
        for first in range(0, dim, VECTORIZED_CHUNK):
            dims = torch.arange(first, min(dim, first + VECTORIZED_CHUNK), device=z.device)
            rows = torch.arange(len(dims), device=z.device)
            cotangents = v.new_zeros(len(dims), b, dim)
            cotangents[rows, :, dims] = 1.0  # e_k for every sample, one k per batch entry
            (grads,) = torch.autograd.grad(v, z, cotangents, retain_graph=True,
                                           create_graph=create_graph, is_grads_batched=True)
            div = div + grads[rows, :, dims].sum(0)
    return v, div


@DIVERGENCES.register("exact_per_dimension")
def exact_divergence_per_dimension(field: Field, t: torch.Tensor, z: torch.Tensor,
                                   create_graph: bool, generator: torch.Generator | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact divergence by one backward pass per dimension (module docstring)."""
    with torch.enable_grad():
        z = _tracked(z)
        v = field(t, z)
        div = z.new_zeros(z.shape[0])
        for k in range(z.shape[1]):
            (grad,) = torch.autograd.grad(v[:, k].sum(), z, create_graph=create_graph,
                                          retain_graph=True)
            div = div + grad[:, k]
    return v, div


@DIVERGENCES.register("hutchinson")
def hutchinson_divergence(field: Field, t: torch.Tensor, z: torch.Tensor, create_graph: bool,
                          generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased stochastic divergence εᵀ J ε, ε ~ N(0, I) (training only)."""
    eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    with torch.enable_grad():
        z = _tracked(z)
        v = field(t, z)
        (vjp,) = torch.autograd.grad(v, z, eps, create_graph=create_graph)
    return v, (vjp * eps).sum(-1)


@DIVERGENCES.register("analytic")
def analytic_divergence(field: Field, t: torch.Tensor, z: torch.Tensor, create_graph: bool,
                        generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The field's own closed-form exact divergence (``field.velocity_and_divergence``)."""
    return field.velocity_and_divergence(t, z, create_graph)  # type: ignore[attr-defined]


EXACT_DIVERGENCES: tuple[str, ...] = ("exact_per_dimension", "exact_vectorized", "analytic")
"""The divergences allowed where a likelihood is reported."""
