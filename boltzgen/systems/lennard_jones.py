"""Lennard-Jones cluster in a harmonic trap (LJ13, LJ55; Köhler, Klein, Noé 2020).

n particles in d dimensions (defaults: 13 in 3-D), centre of mass removed, energies in kT at
T = 1 (reduced units, k_B = 1):

    U(x) = s ε Σ_{i<j} [(r_m / d_ij)^12 − 2 (r_m / d_ij)^6] + c_osc Σ_i |x_i − x̄|²,

d_ij = |x_i − x_j|, x̄ the centre of mass; defaults ε = 1, r_m = 1, c_osc = 0.5. One pair has
its minimum s ε at d = r_m (well depth s ε). The harmonic term (an "oscillator" around the
centre of mass) keeps the cluster from evaporating, so that Z is finite for c_osc > 0 (with
c_osc = 0 it diverges: a particle can leave to infinity at bounded energy; allowed, but then
no free energy is defined). U is invariant under translations, rotations, reflections and
permutations of the particles.

The pair factor s depends on the ``convention``, and the two differ by a factor 2 in the pair
term:

- ``"ordered_pairs"`` (s = 2, the default): the pair term summed over all ordered pairs i ≠ j,
  as the widely used LJ13 / LJ55 data sets of Klein, Krämer, Noé (2023) compute it. Their
  samples at kT = 1 are Boltzmann samples of this U: with this convention the configurational
  temperature ⟨|∇U|²⟩ / ⟨∇²U⟩ of that data
  (:func:`boltzgen.observables.configurational_temperature`) is 1.
- ``"unordered_pairs"`` (s = 1): each pair once, i < j, as bgflow's ``LennardJonesPotential``
  computes it (the formula as written in Köhler, Klein, Noé 2020).

They are different targets: energies, negative log-likelihoods and free-energy differences
computed with one convention are not comparable to numbers computed with the other (the
ordered-pairs cluster is the unordered one at half the temperature, apart from the trap).
State the convention with every number.

Coordinates: as :class:`boltzgen.systems.particles.ParticleSystem`, the Helmert coefficients
z of the centre-of-mass-free configuration, dim (n − 1) d. The map is an isometry, so
Σ_i |x_i − x̄|² = |z|² exactly, and that is how the trap is computed.

References: J. Köhler, L. Klein, F. Noé, "Equivariant flows: exact likelihood generative
learning for symmetric densities", ICML 2020 (LJ13); L. Klein, A. Krämer, F. Noé,
"Equivariant flow matching", NeurIPS 2023 (LJ13, LJ55 data sets).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from boltzgen._checks import check_float, check_int
from boltzgen.layouts import helmert_basis
from boltzgen.systems.particles import ParticleSystem

__all__ = ["CONVENTIONS", "LennardJonesCluster"]

#: convention name -> pair factor s (the pair term summed over i ≠ j counts each pair twice).
CONVENTIONS: dict[str, float] = {"ordered_pairs": 2.0, "unordered_pairs": 1.0}


class LennardJonesCluster(ParticleSystem):
    """n Lennard-Jones particles in d-D in a harmonic trap, centre of mass removed
    (module docstring); dim (n − 1) d, 36 for LJ13, 162 for LJ55."""

    kind: ClassVar[str] = "lj"
    boltzmann_constant: float = 1.0

    def __init__(
        self,
        *,
        n_particles: int = 13,
        spatial_dim: int = 3,
        convention: str = "ordered_pairs",
        epsilon: float = 1.0,
        r_m: float = 1.0,
        c_osc: float = 0.5,
    ) -> None:
        n = check_int("n_particles", n_particles)
        if n < 2:
            raise ValueError(f"n_particles: {n!r} is not allowed; need at least 2 (a pair)")
        self.n_particles = n
        self.spatial_dim = check_int("spatial_dim", spatial_dim, minimum=1)
        if not isinstance(convention, str) or convention not in CONVENTIONS:
            raise ValueError(f"convention: {convention!r} is not allowed; choose one of "
                             f"{', '.join(CONVENTIONS)}")
        self.convention = convention
        self.epsilon = check_float("epsilon", epsilon, positive=True)
        self.r_m = check_float("r_m", r_m, positive=True)
        # c_osc = 0 is allowed (a free cluster, for energies only); Z then diverges.
        self.c_osc = check_float("c_osc", c_osc, nonnegative=True)
        self.dim = (self.n_particles - 1) * self.spatial_dim
        #: Helmert basis H, shape (n − 1, n), orthonormal rows orthogonal to (1, ..., 1).
        # Made here, outside any torch.func transform, this also fills the layouts' cache of
        # the basis tensor with a plain tensor: one first made inside vmap/grad of the potential
        # would stay wrapped for that transform and break every later call.
        self.basis = torch.as_tensor(helmert_basis(self.n_particles), dtype=torch.float64)

    @property
    def pair_factor(self) -> float:
        """s: 2 for ``ordered_pairs``, 1 for ``unordered_pairs``."""
        return CONVENTIONS[self.convention]

    @property
    def estimand_note(self) -> str:  # type: ignore[override]
        return (f"Z over the {self.dim}-D centre-of-mass-free subspace of "
                f"R^({self.n_particles}x{self.spatial_dim}) with its orthonormal (Lebesgue) "
                f"measure, coordinates in a Helmert basis; pair term in the "
                f"'{self.convention}' convention (s = {self.pair_factor:g})")

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """U in kT units (at T = 1); flow coordinates (..., dim) -> (...)."""
        # Powers of d² and no square root: cheaper, and its derivatives (forces, the Hessian
        # of the configurational temperature) are those of a rational function.
        q = (self.r_m**2 / self.squared_pair_distances(x)) ** 3  # (r_m / d)^6
        pair = (q * q - 2.0 * q).sum(dim=-1)
        # |z|² = Σ_i |x_i − x̄|²: the Helmert map is an isometry onto the zero-sum subspace.
        trap = x.square().sum(dim=-1)
        return self.pair_factor * self.epsilon * pair + self.c_osc * trap
