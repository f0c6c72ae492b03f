"""Internal coordinates of a molecule (a Z-matrix from its bond graph), float64, batched.

**The Z-matrix.** Atoms are placed one after another. The first three, a, b, c, are bonded
(a–b–c, b the central atom: a graph centre, heavy atoms preferred) and fix the frame; every
later atom i gets three placed atoms (j, k, l): j bonded to i, k bonded to j, l bonded to j
(a sibling of i) or to k, and its internal coordinates are

    r_i = |x_i − x_j| (nm),   θ_i = ∠(x_i, x_j, x_k) ∈ (0, π),   τ_i = dihedral(i, j, k, l),

τ_i ∈ [−π, π) (rad). With b and c: r_b = |x_b − x_a|, r_c = |x_c − x_b|, θ_c = ∠(c, b, a).
Arrays (batch shape (...)): bonds (..., n − 1) = (r_b, r_c, r_i…), angles (..., n − 2) =
(θ_c, θ_i…), torsions (..., n − 3) = (τ_i…), in placement order: 3n − 6 numbers invariant under
translations and rotations (not reflections: a mirror image flips every torsion). A ring-closing
bond is no entry (its length follows from the others). A linear triple (j, k, l) has no defined
torsion; the Z-matrix cannot see one from the topology (peptides have none).

**The canonical frame** (:meth:`ZMatrix.to_cartesian`): a at the origin, b on +x, c in the xy
plane with y > 0,

    x_a = 0,   x_b = (r_b, 0, 0),   x_c = (r_b − r_c cos θ_c, r_c sin θ_c, 0),

and every later atom by the NeRF construction (Parsons et al., J. Comput. Chem. 26 (2005) 1063)
from x_l, x_k, x_j: with e = (x_j − x_k)/|x_j − x_k|, n = (x_k − x_l) × e / |…|,

    x_i = x_j + r_i (−cos θ_i e + sin θ_i cos τ_i (n × e) + sin θ_i sin τ_i n).

**The volume element.** Rigid motions act on R^{3n}; write x = T + R · x̂(q) with x̂ in the
canonical frame, T ∈ R³ (x_a), R ∈ SO(3) and q the internal coordinates. Then

    dx^{3n} = dT · dR · dμ(q),   dμ = r_b² · r_c² sin θ_c dr_b dr_c dθ_c · Π_{i≥3} r_i² sin θ_i
                                                                                 dr_i dθ_i dτ_i,

with dR the Haar measure of SO(3) of total mass 8π². Derivation, atom by atom: x_a = T (dT).
x_b − x_a in spherical coordinates, r_b² dr_b dΩ_b (dΩ_b on S², mass 4π). x_c − x_b in
spherical coordinates about the axis of b: r_c² sin θ_c dr_c dθ_c dφ_c; the direction of b
(dΩ_b) and the azimuth φ_c of c about it (dφ_c, mass 2π) are the rotation R: dΩ_b dφ_c = dR
(4π · 2π = 8π²). Every later atom: spherical coordinates of x_i − x_j in the frame of (j, k, l),
which the atoms placed before fix: r_i² sin θ_i dr_i dθ_i dτ_i (the torsion is the azimuth). So

    log|det ∂x̂/∂q| (the quotient measure's density) = Σ_bonds 2 ln r + Σ_angles ln sin θ

(:func:`log_volume_element`), the log-det of internal -> Cartesian coordinates of a flow whose
densities are with respect to dμ. The 3n − 6 *frame coordinates* of x̂ (x_b, x_c, y_c, then the
three coordinates of every later atom; :meth:`ZMatrix.frame_coordinates`) are another chart of
the same quotient: dx^{3n} = dT dR x_b² y_c d(frame coordinates), so
log|det ∂(frame coordinates)/∂q| = log_volume_element − ln(x_b² y_c) (tests check both).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from functools import lru_cache

import torch

from boltzgen._checks import check_int
from boltzgen.layouts import MoleculeLayout

__all__ = ["ZMatrix", "bond_angle", "connected", "dihedral", "log_volume_element",
           "valid_internal", "wrap_angle"]

HYDROGENS = ("H", "D")  # element symbols placed after the heavy atoms


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """angle modulo 2π in [−π, π) (rad); π itself (and rounding just below −π) maps to −π."""
    out = torch.remainder(angle + math.pi, 2.0 * math.pi) - math.pi
    return torch.where(out >= math.pi, out - 2.0 * math.pi, out)


def bond_angle(xi: torch.Tensor, xj: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
    """∠(i, j, k) ∈ [0, π] (rad) at j, as atan2(|u × v|, u · v) with u = x_i − x_j,
    v = x_k − x_j (accurate near 0 and π, where an arccos is not); (..., 3) -> (...)."""
    u, v = xi - xj, xk - xj
    return torch.atan2(torch.linalg.vector_norm(torch.cross(u, v, dim=-1), dim=-1),
                       (u * v).sum(-1))


def dihedral(xi: torch.Tensor, xj: torch.Tensor, xk: torch.Tensor, xl: torch.Tensor
             ) -> torch.Tensor:
    """Dihedral of the chain i–j–k–l (= that of l–k–j–i) in [−π, π) (rad); (..., 3) -> (...).

    With v1 = x_j − x_i, v2 = x_k − x_j, v3 = x_l − x_k, n1 = v1 × v2, n2 = v2 × v3:
    τ = atan2((n1 × n2) · v2 / |v2|, n1 · n2), the IUPAC sign (clockwise looking along j -> k
    is positive), the convention of :meth:`ZMatrix.to_cartesian`.
    """
    v1, v2, v3 = xj - xi, xk - xj, xl - xk
    n1, n2 = torch.cross(v1, v2, dim=-1), torch.cross(v2, v3, dim=-1)
    e2 = v2 / torch.linalg.vector_norm(v2, dim=-1, keepdim=True)
    return wrap_angle(torch.atan2((torch.cross(n1, n2, dim=-1) * e2).sum(-1),
                                  (n1 * n2).sum(-1)))


def log_volume_element(bonds: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """ln of the density of the quotient measure dμ (module docstring) in internal coordinates:
    Σ 2 ln r (nm², over the n − 1 bonds) + Σ ln sin θ (over the n − 2 angles); (...)."""
    return 2.0 * torch.log(bonds).sum(-1) + torch.log(torch.sin(angles)).sum(-1)


def valid_internal(bonds: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Whether internal coordinates can come from Cartesian ones: every r > 0 and every θ in
    (0, π) (outside, the construction still gives a point, but one whose own internal
    coordinates are others: |r|, π − θ, …); (...) bool."""
    return (bonds > 0).all(-1) & ((angles > 0) & (angles < math.pi)).all(-1)


