"""DW4: four particles in 2-D with a double-well pair potential (Köhler, Klein, Noé 2020).

    U(x) = Σ_{i<j} [c (d_ij - d0)^4 + b (d_ij - d0)^2],   d_ij = |x_i - x_j|,
    defaults c = 0.9, b = -4, d0 = 4,

energies in kT at T = 1 (reduced units, k_B = 1). U is invariant under translations, rotations,
reflections and permutations of the particles.

Centre of mass removed: U does not depend on the centre of mass, so Z over R^{4x2} diverges.
The flow coordinates are z in R^6, the coefficients of the Cartesian configuration
x in R^{4x2} in an orthonormal basis of the centre-of-mass-free subspace
{x : Σ_i x_i = 0}. The basis is the Helmert basis h_1..h_3 of the zero-sum subspace of R^4
(applied per spatial dimension), h_k = (1, ..., 1, -k, 0, ...)/sqrt(k(k+1)) with k ones, so

    x[..., i, d] = Σ_k H[k, i] z[..., k, d],     z[..., k, d] = Σ_i H[k, i] x[..., i, d],

with z flattened as z[..., 2k + d]. The map z -> x is an isometry onto the subspace, so
Lebesgue measure on R^6 is the subspace's own (Hausdorff) measure; ``from_cartesian``
projects out the centre of mass.

Reference: J. Köhler, L. Klein, F. Noé, "Equivariant flows: exact likelihood generative
learning for symmetric densities", ICML 2020 (DW4 benchmark).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from boltzgen._checks import check_float
from boltzgen.layouts import helmert_basis
from boltzgen.systems.particles import ParticleSystem

__all__ = ["DW4", "helmert_basis"]

N_PARTICLES = 4
SPATIAL_DIM = 2


class DW4(ParticleSystem):
    """Four particles in 2-D, pair double-well potential, centre of mass removed (dim 6).

    The coordinate maps, pair distances and observables are :class:`ParticleSystem`'s:
    ``to_cartesian`` (..., 6) -> (..., 4, 2), ``from_cartesian`` (..., 4, 2) -> (..., 6),
    ``pair_distances`` (..., 6) -> (..., 6), ``observables`` {"pair_distance" (6N,),
    "energy" (N,)}.
    """

    kind: ClassVar[str] = "dw4"
    estimand_note: ClassVar[str] = (
        "Z over the 6-D centre-of-mass-free subspace of R^(4x2) with its orthonormal "
        "(Lebesgue) measure, coordinates in a Helmert basis"
    )
    n_particles: int = N_PARTICLES
    spatial_dim: int = SPATIAL_DIM
    dim: int = (N_PARTICLES - 1) * SPATIAL_DIM
    boltzmann_constant: float = 1.0

    def __init__(self, *, b: float = -4.0, c: float = 0.9, d0: float = 4.0) -> None:
        self.b = check_float("b", b)
        self.c = check_float("c", c, positive=True)
        self.d0 = check_float("d0", d0, nonnegative=True)
        #: Helmert basis H, shape (3, 4), orthonormal rows orthogonal to (1, 1, 1, 1).
        self.basis = torch.as_tensor(helmert_basis(N_PARTICLES), dtype=torch.float64)

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """U in kT units (at T = 1); flow coordinates (..., 6) -> (...)."""
        s = self.pair_distances(x) - self.d0
        return (self.c * s**4 + self.b * s**2).sum(dim=-1)
