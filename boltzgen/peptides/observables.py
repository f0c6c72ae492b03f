"""Peptide observables: backbone dihedrals, the φ metastable states and their free energy.

Angles are in radians in (−π, π], positions in nm, free energies in kT (dimensionless).

Dihedral of four points x0, x1, x2, x3 (IUPAC sign, as mdtraj): with b1 = x1 − x0,
b2 = x2 − x1, b3 = x3 − x2, n1 = b1 × b2 and n2 = b2 × b3,
θ = atan2(|b2| b1 · n2, n1 · n2). φ is the dihedral C(i−1) N CA C, ψ the dihedral N CA C N(i+1).

Metastable states on φ (as for alanine dipeptide in the transferable Boltzmann generators
work): state 0 is φ ≤ 0 (C7eq, C5, αR), state 1 is φ > 0 (C7ax, αL); φ = 0 exactly has
probability zero. Their free-energy difference, in kT:
ΔF_φ = F(φ > 0) − F(φ ≤ 0) = −ln(P(φ > 0) / P(φ ≤ 0)),
from the fraction of MD frames (:func:`md_state_free_energy`) or from importance weights of
independent flow samples, ΔF_φ = −ln(Σ_{φ>0} w / Σ_{φ≤0} w) (:func:`weighted_state_free_energy`).
A state that is never visited gives ΔF_φ = ±inf and an error of NaN: never a finite number the
data cannot support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from boltzgen._checks import check_int

MIN_BLOCKS = 10
"""Fewer moving blocks than this in a run: the block bootstrap's error is NaN (too few
independent stretches to say how far the run's state fraction may be off)."""


@dataclass(frozen=True)
class StateFreeEnergy:
    """ΔF_φ = F(φ > 0) − F(φ ≤ 0) (kT) of one data set and how it was estimated.

    ``delta_f_kt``: the estimate (±inf when one state has no weight, NaN when neither has);
    ``error_kt``: its bootstrap standard error (NaN when it cannot be estimated: a state never
    visited, or fewer than :data:`MIN_BLOCKS` blocks; inf when a bootstrap replica loses a
    state); ``statistical_inefficiency``: g of the state indicator in frames (1 for independent
    samples, NaN for a series that stays in one state); ``block_length``: frames per bootstrap
    block (1 for independent samples, 0 when no bootstrap was run); ``n_frames``: frames or
    samples, including samples of weight zero; ``n_transitions``: changes of state between
    consecutive frames (None for independent samples, where it means nothing);
    ``p_positive``: the (weighted) fraction in state 1, P(φ > 0); ``effective_samples``: N / g
    for a time series, Kish's (Σ w)² / Σ w² for weighted samples.
    """

    delta_f_kt: float
    error_kt: float
    statistical_inefficiency: float
    block_length: int
    n_frames: int
    n_transitions: int | None
    p_positive: float
    effective_samples: float


def dihedrals(xyz: np.ndarray, atoms: Any) -> np.ndarray:
    """Dihedral angles (rad, (−π, π]) of atom quartets ``atoms`` ((4,) or (m, 4) indices) in
    every frame of ``xyz`` (F, n, 3) nm: (F,) for one quartet, (F, m) for m of them."""
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"xyz: shape {xyz.shape} is not allowed; need (frames, atoms, 3) nm")
    quartets = np.asarray(atoms, dtype=np.int64)
    if quartets.shape[-1:] != (4,) or quartets.ndim > 2:
        raise ValueError(f"atoms: shape {quartets.shape} is not allowed; need (4,) or (m, 4) "
                         "atom indices")
    if quartets.size and (quartets.min() < 0 or quartets.max() >= xyz.shape[1]):
        raise ValueError(f"atoms: {quartets.tolist()} is not allowed; indices must lie in "
                         f"[0, {xyz.shape[1]})")
    x = xyz[:, quartets]  # (F, [m,] 4, 3)
    b1, b2, b3 = x[..., 1, :] - x[..., 0, :], x[..., 2, :] - x[..., 1, :], \
        x[..., 3, :] - x[..., 2, :]
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    y = np.linalg.norm(b2, axis=-1) * np.einsum("...k,...k->...", b1, n2)
    theta = np.arctan2(y, np.einsum("...k,...k->...", n1, n2))
    return np.where(theta <= -np.pi, np.pi, theta)  # atan2(−0, −1) = −π belongs to +π


