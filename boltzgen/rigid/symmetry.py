"""Space-group operations of a molecular crystal in an orthorhombic periodic box, found from its
ideal structure, and their action on configurations (training-data augmentation).

An operation g = (R, t) moves every site x to R x + t (mod the box) and maps the ideal crystal
onto itself: molecule i lands on the lattice site of molecule π(i), with its equivalent sites
(water's two hydrogens) possibly exchanged. For a configuration X near the crystal, the image

    (g·X)_{π(i)} = R X_i + t  (sites reordered as the operation says)

has the same energy, U(g·X) = U(X), because the force field is invariant under rigid motions
and under exchanging identical particles, and the periodic box is invariant under R. The map is
volume-preserving in (oxygen position, orientation) coordinates, and it keeps every molecule
at its own lattice site. So if X is drawn from the Boltzmann distribution of the crystal, so is
g·X: the images of MD frames under the whole group are further (correlated) samples of the same
ensemble. A flow trained on them cannot fit features of the particular frames that the crystal's
symmetry does not have.

Only rotations that map an orthorhombic box onto itself are searched: R = diag(±1, ±1, ±1)
(for a box with equal edges, rotations permuting the axes would be missed). Improper R
(det R = −1) turn a molecule into its mirror image; they are kept only when the caller says
the molecules are planar (then the mirror image is a rigid motion of the molecule itself).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CrystalSymmetry", "apply_crystal_symmetry", "find_crystal_symmetries"]


@dataclass(frozen=True)
class CrystalSymmetry:
    """x -> R x + t; molecule i goes to lattice site ``permutation[i]`` with its sites taken in
    the order ``site_orders[i]`` (a row of the allowed site orders)."""

    rotation: np.ndarray  # (3, 3), diagonal ±1
    translation_nm: np.ndarray  # (3,)
    permutation: np.ndarray  # (N,) int
    site_orders: np.ndarray  # (N, S) int
    max_mismatch_nm: float  # largest site distance between the ideal crystal and its image


def _minimum_image(delta: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return delta - edges * np.round(delta / edges)


def find_crystal_symmetries(sites: np.ndarray, edges: Sequence[float],
                            site_orders: Sequence[Sequence[int]], tolerance_nm: float = 0.01,
                            allow_improper: bool = False) -> list[CrystalSymmetry]:
    """Every operation (R, t) with R = diag(±1, ±1, ±1) that maps the ideal crystal ``sites``
    (N, S, 3) nm onto itself within ``tolerance_nm`` per site, molecules staying whole.

    Site 0 of each molecule is its reference site (the oxygen); ``site_orders`` lists the
    orders in which a molecule's sites may be matched (for water (0, 1, 2) and (0, 2, 1): the
    hydrogens are identical). t is fixed by sending molecule 0's reference site onto each
    molecule's in turn, so at most 8 N candidates are tested. The identity comes first.
    """
    sites = np.asarray(sites, dtype=np.float64)
    edges_arr = np.asarray(edges, dtype=np.float64)
    orders = np.asarray(site_orders, dtype=np.int64)
    n = sites.shape[0]
    found: list[CrystalSymmetry] = []
    for signs in itertools.product((1.0, -1.0), repeat=3):
        if not allow_improper and np.prod(signs) < 0:
            continue
        rotation = np.diag(signs)
        moved = sites @ rotation.T
        for j in range(n):
            translation = sites[j, 0] - moved[0, 0]
            image = moved + translation
            # Molecule i's reference site must land on exactly one lattice site.
            gaps = np.linalg.norm(_minimum_image(sites[None, :, 0] - image[:, None, 0],
                                                 edges_arr), axis=-1)  # (i, k)
            target = gaps.argmin(axis=1)
            if len(set(target.tolist())) != n or gaps[np.arange(n), target].max() > tolerance_nm:
                continue
            # The other sites must match in one of the allowed orders.
            candidates = image[:, orders]  # (N, n_orders, S, 3)
            miss = np.linalg.norm(_minimum_image(sites[target][:, None] - candidates, edges_arr),
                                  axis=-1).max(axis=-1)  # (N, n_orders)
            best = miss.argmin(axis=1)
            mismatch = miss[np.arange(n), best]
            if mismatch.max() > tolerance_nm:
                continue
            found.append(CrystalSymmetry(rotation, translation, target, orders[best],
                                         float(mismatch.max())))
    found.sort(key=lambda op: not (np.array_equal(op.permutation, np.arange(n))
                                   and np.allclose(op.rotation, np.eye(3))))
    return found


def apply_crystal_symmetry(operation: CrystalSymmetry, sites: np.ndarray) -> np.ndarray:
    """Sites (B, N, S, 3) nm -> their image (B, N, S, 3) under ``operation``: new molecule
    π(i) holds R x_i + t with its sites reordered. Not wrapped into the box (callers wrap
    molecules whole, by their reference site)."""
    sites = np.asarray(sites, dtype=np.float64)
    moved = sites @ operation.rotation.T + operation.translation_nm
    image = np.empty_like(moved)
    n = sites.shape[1]
    reordered = moved[:, np.arange(n)[:, None], operation.site_orders]  # (B, N, S, 3)
    image[:, operation.permutation] = reordered
    return image
