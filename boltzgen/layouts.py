"""Layouts: the geometry of a system's flow coordinates, as a flow needs to know it.

A system declares its layout (:meth:`boltzgen.systems.base.System.layout`); a flow declares
the layout kinds it accepts (``Flow.accepts``) and is built for a layout
(:func:`boltzgen.flows.build_flow`). Every layout is a frozen dataclass with a registered
``kind``, the number ``dim`` of flow coordinates (a sample is a flat vector of ``dim`` numbers)
and a plain-data form for checkpoints (:meth:`Layout.to_dict`, :func:`layout_from_dict`).

Kinds (registry :data:`LAYOUTS`):

- ``vector``: R^dim with the Lebesgue measure, nothing more known (:class:`VectorLayout`).
- ``particles``: n particles in d spatial dimensions (:class:`ParticleLayout`). Without the
  centre of mass removed the coordinates are the Cartesian x[i, a] flattened as x[d i + a]
  (dim n d). With it removed (``com_free``) they are the coefficients z[k, a] of x in the
  orthonormal Helmert basis h_1 .. h_{n-1} of the zero-sum subspace of R^n (per spatial axis),

      x[i, a] = Σ_k H[k, i] z[k, a],   z[k, a] = Σ_i H[k, i] x[i, a],
      h_k = (1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))   (k leading ones),

  flattened as z[d k + a] (dim (n - 1) d); z -> x is an isometry onto {x : Σ_i x_i = 0}, so the
  Lebesgue measure of R^{(n-1)d} is that subspace's own measure.
- ``rigid_bodies``: N rigid bodies, positions on a periodic box (torus) and unit quaternions
  on S³ (:class:`boltzgen.rigid.bodies.RigidLayout`; not Euclidean).
- ``molecule``: n atoms in 3-D Cartesian coordinates (nm), x[3 i + a], with the topology where
  known (elements, bonds, atom names, residues) (:class:`MoleculeLayout`; peptides). The
  ``internal_coordinates`` flow builds its Z-matrix from the bonds
  (:mod:`boltzgen.internal_coordinates`).
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch

from boltzgen._checks import check_int
from boltzgen.registry import Registry

__all__ = ["LAYOUTS", "Layout", "MoleculeLayout", "ParticleLayout", "VectorLayout", "as_layout",
           "helmert_basis", "layout_from_dict"]


class Layout:
    """Base of the layouts (frozen dataclasses). Subclasses set ``kind`` (registry name) and
    ``euclidean`` (True when the flow coordinates are R^dim with the Lebesgue measure) and
    define ``dim`` and ``description`` (a phrase for messages: "a vector in R^2")."""

    kind: ClassVar[str]
    euclidean: ClassVar[bool] = True

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def description(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, bool, None, tuples, dicts): ``{"kind": ..., field: ...}``,
        loadable by ``torch.load(weights_only=True)``; :func:`layout_from_dict` inverts it."""
        return {"kind": self.kind, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        """The layout of :meth:`to_dict`'s output (the ``kind`` key is ignored here)."""
        return cls(**{k: v for k, v in data.items() if k != "kind"})


LAYOUTS: Registry[Layout] = Registry("layout")


def layout_from_dict(data: dict[str, Any]) -> Layout:
    """The layout saved by :meth:`Layout.to_dict` (ValueError naming ``layout.kind``)."""
    if not isinstance(data, dict):
        raise TypeError(f"layout: expected a mapping with a 'kind' key, got {type(data)}")
    return LAYOUTS.get(data.get("kind"), "layout.kind").from_dict(data)


@LAYOUTS.register("vector")
@dataclasses.dataclass(frozen=True)
class VectorLayout(Layout):
    """``size`` coordinates in R^size. A system that knows its slow variables (the
    coordinates of its metastable states) puts them first and says how many in ``slow_dim``
    (the coarse-grained model, :mod:`boltzgen.flows.coarse_grained`, needs it); None: not
    known."""

    kind: ClassVar[str] = "vector"
    size: int
    slow_dim: int | None = None

    def __post_init__(self) -> None:
        check_int("dim", self.size, minimum=1)
        if self.slow_dim is not None:
            check_int("slow_dim", self.slow_dim, minimum=1)

    @property
    def dim(self) -> int:
        return self.size

    @property
    def description(self) -> str:
        plural = "" if self.slow_dim == 1 else "s"
        slow = ("" if self.slow_dim is None
                else f" ({self.slow_dim} slow variable{plural} first)")
        return f"a vector in R^{self.size}{slow}"


@lru_cache(maxsize=32)
def _helmert(n: int) -> np.ndarray:
    # Cached as numpy, read-only: a cached torch tensor made first inside a torch.func
    # transform (vmap, grad) would stay tied to it and break every later call.
    basis = np.zeros((n - 1, n))
    for k in range(1, n):
        basis[k - 1, :k] = 1.0
        basis[k - 1, k] = -float(k)
        basis[k - 1] /= math.sqrt(k * (k + 1))
    basis.setflags(write=False)
    return basis


def helmert_basis(n: int) -> np.ndarray:
    """Orthonormal basis of the zero-sum subspace of R^n, shape (n - 1, n), float64.

    Row k - 1 is h_k = (1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1)) with k leading ones
    (the sub-diagonal rows of the Helmert matrix); every row is orthogonal to (1, ..., 1).
    """
    return _helmert(check_int("n", n, minimum=2)).copy()


@LAYOUTS.register("particles")
@dataclasses.dataclass(frozen=True)
class ParticleLayout(Layout):
    """``n_particles`` point particles in ``spatial_dim`` dimensions; with ``com_free`` the
    centre of mass is removed and the coordinates are Helmert coefficients (module docstring)."""

    kind: ClassVar[str] = "particles"
    n_particles: int
    spatial_dim: int
    com_free: bool = False

    def __post_init__(self) -> None:
        check_int("n_particles", self.n_particles, minimum=2 if self.com_free else 1)
        check_int("spatial_dim", self.spatial_dim, minimum=1)
        if not isinstance(self.com_free, bool):
            raise ValueError(f"com_free: {self.com_free!r} is not allowed; true or false")

    @property
    def dim(self) -> int:
        return (self.n_particles - int(self.com_free)) * self.spatial_dim

    @property
    def description(self) -> str:
        removed = ", centre of mass removed" if self.com_free else ""
        return f"{self.n_particles} particles in {self.spatial_dim}-D{removed}"

    def _basis(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(_helmert(self.n_particles), dtype=like.dtype, device=like.device)

    def to_cartesian(self, z: torch.Tensor) -> torch.Tensor:
        """Flow coordinates (..., dim) -> Cartesian positions (..., n_particles, spatial_dim)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"z: shape {tuple(z.shape)} is not allowed; need (..., {self.dim})")
        if not self.com_free:
            return z.reshape(*z.shape[:-1], self.n_particles, self.spatial_dim)
        zr = z.reshape(*z.shape[:-1], self.n_particles - 1, self.spatial_dim)
        return torch.einsum("ki,...kd->...id", self._basis(z), zr)

    def from_cartesian(self, x: torch.Tensor) -> torch.Tensor:
        """Cartesian (..., n_particles, spatial_dim) -> flow coordinates (..., dim); with
        ``com_free`` the centre of mass is projected out."""
        shape = (self.n_particles, self.spatial_dim)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor of shape (..., {shape[0]}, {shape[1]}), "
                            f"got {type(x)}")
        if x.ndim < 2 or tuple(x.shape[-2:]) != shape:
            raise ValueError(f"x: shape {tuple(x.shape)} is not allowed; need (..., {shape[0]}, "
                             f"{shape[1]})")
        if self.com_free:
            x = torch.einsum("ki,...id->...kd", self._basis(x), x)
        return x.reshape(*x.shape[:-2], self.dim)


@LAYOUTS.register("molecule")
@dataclasses.dataclass(frozen=True)
class MoleculeLayout(Layout):
    """``n_atoms`` atoms, Cartesian coordinates (nm) flattened x[3 i + a]; optional topology:
    ``elements`` (one symbol per atom), ``bonds`` (pairs of atom indices), ``atom_names``
    (per atom, the force field's names: "CA", "HB1"), ``residue_indices`` (per atom, 0-based)
    and ``residue_names`` (per residue: "ACE", "ALA"), for flows that condition on them;
    ``slow_torsions``: the dihedrals (a, b, c, d) of the molecule's slow variables (a peptide's
    backbone φ and ψ), whose rotations about the bonds b–c the coarse-grained model
    (:mod:`boltzgen.flows.coarse_grained`) models as its slow space."""

    kind: ClassVar[str] = "molecule"
    n_atoms: int
    elements: tuple[str, ...] = ()
    bonds: tuple[tuple[int, int], ...] = ()
    atom_names: tuple[str, ...] = ()
    residue_indices: tuple[int, ...] = ()
    residue_names: tuple[str, ...] = ()
    slow_torsions: tuple[tuple[int, int, int, int], ...] = ()

    def __post_init__(self) -> None:
        check_int("n_atoms", self.n_atoms, minimum=1)
        for torsion in self.slow_torsions:
            if (len(torsion) != 4 or len(set(torsion)) != 4 or not all(
                    isinstance(i, int) and 0 <= i < self.n_atoms for i in torsion)):
                raise ValueError(f"slow_torsions: {torsion!r} is not allowed; need four distinct "
                                 f"atom indices in 0..{self.n_atoms - 1}")
        if self.elements and (len(self.elements) != self.n_atoms or not all(
                isinstance(e, str) and e for e in self.elements)):
            raise ValueError(f"elements: {self.elements!r} is not allowed; need one element "
                             f"symbol per atom ({self.n_atoms})")
        for bond in self.bonds:
            if (len(bond) != 2 or bond[0] == bond[1] or not all(
                    isinstance(i, int) and 0 <= i < self.n_atoms for i in bond)):
                raise ValueError(f"bonds: {bond!r} is not allowed; need two distinct atom "
                                 f"indices in 0..{self.n_atoms - 1}")
        for name, values in (("atom_names", self.atom_names),
                             ("residue_indices", self.residue_indices)):
            if values and len(values) != self.n_atoms:
                raise ValueError(f"{name}: {len(values)} entries are not allowed; need one per "
                                 f"atom ({self.n_atoms})")
        if self.residue_indices and (min(self.residue_indices) < 0 or max(
                self.residue_indices) >= len(self.residue_names)):
            raise ValueError(f"residue_indices: {self.residue_indices!r} is not allowed; need "
                             f"indices into residue_names ({len(self.residue_names)} residues)")

    @property
    def dim(self) -> int:
        return 3 * self.n_atoms

    @property
    def description(self) -> str:
        return f"a molecule of {self.n_atoms} atoms in Cartesian coordinates"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoleculeLayout:
        return cls(int(data["n_atoms"]), tuple(data.get("elements", ())),
                   tuple(tuple(b) for b in data.get("bonds", ())),
                   tuple(data.get("atom_names", ())), tuple(data.get("residue_indices", ())),
                   tuple(data.get("residue_names", ())),
                   tuple(tuple(t) for t in data.get("slow_torsions", ())))


def as_layout(layout: Layout | int) -> Layout:
    """``layout`` itself, or a :class:`VectorLayout` for an int (a dimension)."""
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, int) and not isinstance(layout, bool):
        return VectorLayout(layout)
    raise TypeError(f"layout: expected a Layout or a dimension (int), got {type(layout)}")


# RigidLayout (boltzgen.rigid.bodies) is a Layout and registers itself as "rigid_bodies" when
# its module is imported; import it here so that LAYOUTS is complete whatever is imported first.
import boltzgen.rigid.bodies  # noqa: E402, F401
