"""Rigid molecules as (position, orientation), periodic boxes and the layout a flow acts on.

A rigid template holds site coordinates s_k (nm) in the body frame; a body at position t with
orientation q has its sites at x_k = t + R(q) s_k. The template's body-frame origin is the
reference point whose position is t (the oxygen for water, the centre for the tetrahedron).

Change of measure. For a template with at least three non-collinear sites the map
(t, R) -> (x_1, ..., x_n) embeds R³ × SO(3) in R^{3n}, and the 6-D volume it induces there is

    dV = n^{3/2} sqrt(det I_c) · d³t · dω³,

with I_c the (unit-mass) inertia tensor of the sites about their centroid and dω³ the volume of
SO(3) in the metric where a rotation by δ radians has length δ (total 8π²; normalized Haar
measure μ = ω³ / 8π²). The factor is the square root of the Gram determinant of the six tangent
vectors (three translations: n I₃; three rotations: the inertia tensor, after the Schur
complement removes the translation coupling); it is the same at every (t, R). Densities on the
rigid submanifold of Cartesian space and on (position, Haar) therefore differ by a constant,
which cancels in every free-energy difference between states of the same system.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from boltzgen.layouts import LAYOUTS, Layout
from boltzgen.rigid.quaternions import (
    HAAR_SO3_VOLUME_RAD3,
    check_unit_quaternion,
    matrix_to_quaternion,
    quaternion_to_matrix,
)

__all__ = ["PeriodicBox", "RigidLayout", "RigidTemplate", "TETRAHEDRON", "WATER_TIP4P_EW"]


@dataclass(frozen=True)
class RigidTemplate:
    """Body-frame site coordinates (nm), shape (n_sites, 3), n_sites >= 3 and not collinear."""

    name: str
    sites: tuple[tuple[float, float, float], ...]
    site_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        coords = torch.tensor(self.sites, dtype=torch.float64)
        if coords.ndim != 2 or coords.shape[1] != 3 or not bool(torch.isfinite(coords).all()):
            raise ValueError(f"sites: {self.sites!r} is not allowed; need finite (n, 3) nm")
        if coords.shape[0] < 3:
            raise ValueError(
                f"sites: {coords.shape[0]} site(s) is not allowed; a rigid template needs at "
                "least three non-collinear sites to fix an orientation"
            )
        singular = torch.linalg.svdvals(coords - coords.mean(0))
        if float(singular[1]) <= 1e-9 * max(float(singular[0]), 1e-30):
            raise ValueError(
                f"sites: {self.sites!r} are collinear; a rigid template needs at least three "
                "non-collinear sites to fix an orientation"
            )
        if self.site_names and len(self.site_names) != coords.shape[0]:
            raise ValueError(
                f"site_names: {self.site_names!r} has {len(self.site_names)} names for "
                f"{coords.shape[0]} sites"
            )

    def coordinates(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None
                    = None) -> torch.Tensor:
        return torch.tensor(self.sites, dtype=dtype, device=device)

    def to_sites(self, positions: torch.Tensor, quaternions: torch.Tensor) -> torch.Tensor:
        """x_k = t + R(q) s_k: positions (..., 3), unit quaternions (..., 4) -> (..., n, 3)."""
        check_unit_quaternion(quaternions, "quaternions")
        s = self.coordinates(positions.dtype, positions.device)
        rotated = (quaternion_to_matrix(quaternions)[..., None, :, :] @ s[..., None])[..., 0]
        return positions[..., None, :] + rotated

    def from_sites(self, sites: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, canonical q) of the best rigid fit to sites (..., n, 3) (Kabsch, least squares).

        Exact for sites produced by :meth:`to_sites`; for distorted sites it is the rotation
        and translation minimising Σ_k |t + R s_k − x_k|².
        """
        s = self.coordinates(sites.dtype, sites.device)
        if sites.shape[-2:] != s.shape:
            raise ValueError(f"sites: shape {tuple(sites.shape)} is not allowed; need (..., "
                             f"{s.shape[0]}, 3)")
        s_mean, x_mean = s.mean(-2), sites.mean(-2)
        cov = (sites - x_mean[..., None, :]).transpose(-1, -2) @ (s - s_mean)
        u, _, vt = torch.linalg.svd(cov)
        d = torch.sign(torch.linalg.det(u @ vt))
        correction = torch.ones_like(u[..., 0, :])
        correction[..., -1] = d
        rotation = (u * correction[..., None, :]) @ vt
        position = x_mean - (rotation @ s_mean[..., None])[..., 0]
        return position, matrix_to_quaternion(rotation)

    def measure_factor(self) -> float:
        """n^{3/2} sqrt(det I_c) · 8π²: Cartesian rigid volume per unit of d³t × normalized Haar."""
        s = self.coordinates()
        c = s - s.mean(0)
        inertia = (c * c).sum() * torch.eye(3, dtype=s.dtype) - c.T @ c
        n = s.shape[0]
        return n**1.5 * math.sqrt(float(torch.linalg.det(inertia))) * HAAR_SO3_VOLUME_RAD3


def _tetrahedron(distance: float) -> RigidTemplate:
    v = distance / math.sqrt(3.0)
    return RigidTemplate(
        "tetrahedron",
        ((v, v, v), (v, -v, -v), (-v, v, -v), (-v, -v, v)),
        ("A1", "A2", "A3", "A4"),
    )


TETRAHEDRON = _tetrahedron(0.109)
"""Regular tetrahedron, four identical sites at 0.109 nm from the centre (the body origin)."""


