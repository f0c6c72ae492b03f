"""A rigid regular tetrahedron held at the origin in an external field: orientations only.

Four identical sites at ``site_distance`` (nm) from the centre, at the body-frame directions
n_i ∈ {(1,1,1), (1,−1,−1), (−1,1,−1), (−1,−1,1)}/√3 (the "even" corners of a cube). The field
is a Gaussian well at each of the eight corners c_j of the cube inscribed in the same sphere,

    U(R) = − Σ_i Σ_j ε_j exp(−|R r_i − r c_j|² / (2 σ²)),   r_i = r n_i,   r = site_distance,

with depth ε_even at the four even corners and ε_odd at the four odd ones (kJ/mol) and width σ
(nm). A vertex can sit in a well only when all four can (the tetrahedron's vertex angle,
109.47°, separates only same-parity corners), so the minima are the 24 rotations of the
octahedral group O: 12 that put the vertices in the even wells (energy ≈ −4 ε_even) and 12 in
the odd wells (≈ −4 ε_odd). The tetrahedral symmetry makes each set of 12 equivalent; the
unequal depths give the two sets different weights. On S³ these are 48 modes (±q).

Flow coordinates: the unit quaternion q (dim 4) of the body's orientation; the centre is held
at the origin and is not a coordinate. Measure: normalized Haar on SO(3) (equivalently the
normalized surface measure of S³ for the flip-symmetric density; see
:mod:`boltzgen.rigid.quaternions`), so the uniform distribution has f = 0 and

    f(T) = −ln ∫_{SO(3)} exp(−U(R)/k_B T) dμ(R),   μ(SO(3)) = 1,   in kT.

Exact answers: Z by tensor-product quadrature in ZYZ Euler angles (Gauss–Legendre in cos β,
the periodic trapezoid rule in α and γ, both spectrally accurate for this smooth integrand);
mode weights from the same quadrature with each node assigned to the nearest element of O
(its Voronoi cell); exact samples by rejection from uniform rotations under the envelope
exp(−(U − U_floor)/k_B T), where U_floor is a proven lower bound of U (four times the
minimum over directions of one site's energy).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch

from boltzgen._checks import check_float, check_int
from boltzgen.rigid.bodies import RigidLayout
from boltzgen.rigid.quaternions import (
    canonical,
    matrix_to_quaternion,
    multiply,
    quaternion_to_matrix,
    random_unit_quaternions,
)
from boltzgen.systems.base import System
from boltzgen.units import KB_KJ_PER_MOL_K

_EVEN = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]],
                 dtype=np.float64) / math.sqrt(3)
_CORNERS = np.concatenate([_EVEN, -_EVEN])  # even corners, then the odd ones


def octahedral_group_quaternions() -> np.ndarray:
    """The 24 rotations of the cube (group O) as canonical unit quaternions, shape (24, 4).

    The first 12 are the tetrahedral group T (they map the even corners to themselves).
    """
    mats = []
    for perm in ([0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 2, 1], [2, 1, 0], [1, 0, 2]):
        for signs in np.array(np.meshgrid([1, -1], [1, -1], [1, -1])).T.reshape(-1, 3):
            m = np.zeros((3, 3))
            m[np.arange(3), perm] = signs
            if np.isclose(np.linalg.det(m), 1.0):
                mats.append(m)
    mats = np.array(mats)
    even_set = {tuple(np.round(v, 6)) for v in _EVEN}
    keeps_even = np.array(
        [all(tuple(np.round(m @ v, 6)) in even_set for v in _EVEN) for m in mats]
    )
    ordered = np.concatenate([mats[keeps_even], mats[~keeps_even]])
    return canonical(matrix_to_quaternion(torch.from_numpy(ordered))).numpy()


class TetrahedronInField(System):
    """Rigid tetrahedron at the origin in the eight-well field of the module docstring."""

    kind: ClassVar[str] = "tetrahedron_field"
    estimand_note: ClassVar[str] = (
        "Z over SO(3) with normalized Haar measure (unit quaternion coordinates; uniform "
        "rotations have f = 0)"
    )
    dim: int = 4
    boltzmann_constant: float = KB_KJ_PER_MOL_K

    def __init__(self, *, site_distance: float = 0.109, well_width: float = 0.04,
                 well_depth_even: float = 5.0, well_depth_odd: float = 4.5,
                 quadrature_points: int = 96) -> None:
        self.site_distance = check_float("site_distance", site_distance, positive=True)
        self.well_width = check_float("well_width", well_width, positive=True)
        self.well_depth_even = check_float("well_depth_even", well_depth_even, positive=True)
        self.well_depth_odd = check_float("well_depth_odd", well_depth_odd, positive=True)
        self.quadrature_points = check_int("quadrature_points", quadrature_points, minimum=16)
        # |R r_i − r c_j|² = 2 r² (1 − (R n_i)·c_j): each well is exp(κ (cos − 1)).
        self._kappa = self.site_distance**2 / self.well_width**2
        self._depths = np.array([well_depth_even] * 4 + [well_depth_odd] * 4, dtype=np.float64)

    # -- energy ---------------------------------------------------------------------------
    def site_energy(self, directions: torch.Tensor) -> torch.Tensor:
        """Energy (kJ/mol) of one site at unit direction(s) (..., 3) -> (...)."""
        return _site_energy(directions, self._kappa, self._depths)

    def site_directions(self, q: torch.Tensor) -> torch.Tensor:
        """World directions R(q) n_i of the four sites, (..., 4) -> (..., 4 sites, 3)."""
        return _site_directions(q)

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """U(q) in kJ/mol; (..., 4) -> (...). Flip-invariant: U(q) = U(−q)."""
        self._check_coordinates(x)
        return self.site_energy(self.site_directions(x)).sum(-1)

    def energy_floor(self) -> float:
        """A lower bound of U (kJ/mol): 4 × min over unit directions of one site's energy.

        The single-site minimum is found by projected gradient descent started at every corner
        and at 2000 uniform directions, then lowered by a margin that bounds the error of the
        located minimum (the site energy's gradient is at most Σ ε_j κ per radian).
        """
        return _energy_floor(self._kappa, tuple(self._depths))

    # -- exact answers ----------------------------------------------------------------------
    def exact_free_energy(self, temperature: float) -> float:
        """f(T) = −ln Z(T) in kT by Euler-angle quadrature (module docstring)."""
        t = check_float("temperature", temperature, positive=True)
        return _quadrature(self._key(), t)[0]

    def exact_mode_probabilities(self, temperature: float) -> np.ndarray:
        """Probability of each of the 24 modes (Voronoi cells of O) at T, by quadrature."""
        t = check_float("temperature", temperature, positive=True)
        return _quadrature(self._key(), t)[1].copy()

    def barrier_lower_bound_kt(self, temperature: float) -> float:
        """min over the quadrature nodes on cell boundaries of (U − U_min)/kT: a lower bound
        (to the grid's resolution) of the barrier between neighbouring modes."""
        t = check_float("temperature", temperature, positive=True)
        return _quadrature(self._key(), t)[2]

    def mode_index(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Index 0..23 of the nearest element of O (max |q·g|) for each quaternion (N, 4)."""
        q = torch.as_tensor(np.array(x, dtype=np.float64))
        group = torch.as_tensor(octahedral_group_quaternions())
        return (q @ group.T).abs().argmax(-1).numpy()

    def exact_samples(self, n: int, temperature: float, seed: int) -> tuple[np.ndarray, int]:
        """``n`` exact samples (canonical quaternions) by rejection, and the proposals used."""
        n = check_int("n", n, minimum=1)
        t = check_float("temperature", temperature, positive=True)
        kt = self.boltzmann_constant * t
        floor = self.energy_floor()
        generator = torch.Generator().manual_seed(int(seed))
        accepted: list[torch.Tensor] = []
        have, proposals = 0, 0
        while have < n:
            q = random_unit_quaternions(1_000_000, generator)
            u = self.potential(q)
            keep = torch.rand(len(q), generator=generator, dtype=torch.float64) < torch.exp(
                -(u - floor) / kt)
            accepted.append(q[keep])
            have += int(keep.sum())
            proposals += len(q)
        return canonical(torch.cat(accepted)[:n]).numpy(), proposals

    def layout(self) -> RigidLayout:
        """One body, orientation only (its centre is held at the origin)."""
        return RigidLayout(n_bodies=1)

    def observables(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Where each body axis points: cos(polar angle) and azimuth (rad) of R e_a, a = x, y, z."""
        q = torch.as_tensor(np.array(self._as_samples(x)))
        axes = quaternion_to_matrix(q).numpy()  # column a is R e_a
        out: dict[str, np.ndarray] = {}
        for a, name in enumerate("xyz"):
            d = axes[:, :, a]
            out[f"axis_{name}_cos_polar"] = d[:, 2].copy()
            out[f"axis_{name}_azimuth_rad"] = np.arctan2(d[:, 1], d[:, 0])
        return out

    def _key(self) -> tuple[float, ...]:
        return (self._kappa, *self._depths.tolist(), float(self.quadrature_points))


def _site_energy(directions: torch.Tensor, kappa: float, depths: np.ndarray) -> torch.Tensor:
    """−Σ_j ε_j exp(κ (n·c_j − 1)) for unit directions n (..., 3), kJ/mol."""
    corners = torch.as_tensor(_CORNERS, dtype=directions.dtype, device=directions.device)
    eps = torch.as_tensor(depths, dtype=directions.dtype, device=directions.device)
    return -(eps * torch.exp(kappa * (directions @ corners.T - 1.0))).sum(-1)


def _site_directions(q: torch.Tensor) -> torch.Tensor:
    body = torch.as_tensor(_EVEN, dtype=q.dtype, device=q.device)
    return (quaternion_to_matrix(q)[..., None, :, :] @ body[..., None])[..., 0]


@lru_cache(maxsize=8)
def _energy_floor(kappa: float, depths: tuple[float, ...]) -> float:
    corners = torch.as_tensor(_CORNERS)
    eps = torch.as_tensor(depths)
    start = torch.cat([corners, random_unit_quaternions(2000, torch.Generator().manual_seed(0))[
        :, 1:]])
    n = (start / start.norm(dim=-1, keepdim=True)).clone()
    for _ in range(2000):
        n.requires_grad_(True)
        e = _site_energy(n, kappa, np.asarray(depths))
        (grad,) = torch.autograd.grad(e.sum(), n)
        with torch.no_grad():
            n = n - 1e-3 / (kappa * float(eps.max())) * grad
            n = n / n.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        e = _site_energy(n, kappa, np.asarray(depths))
    lipschitz = float((eps * kappa).sum())
    return 4.0 * (float(e.min()) - lipschitz * 1e-6)


@lru_cache(maxsize=16)
def _quadrature(key: tuple[float, ...], temperature: float) -> tuple[float, np.ndarray, float]:
    kappa, depths, n = key[0], np.array(key[1:9]), int(key[9])
    kt = KB_KJ_PER_MOL_K * temperature
    nodes, weights = np.polynomial.legendre.leggauss(n)  # in cos β
    beta = torch.as_tensor(np.arccos(nodes))
    w_beta = torch.as_tensor(weights / 2.0)
    angles = torch.arange(2 * n, dtype=torch.float64) * (2.0 * math.pi / (2 * n))
    group = torch.as_tensor(octahedral_group_quaternions())
    log_terms, cells = [], []
    boundary_min, global_min = math.inf, math.inf
    qz_gamma = _axis_quaternion(angles, 2)
    qz_alpha = _axis_quaternion(angles, 2)[:, None, :]
    for i in range(n):  # one β at a time keeps memory at (2n)² nodes
        qb = _axis_quaternion(beta[i : i + 1], 1)[None, :, :]
        q = multiply(multiply(qz_alpha, qb), qz_gamma[None, :, :]).reshape(-1, 4)
        u = _site_energy(_site_directions(q), kappa, depths).sum(-1)
        log_terms.append(-u / kt + math.log(float(w_beta[i])) - 2 * math.log(2 * n))
        overlap = (q @ group.T).abs()
        top2 = overlap.topk(2, dim=-1).values
        cells.append(overlap.argmax(-1))
        # Nodes within a thin layer of a cell boundary (two nearest elements of O almost tied).
        on_boundary = top2[:, 0] - top2[:, 1] < 0.02
        if bool(on_boundary.any()):
            boundary_min = min(boundary_min, float(u[on_boundary].min()))
        global_min = min(global_min, float(u.min()))
    log_w = torch.cat(log_terms)
    log_z = torch.logsumexp(log_w, 0)
    probs = torch.zeros(len(group), dtype=torch.float64).index_add_(
        0, torch.cat(cells), torch.exp(log_w - log_z))
    barrier = (boundary_min - global_min) / kt
    return -float(log_z), probs.numpy(), barrier


def _axis_quaternion(angles: torch.Tensor, axis: int) -> torch.Tensor:
    """Quaternions (n, 4) of rotations by ``angles`` about coordinate ``axis`` (0, 1, 2)."""
    q = torch.zeros(len(angles), 4, dtype=torch.float64)
    q[:, 0] = torch.cos(angles / 2)
    q[:, axis + 1] = torch.sin(angles / 2)
    return q
