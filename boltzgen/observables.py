"""Structural observables of molecular samples: weighted radial distribution functions.

g_ab(r) from minimum-image distances (mdtraj, periodic) between the atom pairs (a, b) of
different molecules, normalized as mdtraj's ``compute_rdf``:

    g(r) = Σ_frames w_f · n_f(r) / (n_pairs · 4/3 π (r_out³ − r_in³) / V),   Σ_f w_f = 1,

with n_f(r) the number of pair distances of frame f in the shell [r_in, r_out) and V the box
volume. Equal weights give mdtraj's ``compute_rdf`` exactly; importance weights (reweighted flow
samples) give the target ensemble's g(r) (Chandler, *Introduction to Modern Statistical
Mechanics*, §7.2).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def pairs_between_molecules(topology: Any, first: str, second: str) -> np.ndarray:
    """(P, 2) atom index pairs (first, second) by atom name, the two atoms in different residues;
    each unordered pair once when ``first == second``."""
    a = [atom for atom in topology.atoms if atom.name == first]
    b = [atom for atom in topology.atoms if atom.name.rstrip("0123456789") == second]
    pairs = [(i.index, j.index) for i in a for j in b
             if i.residue.index != j.residue.index and (first != second or i.index < j.index)]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def radial_distribution(xyz: np.ndarray, topology: Any, box_edges_nm: tuple[float, ...],
                        pairs: np.ndarray, r_max_nm: float, n_bins: int = 60,
                        weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres (n_bins,) nm, g(r) (n_bins,)) of ``xyz`` (F, atoms, 3) nm in an orthorhombic
    box, frames weighted by ``weights`` (F,) (non-negative, any scale; default equal)."""
    import mdtraj

    xyz = np.asarray(xyz, dtype=np.float64)
    frames = len(xyz)
    lengths = np.tile(np.asarray(box_edges_nm, dtype=np.float64), (frames, 1))
    trajectory = mdtraj.Trajectory(xyz, topology, unitcell_lengths=lengths,
                                   unitcell_angles=np.full((frames, 3), 90.0))
    distances = mdtraj.compute_distances(trajectory, pairs, periodic=True)  # (F, P)
    w = np.ones(frames) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (frames,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights: need (frames,) finite non-negative values with a positive sum")
    edges = np.linspace(0.0, r_max_nm, n_bins + 1)
    counts, _ = np.histogram(distances.reshape(-1), bins=edges,
                             weights=np.repeat(w / w.sum(), distances.shape[1]))
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    volume = float(np.prod(box_edges_nm))
    return 0.5 * (edges[1:] + edges[:-1]), counts / (len(pairs) * shell / volume)
