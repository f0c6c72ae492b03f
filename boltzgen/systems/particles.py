"""Point-particle systems with the centre of mass removed (DW4, Lennard-Jones clusters).

n particles in d spatial dimensions whose potential depends only on the relative positions
(pair distances, distances to the centre of mass). Such a U is constant along translations,
so Z over R^{n d} diverges; the flow coordinates are instead the coefficients z of the
Cartesian configuration x in an orthonormal basis of the centre-of-mass-free subspace
{x : Σ_i x_i = 0}, the Helmert basis h_1 .. h_{n-1} of the zero-sum subspace of R^n (applied
per spatial axis; :mod:`boltzgen.layouts`, ``particles`` with ``com_free``):

    x[..., i, a] = Σ_k H[k, i] z[..., k, a],    z[..., k, a] = Σ_i H[k, i] x[..., i, a],
    h_k = (1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))   (k leading ones),

flattened as z[..., d k + a], dim = (n - 1) d. The map z -> x is an isometry onto the
subspace, so the Lebesgue measure of R^{(n-1) d} is that subspace's own (Hausdorff) measure,
and |z|² = Σ_i |x_i − x̄|² (the radius of gyration times n).

Pair quantities use the n (n − 1) / 2 pairs i < j in row-major order
(0,1), (0,2), ..., (0,n−1), (1,2), ..., (n−2,n−1) (``numpy.triu_indices(n, k=1)``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from boltzgen._checks import check_float, check_int
from boltzgen.layouts import ParticleLayout
from boltzgen.systems.base import System

__all__ = ["ParticleSystem", "cubic_lattice", "pair_indices"]


@lru_cache(maxsize=32)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def pair_indices(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs i < j of ``n`` particles in row-major order, as two index tensors (P,),
    P = n (n − 1) / 2."""
    # The cache holds numpy arrays, never tensors: a tensor first made inside a torch.func
    # transform (vmap, grad, jacfwd of the potential) is wrapped for that transform, and a later
    # call that reused it would fail (seen with torch 2.13).
    i, j = _pairs(check_int("n", n, minimum=2))
    return torch.as_tensor(i, device=device), torch.as_tensor(j, device=device)


def cubic_lattice(n_particles: int, spatial_dim: int, spacing: float = 1.0) -> np.ndarray:
    """The first ``n_particles`` sites of a simple cubic (square, ...) lattice of the given
    ``spacing`` in ``spatial_dim`` dimensions, filled shell by shell around the origin and
    centred, shape (n_particles, spatial_dim), float64.

    A non-overlapping start for Monte Carlo of a cluster: every pair is at least ``spacing``
    apart (the Lennard-Jones minimum when spacing = r_m), unlike a Gaussian draw, whose close
    pairs have energies ~ r⁻¹² that a random walk needs a long time to relax.
    """
    n = check_int("n_particles", n_particles, minimum=1)
    d = check_int("spatial_dim", spatial_dim, minimum=1)
    a = check_float("spacing", spacing, positive=True)
    side = 1
    while side**d < n:
        side += 1
    grid = np.stack(np.meshgrid(*[np.arange(side)] * d, indexing="ij"), axis=-1).reshape(-1, d)
    # Closest to the box centre first: the sites chosen form a compact blob, not a slab.
    centre = (side - 1) / 2.0
    order = np.lexsort((*grid.T[::-1], ((grid - centre) ** 2).sum(axis=1)))
    sites = a * grid[order[:n]].astype(np.float64)
    return sites - sites.mean(axis=0)


class ParticleSystem(System):
    """``n_particles`` point particles in ``spatial_dim`` dimensions, centre of mass removed;
    flow coordinates are the Helmert coefficients z, dim = (n_particles − 1) spatial_dim
    (module docstring).

    Subclasses set ``n_particles``, ``spatial_dim`` and ``dim`` (class or instance attributes)
    and implement :meth:`potential` on z (by way of :meth:`to_cartesian` or
    :meth:`pair_distances`).
    """

    n_particles: int
    spatial_dim: int

    @property
    def n_pairs(self) -> int:
        """P = n (n − 1) / 2, the number of pairs i < j."""
        return self.n_particles * (self.n_particles - 1) // 2

    def layout(self) -> ParticleLayout:
        """n particles in d-D, centre of mass removed: the flow coordinates are the Helmert
        coefficients (the coupling flows act on them as on R^dim; an equivariant flow could map
        them back to particles with :meth:`ParticleLayout.to_cartesian`)."""
        return ParticleLayout(self.n_particles, self.spatial_dim, com_free=True)

    def to_cartesian(self, z: torch.Tensor) -> torch.Tensor:
        """Flow coordinates (..., dim) -> centre-of-mass-free Cartesian (..., n, d)."""
        self._check_coordinates(z)
        return self.layout().to_cartesian(z)

    def from_cartesian(self, x: torch.Tensor) -> torch.Tensor:
        """Cartesian (..., n, d) -> flow coordinates (..., dim); the centre of mass is dropped
        (a translated configuration has the same coordinates)."""
        return self.layout().from_cartesian(x)

    def pair_differences(self, z: torch.Tensor) -> torch.Tensor:
        """x_i − x_j for the pairs i < j (row-major pair order), shape (..., P, d)."""
        x = self.to_cartesian(z)
        i, j = pair_indices(self.n_particles, x.device)
        return x[..., i, :] - x[..., j, :]

    def squared_pair_distances(self, z: torch.Tensor) -> torch.Tensor:
        """d_ij² for the pairs i < j, shape (..., P); smooth everywhere (unlike d_ij at 0),
        which potentials in powers of d² use to avoid the square root."""
        return self.pair_differences(z).square().sum(dim=-1)

    def pair_distances(self, z: torch.Tensor) -> torch.Tensor:
        """The P = n (n − 1) / 2 distances d_ij = |x_i − x_j|, i < j (row-major pair order),
        shape (..., P)."""
        return torch.linalg.vector_norm(self.pair_differences(z), dim=-1)

    def observables(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """{"pair_distance": all P distances of every sample, length P N; "energy": U,
        length N}, for samples (N, dim)."""
        # A copy: arrays that arrive through an object store are read-only.
        z = torch.from_numpy(np.array(self._as_samples(x), dtype=np.float64))
        with torch.no_grad():
            d = self.pair_distances(z)
            energy = self.potential(z)
        return {"pair_distance": d.reshape(-1).numpy(), "energy": energy.numpy()}
