"""Stereochemistry of peptide frames, vectorised over batches in numpy (no OpenMM, no torch),
for the builder's checks and for flows that count and drop D or cis samples.

Positions are (F, n, 3) arrays in any one length unit (nm in this project); signs and angles do
not depend on it. A frame with a non-finite coordinate is never L and never trans.
"""

from __future__ import annotations

import numpy as np

TRANS_MIN_ABS_OMEGA_DEG = 150.0
"""|ω| above which a peptide bond counts as trans, degrees: a strict test for built and
minimised structures (a minimum sits within a few degrees of 180°), which fails a cis bond
(ω ≈ 0°) and a twisted, non-planar amide alike. Thermal frames come closer: in 50 ps of
Langevin MD (ACE-ALA-NME in amber99sbildn-obc at 300 K, ALA-TYR in amber14-obc1 at 310 K) ω
deviated from 180° by about 10° RMS and 0.2-0.6 % of trans frames had |ω| < 150°. To count
cis samples rather than distorted ones, pass a looser threshold, e.g. 90° (halfway between
cis and trans)."""


def _frames(xyz: np.ndarray) -> np.ndarray:
    out = np.asarray(xyz, dtype=np.float64)
    if out.ndim != 3 or out.shape[-1] != 3:
        raise ValueError(f"xyz: shape {out.shape} is not allowed; need (frames, atoms, 3)")
    return out


def _quadruples(name: str, quads: object, n_atoms: int) -> np.ndarray:
    out = np.asarray(quads, dtype=np.int64).reshape(-1, 4)
    if out.size and (out.min() < 0 or out.max() >= n_atoms):
        raise ValueError(f"{name}: {out.tolist()} is not allowed; need atom indices in "
                         f"[0, {n_atoms})")
    return out


def signed_volumes(xyz: np.ndarray, chiral_centers: object) -> np.ndarray:
    """(F, k) signed volumes (N − CA) · ((C − CA) × (CB − CA)) of k centres (CA, N, C, CB).

    Positive for an L amino acid (checked on the L-alanine of openmmtools' alanine dipeptide;
    its mirror image x -> −x is negative), in length³ of ``xyz``.
    """
    frames = _frames(xyz)
    centers = _quadruples("chiral_centers", chiral_centers, frames.shape[1])
    ca, n, c, cb = (frames[:, centers[:, k]] for k in range(4))
    return np.einsum("fki,fki->fk", n - ca, np.cross(c - ca, cb - ca))


def is_l_amino_acid(xyz: np.ndarray, chiral_centers: object) -> np.ndarray:
    """(F,) bool: every centre (CA, N, C, CB) of the frame is L (positive signed volume).

    True for every frame when there is no centre (glycine only).
    """
    return np.all(signed_volumes(xyz, chiral_centers) > 0.0, axis=1)


def dihedrals_deg(xyz: np.ndarray, quadruples: object) -> np.ndarray:
    """(F, k) dihedral angles of atom quadruples (i, j, k, l) in degrees, in (−180, 180]
    (IUPAC sign, the same as mdtraj's compute_dihedrals)."""
    frames = _frames(xyz)
    quads = _quadruples("quadruples", quadruples, frames.shape[1])
    p0, p1, p2, p3 = (frames[:, quads[:, k]] for k in range(4))
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = np.cross(b0, b1), np.cross(b1, b2)
    y = np.linalg.norm(b1, axis=-1) * np.einsum("fki,fki->fk", b0, n2)
    x = np.einsum("fki,fki->fk", n1, n2)
    return np.degrees(np.arctan2(y, x))


def peptide_bonds_trans(xyz: np.ndarray, omega_atoms: object,
                        min_abs_omega_deg: float = TRANS_MIN_ABS_OMEGA_DEG) -> np.ndarray:
    """(F,) bool: every peptide bond's ω (CA, C, N, CA quadruples) has
    |ω| > ``min_abs_omega_deg`` (degrees; see :data:`TRANS_MIN_ABS_OMEGA_DEG`)."""
    return np.all(np.abs(dihedrals_deg(xyz, omega_atoms)) > min_abs_omega_deg, axis=1)


def rotated_about_axis(points: np.ndarray, origin: np.ndarray, axis: np.ndarray,
                       angle_rad: float) -> np.ndarray:
    """``points`` (k, 3) turned by ``angle_rad`` (radians) about the line through ``origin``
    along ``axis``, right-handed (Rodrigues). Turning the first atom of a dihedral (i, j, k, l)
    about the axis j -> k by +θ changes the dihedral by −θ."""
    unit_axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    shifted = np.asarray(points, dtype=np.float64) - origin
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    turned = (shifted * cos + np.cross(unit_axis, shifted) * sin
              + np.outer(shifted @ unit_axis, unit_axis) * (1.0 - cos))
    return turned + origin