def backbone_dihedrals(xyz: np.ndarray, phi_atoms: Any, psi_atoms: Any
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(φ, ψ) in rad, (−π, π], of each frame of ``xyz`` (F, n, 3) nm, from the atom indices
    of φ (C(i−1), N, CA, C) and ψ (N, CA, C, N(i+1)): (F,) each for one quartet each."""
    return dihedrals(xyz, phi_atoms), dihedrals(xyz, psi_atoms)


def mdtraj_backbone_dihedrals(xyz: np.ndarray, topology: Any) -> tuple[np.ndarray, np.ndarray]:
    """(φ, ψ) in rad (F,) each by mdtraj.compute_phi / compute_psi for a peptide ``topology``
    (an ``mdtraj.Topology``) with exactly one φ and one ψ (a capped single residue, such as
    alanine dipeptide); mdtraj computes in float32."""
    import mdtraj

    trajectory = mdtraj.Trajectory(np.asarray(xyz, dtype=np.float32), topology)
    (phi_atoms, phi), (psi_atoms, psi) = (mdtraj.compute_phi(trajectory),
                                          mdtraj.compute_psi(trajectory))
    if len(phi_atoms) != 1 or len(psi_atoms) != 1:
        raise ValueError(f"topology: {len(phi_atoms)} φ and {len(psi_atoms)} ψ dihedrals is not "
                         "allowed; need exactly one of each (a capped single residue)")
    return phi[:, 0].astype(np.float64), psi[:, 0].astype(np.float64)


def delta_f_phi(phi: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ΔF_φ = −ln(Σ_{φ>0} w / Σ_{φ≤0} w) (kT), w = 1 unless ``weights`` (non-negative) are
    given; +inf when φ > 0 has no weight, −inf when φ ≤ 0 has none, NaN when neither has."""
    phi = _series("phi", phi)
    w = np.ones(len(phi)) if weights is None else np.asarray(weights, dtype=np.float64)
    positive = phi > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.log(w[~positive].sum()) - np.log(w[positive].sum()))


def md_state_free_energy(phi: np.ndarray, n_bootstrap: int = 200, seed: int = 0
                         ) -> StateFreeEnergy:
    """ΔF_φ (kT) from a time series of φ (rad, (F,), MD frames in time order) with a moving
    block bootstrap error.

    ΔF_φ = −ln(p / (1 − p)), p the fraction of frames with φ > 0. Error: g is pymbar's
    statistical inefficiency of the state indicator s_t = [φ_t > 0]; blocks are
    b = 3 ⌈g⌉ consecutive frames (as :class:`boltzgen.pipeline.reference.HeldOutFrames`): a
    block keeps only the correlations within it, and for an AR(1)-like indicator with
    correlation λ^t blocks of b frames keep 1 − 2λ(1 − λ^b) / (b (1 − λ²)) of the variance of
    the mean, 57 % for b = g and 84 % for b = 3g (large g). Each of ``n_bootstrap`` replicas
    joins round(F / b) blocks drawn uniformly from the F − b + 1 moving blocks; the error is
    the standard deviation of −ln(p* / (1 − p*)) over the replicas (for reference, the delta
    method gives sqrt(g / (F p (1 − p)))). NaN with fewer than :data:`MIN_BLOCKS` blocks in the
    run, inf when a replica visits one state only.
    """
    phi = _series("phi", phi)
    n_bootstrap = check_int("n_bootstrap", n_bootstrap, minimum=2)
    state = phi > 0
    frames = len(state)
    p = float(state.mean())
    transitions = int(np.count_nonzero(state[1:] != state[:-1]))
    delta_f = _log_odds(p)
    if not 0.0 < p < 1.0:
        return StateFreeEnergy(delta_f, math.nan, math.nan, 0, frames, transitions, p,
                               math.nan)
    from boltzgen._pymbar import pymbar

    g = float(pymbar().timeseries.statistical_inefficiency(state.astype(np.float64)))
    block = 3 * math.ceil(g)
    error = math.nan
    if frames // block >= MIN_BLOCKS:
        cumulative = np.concatenate([[0], np.cumsum(state, dtype=np.int64)])
        block_counts = cumulative[block:] - cumulative[:-block]  # φ > 0 frames per block
        n_blocks = round(frames / block)
        rng = np.random.default_rng(seed)
        replicas = np.concatenate([
            block_counts[rng.integers(0, len(block_counts), (rows, n_blocks))].sum(axis=1)
            for rows in _chunks(n_bootstrap, n_blocks)]) / (n_blocks * block)
        error = _spread(_log_odds(replicas))
    return StateFreeEnergy(delta_f, error, g, block, frames, transitions, p, frames / g)


