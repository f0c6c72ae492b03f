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

import math
from typing import ClassVar

import numpy as np
import torch

from boltzgen._checks import check_float, check_int
from boltzgen.systems.base import System

N_PARTICLES = 4
SPATIAL_DIM = 2


def helmert_basis(n: int) -> np.ndarray:
    """Orthonormal basis of the zero-sum subspace of R^n, shape (n - 1, n), float64.

    Row k - 1 is h_k = (1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1)) with k leading ones
    (the sub-diagonal rows of the Helmert matrix); every row is orthogonal to (1, ..., 1).
    """
    n = check_int("n", n, minimum=2)
    basis = np.zeros((n - 1, n))
    for k in range(1, n):
        basis[k - 1, :k] = 1.0
        basis[k - 1, k] = -float(k)
        basis[k - 1] /= math.sqrt(k * (k + 1))
    return basis


_PAIRS_I, _PAIRS_J = (torch.as_tensor(a) for a in np.triu_indices(N_PARTICLES, k=1))


class DW4(System):
    """Four particles in 2-D, pair double-well potential, centre of mass removed (dim 6)."""

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

    def to_cartesian(self, z: torch.Tensor) -> torch.Tensor:
        """Flow coordinates (..., 6) -> centre-of-mass-free Cartesian (..., 4, 2)."""
        self._check_coordinates(z)
        zr = z.reshape(*z.shape[:-1], N_PARTICLES - 1, SPATIAL_DIM)
        h = self.basis.to(device=z.device, dtype=z.dtype)
        return torch.einsum("ki,...kd->...id", h, zr)

    def from_cartesian(self, x: torch.Tensor) -> torch.Tensor:
        """Cartesian (..., 4, 2) -> flow coordinates (..., 6); the centre of mass is dropped."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape (..., 4, 2), got {type(x)}")
        if x.ndim < 2 or tuple(x.shape[-2:]) != (N_PARTICLES, SPATIAL_DIM):
            raise ValueError(f"x: shape {tuple(x.shape)} is not allowed; need (..., 4, 2)")
        h = self.basis.to(device=x.device, dtype=x.dtype)
        z = torch.einsum("ki,...id->...kd", h, x)
        return z.reshape(*x.shape[:-2], self.dim)

    def pair_distances(self, z: torch.Tensor) -> torch.Tensor:
        """The 6 distances d_ij, i < j (row-major pair order), shape (..., 6)."""
        x = self.to_cartesian(z)
        i, j = _PAIRS_I.to(x.device), _PAIRS_J.to(x.device)
        diff = x[..., i, :] - x[..., j, :]
        return torch.linalg.vector_norm(diff, dim=-1)

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """U in kT units (at T = 1); flow coordinates (..., 6) -> (...)."""
        s = self.pair_distances(x) - self.d0
        return (self.c * s**4 + self.b * s**2).sum(dim=-1)

    def observables(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """{"pair_distance": all 6 distances of every sample, length 6N; "energy": U, length N}."""
        # A copy: arrays that arrive through an object store are read-only.
        z = torch.from_numpy(np.array(self._as_samples(x), dtype=np.float64))
        with torch.no_grad():
            d = self.pair_distances(z)
            energy = self.potential(z)
        return {"pair_distance": d.reshape(-1).numpy(), "energy": energy.numpy()}