def _tip4p_ew() -> RigidTemplate:
    # TIP4P-Ew geometry: r(OH) = 0.09572 nm, HOH = 104.52°, M on the bisector at 0.0125 nm.
    r_oh, half = 0.09572, math.radians(104.52) / 2
    return RigidTemplate(
        "water_tip4p_ew",
        ((0.0, 0.0, 0.0),
         (r_oh * math.sin(half), 0.0, r_oh * math.cos(half)),
         (-r_oh * math.sin(half), 0.0, r_oh * math.cos(half)),
         (0.0, 0.0, 0.0125)),
        ("O", "H1", "H2", "M"),
    )


WATER_TIP4P_EW = _tip4p_ew()
"""TIP4P-Ew water, oxygen at the body origin, molecule in the xz plane, bisector along +z."""


@dataclass(frozen=True)
class PeriodicBox:
    """Orthorhombic periodic box with edges (nm), each > 0; positions live on the torus."""

    edges: tuple[float, float, float]

    def __post_init__(self) -> None:
        edges = tuple(self.edges)
        if len(edges) != 3 or not all(isinstance(e, (int, float)) and not isinstance(e, bool)
                                      for e in edges):
            raise ValueError(f"box: {self.edges!r} is not allowed; need three edge lengths (nm)")
        for axis, edge in zip("xyz", edges, strict=True):
            if not math.isfinite(edge) or edge <= 0:
                raise ValueError(
                    f"box: edge {axis} = {edge!r} is not allowed; every edge must be a finite "
                    "length > 0 nm"
                )

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.edges, dtype=like.dtype, device=like.device)

    def wrap(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions (..., 3) nm into [0, L) per axis."""
        return torch.remainder(positions, self.tensor(positions))

    def to_angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Torus angles 2π r / L in [0, 2π), (..., 3)."""
        return torch.remainder(2.0 * math.pi * positions / self.tensor(positions), 2.0 * math.pi)

    def from_angles(self, angles: torch.Tensor) -> torch.Tensor:
        return angles * self.tensor(angles) / (2.0 * math.pi)


@LAYOUTS.register("rigid_bodies")
@dataclass(frozen=True)
class RigidLayout(Layout):
    """What a rigid-body flow acts on: N bodies, an optional periodic box, pinned parts.

    Flow coordinates, flattened per sample: [positions (N, 3) nm, if ``box``] then
    [quaternions (N, 4)]. ``pinned_positions``: bodies whose position is gauge-fixed (constant
    in the data, e.g. molecule 0 at the origin); ``pinned_orientations``: bodies whose
    orientation is fixed. The flow never moves a pinned coordinate and its log-det has no term
    for it, so it counts no phantom directions. A body in both sets is never moved at all.
    Layout kind ``rigid_bodies`` (:mod:`boltzgen.layouts`); not Euclidean.
    """

    kind: ClassVar[str] = "rigid_bodies"
    euclidean: ClassVar[bool] = False
    n_bodies: int
    box: PeriodicBox | None = None
    pinned_positions: tuple[int, ...] = ()
    pinned_orientations: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.n_bodies, bool) or not isinstance(self.n_bodies, int) or \
                self.n_bodies < 1:
            raise ValueError(f"n_bodies: {self.n_bodies!r} is not allowed; need an int >= 1")
        for name in ("pinned_positions", "pinned_orientations"):
            for i in getattr(self, name):
                if not isinstance(i, int) or not 0 <= i < self.n_bodies:
                    raise ValueError(f"{name}: {i!r} is not a body index in 0..{self.n_bodies - 1}")
        if self.pinned_positions and self.box is None:
            raise ValueError("pinned_positions: given, but the layout has no positions (box None)")

    @property
    def has_positions(self) -> bool:
        return self.box is not None

    @property
    def dim(self) -> int:
        return self.n_bodies * (7 if self.has_positions else 4)

    @property
    def description(self) -> str:
        return "rigid bodies (torus × S³)" if self.has_positions else "rigid bodies (S³)"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RigidLayout:
        box = data.get("box")
        return cls(int(data["n_bodies"]), None if box is None else PeriodicBox(tuple(box["edges"])),
                   tuple(data.get("pinned_positions", ())),
                   tuple(data.get("pinned_orientations", ())))

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Flat (..., dim) -> (positions (..., N, 3) or None, quaternions (..., N, 4))."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: shape {tuple(x.shape)} is not allowed; need (..., {self.dim})")
        n = self.n_bodies
        if not self.has_positions:
            return None, x.reshape(*x.shape[:-1], n, 4)
        return (x[..., : 3 * n].reshape(*x.shape[:-1], n, 3),
                x[..., 3 * n :].reshape(*x.shape[:-1], n, 4))

    def join(self, positions: torch.Tensor | None, quaternions: torch.Tensor) -> torch.Tensor:
        flat_q = quaternions.reshape(*quaternions.shape[:-2], -1)
        if positions is None:
            return flat_q
        return torch.cat([positions.reshape(*positions.shape[:-2], -1), flat_q], dim=-1)

    def mobile_mask(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        """Bool (N,) True for bodies whose ``kind`` ("positions"/"orientations") may move."""
        pinned = self.pinned_positions if kind == "positions" else self.pinned_orientations
        mask = torch.ones(self.n_bodies, dtype=torch.bool, device=like.device)
        if pinned:
            mask[list(pinned)] = False
        return mask