def weighted_state_free_energy(phi: np.ndarray, log_weights: np.ndarray, n_bootstrap: int = 200,
                               seed: int = 0) -> StateFreeEnergy:
    """ΔF_φ = −ln(Σ_{φ>0} w / Σ_{φ≤0} w) (kT) of independent importance-weighted samples
    (flow samples reweighted to the target), with a bootstrap error over samples.

    ``log_weights`` (N,): log w up to a constant; −inf (or NaN: a sample whose energy was not
    finite) is a weight of zero, the sample still counted in N and resampled; its φ may be
    NaN. Error: the
    standard deviation of ΔF_φ over ``n_bootstrap`` resamples of the N (φ, log w) pairs with
    replacement (inf when a resample leaves one state without weight). ``n_transitions`` is
    None (samples, not a time series), ``statistical_inefficiency`` 1 and ``block_length`` 1.
    """
    from scipy.special import logsumexp

    phi = _series("phi", phi, finite=False)
    log_w = np.asarray(log_weights, dtype=np.float64)
    if log_w.shape != phi.shape:
        raise ValueError(f"log_weights: shape {log_w.shape} is not allowed; need {phi.shape}, "
                         "one per φ")
    if np.any(log_w == np.inf):
        raise ValueError("log_weights: +inf is not allowed; need log weights < +inf (−inf or "
                         "NaN for weight zero)")
    n_bootstrap = check_int("n_bootstrap", n_bootstrap, minimum=2)
    log_w = np.where(np.isnan(log_w), -np.inf, log_w)
    bad = np.count_nonzero(np.isfinite(log_w) & ~np.isfinite(phi))
    if bad:
        raise ValueError(f"phi: {bad} non-finite angles of samples with weight is not allowed; "
                         "need a finite φ wherever the log weight is finite")
    positive = phi > 0

    def estimate(lw: np.ndarray, pos: np.ndarray) -> np.ndarray:  # rows of (lw, pos) -> (R,)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (logsumexp(np.where(pos, -np.inf, lw), axis=-1)
                    - logsumexp(np.where(pos, lw, -np.inf), axis=-1))

    delta_f = float(estimate(log_w, positive))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = float(np.exp(logsumexp(np.where(positive, log_w, -np.inf)) - logsumexp(log_w)))
        ess = float(np.exp(2.0 * logsumexp(log_w) - logsumexp(2.0 * log_w)))
    error = math.nan
    if math.isfinite(delta_f):
        rng = np.random.default_rng(seed)
        draws = [rng.integers(0, len(phi), (rows, len(phi)))
                 for rows in _chunks(n_bootstrap, len(phi))]
        error = _spread(np.concatenate([estimate(log_w[d], positive[d]) for d in draws]))
    return StateFreeEnergy(delta_f, error, 1.0, 1, len(phi), None, p,
                           ess if math.isfinite(ess) else 0.0)


def ramachandran_free_energy(phi: np.ndarray, psi: np.ndarray, weights: np.ndarray | None = None,
                             bins: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Free-energy surface on (φ, ψ) in kT: F_ij = −ln(P_ij / max P), P_ij the (weighted)
    fraction of samples in bin (φ_i, ψ_j) of a ``bins`` × ``bins`` grid on [−π, π]²; 0 at the
    most populated bin, +inf where no weight falls. Returns F (bins, bins), indexed [φ, ψ], and
    the bin edges (bins + 1,) rad, the same on both axes. ``weights``: non-negative, finite,
    one per sample (importance weights; see :func:`boltzgen.estimators.normalized_weights`)."""
    phi, psi = _series("phi", phi), _series("psi", psi)
    bins = check_int("bins", bins, minimum=1)
    if psi.shape != phi.shape:
        raise ValueError(f"psi: shape {psi.shape} is not allowed; need {phi.shape}, like phi")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and w.shape != phi.shape:
        raise ValueError(f"weights: shape {w.shape} is not allowed; need {phi.shape}, like phi")
    if w is not None and not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise ValueError(f"weights: values in [{w.min()}, {w.max()}] are not allowed; need "
                         "finite non-negative weights with a positive sum")
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    counts, _, _ = np.histogram2d(phi, psi, bins=(edges, edges), weights=w)
    with np.errstate(divide="ignore"):
        return np.log(counts.max()) - np.log(counts), edges


def _series(name: str, values: np.ndarray, finite: bool = True) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) < 2:
        raise ValueError(f"{name}: shape {arr.shape} is not allowed; need a 1-D array of at "
                         "least 2 angles (rad)")
    if finite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: {np.count_nonzero(~np.isfinite(arr))} non-finite values is "
                         "not allowed; need finite angles (rad)")
    return arr


def _log_odds(p: float | np.ndarray) -> Any:
    """−ln(p / (1 − p)): +inf at p = 0, −inf at p = 1."""
    with np.errstate(divide="ignore"):
        return np.log1p(-p) - np.log(p) if isinstance(p, np.ndarray) else \
            float(np.log1p(-p) - np.log(p))


def _chunks(replicas: int, width: int) -> list[int]:
    """Bootstrap replicas per chunk, so that a chunk draws at most ~2 million indices."""
    rows = max(1, 2_000_000 // max(1, width))
    return [min(rows, replicas - first) for first in range(0, replicas, rows)]


def _spread(values: np.ndarray) -> float:
    """Standard deviation of bootstrap replicas; inf when a replica is not finite."""
    return float(np.std(values, ddof=1)) if np.all(np.isfinite(values)) else math.inf
