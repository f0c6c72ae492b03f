"""Training objectives for a flow T from state A (base side) to state B (target side).

Reduced units (kT). With log w(x) = u_A(x) + log|det J_T(x)| - u_B(T(x)) (docs/architecture.md,
Conventions):

- Reverse KL / LFEP loss, x ~ A:  L = E_A[-log w] = KL(T#A || B) + ΔF >= ΔF = f_B - f_A
  (Gibbs/Jensen bound; Wirnsberger et al. 2020). With a normalized Gaussian base
  (f_A = 0) this is the data-free energy-based loss E_q[log q(y) + u_B(y)] of Noé et al. 2019
  and Stupp & Koutsourelakis 2025, from model samples only.
- Maximum likelihood / forward KL, y ~ B:  L = E_B[u_A(T^-1 y) - log|det J_{T^-1}(y)|]. When
  exp(-u_A) is a normalized density this is the negative log-likelihood -E_B[log q(y)] of the
  data under the flow; in general it is KL(B || T#A) up to a constant.

Samples whose per-sample term is not finite are excluded from the mean. To keep their
non-finite values out of the gradient, the loss is recomputed on the finite subset only (the
common all-finite case costs a single pass). If no term is finite the loss is a NaN tensor
that does not require grad; :func:`boltzgen.training.train_flow` skips such steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


def _finite_mean(
    per_sample: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    terms = per_sample(inputs)
    finite = torch.isfinite(terms)
    if bool(finite.all()):
        return terms.mean()
    if not bool(finite.any()):
        return terms.detach().new_tensor(float("nan"))
    return per_sample(inputs[finite]).mean()


def reverse_kl_loss(
    flow: nn.Module, x_a: torch.Tensor, u_a: EnergyFn, u_b: EnergyFn
) -> torch.Tensor:
    """mean over x ~ A of -log w = u_B(T x) - log|det J_T(x)| - u_A(x), in kT (upper bound on ΔF).

    ``x_a`` (batch, dim) samples of A; ``u_a``, ``u_b`` reduced energies (batch, dim) -> (batch,).
    """

    def per_sample(x: torch.Tensor) -> torch.Tensor:
        y, logdet = flow(x)
        return u_b(y) - logdet - u_a(x)

    return _finite_mean(per_sample, x_a)


def maximum_likelihood_loss(flow: nn.Module, y_b: torch.Tensor, u_a: EnergyFn) -> torch.Tensor:
    """mean over y ~ B of u_A(T^-1 y) - log|det J_{T^-1}(y)|, in kT.

    This is the negative log-likelihood of the data under the flow when exp(-u_A) is normalized.

    ``y_b`` (batch, dim) data from B; ``u_a`` reduced energy of A, (batch, dim) -> (batch,).
    """

    def per_sample(y: torch.Tensor) -> torch.Tensor:
        x, logdet_inv = flow.inverse(y)
        return u_a(x) - logdet_inv

    return _finite_mean(per_sample, y_b)