def connected(n_atoms: int, bonds: Sequence[tuple[int, int]]) -> bool:
    """Whether ``bonds`` connect all ``n_atoms`` atoms (one connected graph)."""
    return min(_distances(_neighbours(n_atoms, bonds), 0)) >= 0


@dataclasses.dataclass(frozen=True)
class ZMatrix:
    """Placement order and (i, j, k, l) of every atom after the frame (module docstring).

    ``order``: the atoms in placement order, ``order[:3]`` = (a, b, c); ``entries``: (i, j, k, l)
    for ``order[3:]``; ``levels``: entry positions grouped so that every entry of a group
    depends only on atoms of earlier groups (one vectorised NeRF step per group).
    """

    n_atoms: int
    order: tuple[int, ...]
    entries: tuple[tuple[int, int, int, int], ...]
    levels: tuple[tuple[int, ...], ...]

    # -- construction from the bond graph ----------------------------------------------------
    @classmethod
    def from_layout(cls, layout: MoleculeLayout) -> ZMatrix:
        """The Z-matrix of a molecule layout's bonds (and elements, where given)."""
        return cls.from_bonds(layout.n_atoms, layout.bonds, layout.elements)

    @classmethod
    def from_bonds(cls, n_atoms: int, bonds: Sequence[tuple[int, int]],
                   elements: Sequence[str] = ()) -> ZMatrix:
        """A deterministic Z-matrix of a connected bond graph of ``n_atoms`` >= 3 atoms.

        Heavy atoms (elements other than H, D; without elements: atoms with two or more
        bonds) come before hydrogens wherever the graph allows, then atoms nearer the frame's
        centre b, then lower indices. b is a graph centre (least eccentricity) among the atoms
        with two bonded neighbours, heavy neighbours preferred; a and c are its neighbours in
        the same preference. For atom i: j is its earliest placed neighbour, k the earliest
        placed neighbour of j other than i, and l a sibling (another placed neighbour m ≠ k of
        j) where j has one, else the earliest placed neighbour of k other than j.

        Why a sibling: the torsion (i, j, k, m) is the angle about the j–k axis between two
        atoms bonded to j, which the local geometry of j fixes (about ±120° at an sp3 centre,
        180° at an sp2 one) whatever the rotation about j–k; (i, j, k, l) with l bonded to k
        would repeat that rotation for every atom on j (e.g. the 2nd and 3rd hydrogens of a
        methyl would each get the methyl's three rotamers). One multimodal torsion per rotatable
        bond, and unimodal ones for the rest, is what a flow on the torus learns easily.
        """
        n = check_int("n_atoms", n_atoms, minimum=1)
        if n < 3:
            raise ValueError(f"n_atoms: {n} is not allowed; a Z-matrix needs >= 3 atoms")
        neighbours = _neighbours(n, bonds)
        distances = [_distances(neighbours, s) for s in range(n)]
        unreachable = [i for i in range(n) if distances[0][i] < 0]
        if unreachable:
            shown = ", ".join(map(str, unreachable[:10])) + (", …" if len(unreachable) > 10
                                                            else "")
            raise ValueError(f"bonds: a graph in which atoms {shown} are not connected to atom 0 "
                             f"is not allowed; the bonds must connect all {n} atoms")
        if elements:
            hydrogen = [e.strip().upper() in HYDROGENS for e in elements]
        else:
            hydrogen = [len(neighbours[i]) < 2 for i in range(n)]
        eccentricity = [max(d) for d in distances]

        def rank(i: int) -> tuple[int, int, int]:
            return (int(hydrogen[i]), eccentricity[i], i)

        def heavy_neighbours(i: int) -> int:
            return sum(not hydrogen[m] for m in neighbours[i])

        centre = min((i for i in range(n) if len(neighbours[i]) >= 2),
                     key=lambda i: (-min(heavy_neighbours(i), 2), *rank(i)))
        a, c = sorted(neighbours[centre], key=rank)[:2]
        order = [a, centre, c]
        placed = {a: 0, centre: 1, c: 2}
        depth = distances[centre]
        while len(order) < n:
            frontier = {m for i in order for m in neighbours[i] if m not in placed}
            nxt = min(frontier, key=lambda m: (int(hydrogen[m]), depth[m], m))
            placed[nxt] = len(order)
            order.append(nxt)
        entries = tuple(_entry(i, neighbours, placed) for i in order[3:])
        return cls(n, tuple(order), entries, _levels(entries, order[:3]))

    # -- sizes --------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """3n − 6 internal coordinates."""
        return 3 * self.n_atoms - 6

    @property
    def n_torsions(self) -> int:
        return self.n_atoms - 3

    def rotation_entry(self, b: int, c: int) -> int:
        """The position (in ``entries``) of the torsion that carries the rotation about the
        bond b–c: the entry (i, j, k, l) with {j, k} = {b, c} and l bonded to k, i.e. a
        proper dihedral across the bond (the first atom placed on the far side of it; every
        later atom on that side is placed by a sibling torsion, relative to it). Rotating the
        molecule's two halves about b–c changes this torsion alone. ValueError where no entry
        crosses the bond that way (b–c not a bond, or a ring bond closed by the Z-matrix)."""
        neighbours = _neighbours(self.n_atoms, [(e[0], e[1]) for e in self.entries]
                                 + [(self.order[0], self.order[1]),
                                    (self.order[1], self.order[2])])
        for position, (_, j, k, ell) in enumerate(self.entries):
            if {j, k} == {b, c} and ell in neighbours[k]:
                return position
        raise ValueError(f"torsion: no Z-matrix torsion carries the rotation about atoms "
                         f"{b}-{c}; need a bond of the molecule's tree, not a ring bond")

    # -- Cartesian -> internal ------------------------------------------------------------------
    def _index(self, atoms: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        return _index_tensor(tuple(atoms), like.device)

    def _atoms(self, x: torch.Tensor, atoms: Sequence[int]) -> torch.Tensor:
        return x.index_select(-2, self._index(atoms, x))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim < 2 or tuple(x.shape[-2:]) != (self.n_atoms, 3):
            raise ValueError(f"x: shape {tuple(x.shape)} is not allowed; need (..., "
                             f"{self.n_atoms}, 3)")

    def to_internal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cartesian (..., n, 3) nm in any position and orientation -> (bonds (..., n − 1) nm,
        angles (..., n − 2) rad, torsions (..., n − 3) rad in [−π, π))."""
        self._check(x)
        a, b, c = self.order[:3]
        ci, cj, ck, cl = _columns(self.entries)
        bonds = torch.linalg.vector_norm(self._atoms(x, [b, c, *ci])
                                         - self._atoms(x, [a, b, *cj]), dim=-1)
        angles = bond_angle(self._atoms(x, [c, *ci]), self._atoms(x, [b, *cj]),
                            self._atoms(x, [a, *ck]))
        torsions = dihedral(self._atoms(x, ci), self._atoms(x, cj), self._atoms(x, ck),
                            self._atoms(x, cl))
        return bonds, angles, torsions

    # -- internal -> Cartesian ------------------------------------------------------------------
    def to_cartesian(self, bonds: torch.Tensor, angles: torch.Tensor, torsions: torch.Tensor
                     ) -> torch.Tensor:
        """Internal coordinates -> Cartesian (..., n, 3) in the canonical frame (module
        docstring), atoms in index order; differentiable."""
        n = self.n_atoms
        for name, value, size in (("bonds", bonds, n - 1), ("angles", angles, n - 2),
                                  ("torsions", torsions, n - 3)):
            if value.shape[-1:] != (size,):
                raise ValueError(f"{name}: shape {tuple(value.shape)} is not allowed; need "
                                 f"(..., {size})")
        r_b, r_c, theta_c = bonds[..., 0], bonds[..., 1], angles[..., 0]
        zero = torch.zeros_like(r_b)
        frame = torch.stack([torch.stack([zero, zero, zero], -1),
                             torch.stack([r_b, zero, zero], -1),
                             torch.stack([r_b - r_c * torch.cos(theta_c),
                                          r_c * torch.sin(theta_c), zero], -1)], -2)
        x = frame.new_zeros((*frame.shape[:-2], n, 3))
        x = x.index_copy(-2, self._index(self.order[:3], x), frame)
        for level in self.levels:
            where = self._index(level, x)
            ci, cj, ck, cl = _columns([self.entries[e] for e in level])
            x = x.index_copy(-2, self._index(ci, x), _nerf(
                self._atoms(x, cl), self._atoms(x, ck), self._atoms(x, cj),
                bonds[..., 2:].index_select(-1, where), angles[..., 1:].index_select(-1, where),
                torsions.index_select(-1, where)))
        return x

    # -- frames ---------------------------------------------------------------------------------
    def canonical_frame(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n, 3) moved rigidly (a translation and a proper rotation) into the canonical
        frame: a at the origin, b on +x, c in the xy plane with y > 0."""
        self._check(x)
        a, b, c = self.order[:3]
        centred = x - x[..., a : a + 1, :]
        e1 = centred[..., b, :] / torch.linalg.vector_norm(centred[..., b, :], dim=-1,
                                                            keepdim=True)
        v = centred[..., c, :]
        v = v - (v * e1).sum(-1, keepdim=True) * e1
        e2 = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        rotation = torch.stack([e1, e2, torch.cross(e1, e2, dim=-1)], dim=-1)  # columns
        return centred @ rotation

    def frame_coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """The 3n − 6 frame coordinates of x (..., n, 3) in the canonical frame: x_b, x_c, y_c,
        then x, y, z of every later atom in placement order."""
        self._check(x)
        _, b, c = self.order[:3]
        rest = self._atoms(x, self.order[3:]).flatten(-2)
        return torch.cat([x[..., b, :1], x[..., c, :2], rest], dim=-1)

    def from_frame_coordinates(self, f: torch.Tensor) -> torch.Tensor:
        """The canonical-frame Cartesian x (..., n, 3) of frame coordinates f (..., 3n − 6)."""
        if f.shape[-1:] != (self.dim,):
            raise ValueError(f"f: shape {tuple(f.shape)} is not allowed; need (..., {self.dim})")
        zero = torch.zeros_like(f[..., :1])
        frame = torch.stack([torch.cat([zero, zero, zero], -1),
                             torch.cat([f[..., :1], zero, zero], -1),
                             torch.cat([f[..., 1:3], zero], -1)], -2)
        rest = f[..., 3:].reshape(*f.shape[:-1], self.n_atoms - 3, 3)
        x = f.new_zeros((*f.shape[:-1], self.n_atoms, 3))
        x = x.index_copy(-2, self._index(self.order[:3], x), frame)
        return x.index_copy(-2, self._index(self.order[3:], x), rest)

    def log_frame_volume(self, x: torch.Tensor) -> torch.Tensor:
        """ln(x_b² y_c) of x (..., n, 3) in the canonical frame: the density of the quotient
        measure in frame coordinates (module docstring)."""
        _, b, c = self.order[:3]
        return 2.0 * torch.log(x[..., b, 0]) + torch.log(x[..., c, 1])


@lru_cache(maxsize=1024)
def _index_tensor(atoms: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An index tensor, made once per device (no host-to-device copy per call on a GPU)."""
    return torch.tensor(atoms, dtype=torch.long, device=device)


def _neighbours(n_atoms: int, bonds: Sequence[tuple[int, int]]) -> list[set[int]]:
    neighbours: list[set[int]] = [set() for _ in range(n_atoms)]
    for i, j in bonds:
        neighbours[i].add(j)
        neighbours[j].add(i)
    return neighbours


def _distances(neighbours: list[set[int]], source: int) -> list[int]:
    """Graph distances from ``source`` (−1 where unreachable), by breadth-first search."""
    out = [-1] * len(neighbours)
    out[source] = 0
    queue = deque([source])
    while queue:
        i = queue.popleft()
        for m in neighbours[i]:
            if out[m] < 0:
                out[m] = out[i] + 1
                queue.append(m)
    return out


def _entry(i: int, neighbours: list[set[int]], placed: dict[int, int]
           ) -> tuple[int, int, int, int]:
    """(i, j, k, l) for atom i (rules in :meth:`ZMatrix.from_bonds`)."""

    def earliest(atoms: set[int], exclude: set[int]) -> int | None:
        before = [m for m in atoms if m in placed and placed[m] < placed[i] and m not in exclude]
        return min(before, key=placed.__getitem__) if before else None

    j = earliest(neighbours[i], set())
    assert j is not None  # atoms are placed from the frontier of the placed ones
    k = earliest(neighbours[j], {i})
    assert k is not None  # j was placed next to another atom (the frame: a–b–c)
    ell = earliest(neighbours[j], {i, k})  # a sibling of i on j
    if ell is None:
        ell = earliest(neighbours[k], {i, j})
    if ell is None:  # not reached for a frame a–b–c, kept so that l is always defined
        ell = earliest(set(placed), {i, j, k})
    assert ell is not None
    return i, j, k, ell


def _columns(entries: Sequence[tuple[int, int, int, int]]
             ) -> tuple[list[int], list[int], list[int], list[int]]:
    """The i, j, k and l of ``entries`` as four lists (empty for no entries)."""
    return tuple(list(column) for column in zip(*entries, strict=True)) if entries else (
        [], [], [], [])  # type: ignore[return-value]


def _levels(entries: tuple[tuple[int, int, int, int], ...], frame: list[int]
            ) -> tuple[tuple[int, ...], ...]:
    level = dict.fromkeys(frame, 0)
    groups: dict[int, list[int]] = {}
    for position, (i, *before) in enumerate(entries):
        level[i] = 1 + max(level[m] for m in before)
        groups.setdefault(level[i], []).append(position)
    return tuple(tuple(groups[g]) for g in sorted(groups))


def _nerf(xl: torch.Tensor, xk: torch.Tensor, xj: torch.Tensor, r: torch.Tensor,
          theta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """x_i from x_l, x_k, x_j (..., m, 3) and r, θ, τ (..., m) (module docstring)."""
    e = xj - xk
    e = e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)
    normal = torch.cross(xk - xl, e, dim=-1)
    normal = normal / torch.linalg.vector_norm(normal, dim=-1, keepdim=True)
    in_plane = torch.cross(normal, e, dim=-1)
    sin_theta = torch.sin(theta)
    return xj + r[..., None] * (-torch.cos(theta)[..., None] * e
                                + (sin_theta * torch.cos(tau))[..., None] * in_plane
                                + (sin_theta * torch.sin(tau))[..., None] * normal)
