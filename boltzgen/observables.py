"""Structural observables of molecular samples: weighted radial distribution functions.

g_ab(r) from minimum-image distances (mdtraj, periodic) between the atom pairs (a, b) of
different molecules, normalized as mdtraj's ``compute_rdf``:

    g(r) = Σ_frames w_f · n_f(r) / (n_pairs · 4/3 π (r_out³ − r_in³) / V),   Σ_f w_f = 1,

with n_f(r) the number of pair distances of frame f in the shell [r_in, r_out) and V the box
volume. Equal weights give mdtraj's ``compute_rdf`` exactly; importance weights (reweighted flow
samples) give the target ensemble's g(r) (Chandler, *Introduction to Modern Statistical
Mechanics*, §7.2).

Also the configurational temperature of samples of a potential
(:func:`configurational_temperature`), a check that samples are Boltzmann distributed at the
temperature they claim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from boltzgen._checks import check_float, check_int


def pairs_between_molecules(topology: Any, first: str, second: str) -> np.ndarray:
    """(P, 2) atom index pairs (first, second) by atom name, the two atoms in different residues;
    each unordered pair once when ``first == second``."""
    a = [atom for atom in topology.atoms if atom.name == first]
    b = [atom for atom in topology.atoms if atom.name.rstrip("0123456789") == second]
    pairs = [(i.index, j.index) for i in a for j in b
             if i.residue.index != j.residue.index and (first != second or i.index < j.index)]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class PairHistograms:
    """Per-frame counts of pair distances in radial shells, from which weighted g(r) and its
    bootstrap replicas follow without recomputing distances.

    ``counts[f, k]``: pair distances of frame f in shell k = [edges[k], edges[k+1]) nm;
    ``ideal[k]``: the count an ideal gas of the same density would put there,
    n_pairs · 4/3 π (r_out³ − r_in³) / V; so g_k = Σ_f w_f counts[f, k] / ideal[k], Σ_f w_f = 1.
    """

    r_nm: np.ndarray
    counts: np.ndarray
    ideal: np.ndarray

    def g(self, weights: np.ndarray | None = None) -> np.ndarray:
        """g(r) (n_bins,) with frames weighted by ``weights`` (F,) (non-negative, any scale;
        default equal)."""
        w = _checked_weights(weights, len(self.counts))
        return (w / w.sum()) @ self.counts / self.ideal

    def g_replicas(self, weights: np.ndarray | None = None, n_bootstraps: int = 2000,
                   seed: int = 0, segments: np.ndarray | None = None,
                   block_frames: int = 1) -> np.ndarray:
        """Bootstrap replicas (≤ n_bootstraps, n_bins) of :meth:`g`: frames drawn with
        replacement, each keeping its weight, and the self-normalised Σ w c / Σ w recomputed
        (a draw of only zero-weight frames is dropped). Drawn in chunks of at most ~16 MB.

        Frames correlated in time (every frame of an MD run) take the moving-block bootstrap
        (Künsch, Ann. Stat. 17, 1217 (1989)): ``segments`` (F,) labels the contiguous stretches
        of one trajectory (frames of a stretch consecutive and in time order), and a replica
        draws ceil(F / L) blocks of L = ``block_frames`` consecutive frames of one stretch,
        uniformly among all such blocks, with replacement (L is cut to the shortest stretch).
        L = 1 is the ordinary bootstrap of independent frames; L should span a few
        correlation times, since a block of L frames keeps only the correlations within it.

        2000 by default: with 200, whether ``overlay_statistics`` put max_z above its 95 %
        noise level changed with the seed for a 50 K ice job (4 of 8 seeds), with 2000 it did
        not (0 of 8). For heavy-tailed importance weights the bootstrap spread errs low (the
        same caveat as ``estimators.kish_ess_fraction_err``)."""
        frames = len(self.counts)
        w = _checked_weights(weights, frames)
        block_sums, block_weights, n_blocks = _blocks(w[:, None] * self.counts, w, segments,
                                                      block_frames)
        starts = len(block_weights)
        rng = np.random.default_rng(seed)
        rows = max(1, 2_000_000 // starts)
        replicas = []
        for first in range(0, n_bootstraps, rows):
            draws = rng.multinomial(n_blocks, np.full(starts, 1.0 / starts),
                                    size=min(rows, n_bootstraps - first))  # (R, starts)
            totals = draws @ block_weights
            valid = totals > 0
            replicas.append((draws[valid] @ block_sums) / totals[valid, None] / self.ideal)
        return np.concatenate(replicas)


def _blocks(weighted_counts: np.ndarray, w: np.ndarray, segments: np.ndarray | None,
            block_frames: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Sums over every block of L consecutive frames within one segment: of the weighted
    counts (starts, n_bins) and of the weights (starts,); and the number of blocks a replica
    draws, ceil(F / L). See :meth:`PairHistograms.g_replicas`."""
    frames = len(w)
    labels = np.zeros(frames, dtype=np.int64) if segments is None else np.asarray(segments)
    if labels.shape != (frames,):
        raise ValueError(f"segments: shape {labels.shape} is not allowed; need ({frames},)")
    if int(block_frames) < 1:
        raise ValueError(f"block_frames: {block_frames} is not allowed; need an integer >= 1")
    change = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    bounds = np.concatenate([[0], change, [frames]])
    if len(bounds) - 1 != len(np.unique(labels)):
        raise ValueError("segments: each label must cover one contiguous stretch of frames")
    length = min(int(block_frames), int(np.diff(bounds).min()))
    cum_counts = np.concatenate([np.zeros((1, weighted_counts.shape[1])),
                                 np.cumsum(weighted_counts, axis=0)])
    cum_w = np.concatenate([[0.0], np.cumsum(w)])
    starts = np.concatenate([np.arange(lo, hi - length + 1)
                             for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)])
    return (cum_counts[starts + length] - cum_counts[starts],
            cum_w[starts + length] - cum_w[starts], int(np.ceil(frames / length)))


def overlay_statistics(g1: np.ndarray, replicas1: np.ndarray, g2: np.ndarray,
                       replicas2: np.ndarray) -> dict[str, float]:
    """How far two independent estimates of g(r), ``g1`` and ``g2`` (n_bins,), lie apart in
    units of their noise, from their bootstrap replicas (:meth:`PairHistograms.g_replicas`,
    (B, n_bins) each).

    σ_k² = var*(g1_k) + var*(g2_k) over the shells k where σ_k > 0 (``shells``);
    ``max_z`` = max_k |g1_k − g2_k| / σ_k. Its null distribution for this very shell layout is
    that of max_k |(g1*_k − g1_k) − (g2*_k − g2_k)| / σ_k over pairs of replicas;
    ``max_z_noise95`` is its 95th percentile. ``max_z`` ≤ ``max_z_noise95``: the two curves
    overlay within sampling noise (at 5 % false alarm, for honest σ). Empty when either set
    has fewer than 2 replicas or no shell has noise."""
    if len(replicas1) < 2 or len(replicas2) < 2:
        return {}
    sigma = np.sqrt(replicas1.var(axis=0, ddof=1) + replicas2.var(axis=0, ddof=1))
    occupied = sigma > 0
    if not occupied.any():
        return {}
    n = min(len(replicas1), len(replicas2))
    null = ((replicas1[:n] - g1) - (replicas2[:n] - g2))[:, occupied] / sigma[occupied]
    return {"max_z": float((np.abs(g1 - g2)[occupied] / sigma[occupied]).max()),
            "max_z_noise95": float(np.percentile(np.abs(null).max(axis=1), 95)),
            "shells": float(occupied.sum())}


def pair_histograms(xyz: np.ndarray, topology: Any, box_edges_nm: tuple[float, ...],
                    pairs: np.ndarray, r_max_nm: float, n_bins: int = 60) -> PairHistograms:
    """Minimum-image distances (mdtraj, periodic) of ``pairs`` in each frame of ``xyz``
    (F, atoms, 3) nm in an orthorhombic box, histogrammed per frame in ``n_bins`` shells up to
    ``r_max_nm``."""
    import mdtraj

    xyz = np.asarray(xyz, dtype=np.float64)
    frames = len(xyz)
    lengths = np.tile(np.asarray(box_edges_nm, dtype=np.float64), (frames, 1))
    trajectory = mdtraj.Trajectory(xyz, topology, unitcell_lengths=lengths,
                                   unitcell_angles=np.full((frames, 3), 90.0))
    distances = mdtraj.compute_distances(trajectory, pairs, periodic=True)  # (F, P)
    edges = np.linspace(0.0, r_max_nm, n_bins + 1)
    shell_index = np.searchsorted(edges, distances, side="right") - 1     # (F, P)
    shell_index[distances == edges[-1]] = n_bins - 1     # the last shell is closed (np.histogram)
    inside = (shell_index >= 0) & (shell_index < n_bins)
    rows = np.broadcast_to(np.arange(frames)[:, None], distances.shape)
    counts = np.zeros((frames, n_bins))
    np.add.at(counts, (rows[inside], shell_index[inside]), 1.0)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    ideal = len(pairs) * shell / float(np.prod(box_edges_nm))
    return PairHistograms(r_nm=0.5 * (edges[1:] + edges[:-1]), counts=counts, ideal=ideal)


def _checked_weights(weights: np.ndarray | None, frames: int) -> np.ndarray:
    w = np.ones(frames) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (frames,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights: need (frames,) finite non-negative values with a positive sum")
    return w


def configurational_temperature(
    potential: Callable[[torch.Tensor], torch.Tensor],
    x: np.ndarray | torch.Tensor,
    boltzmann_constant: float = 1.0,
    n_blocks: int = 20,
    chunk_size: int | None = None,
) -> tuple[float, float]:
    """The configurational temperature of samples ``x`` (N, dim) of ``potential`` and its
    1-sigma error, (T_conf, err), in the temperature units of ``boltzmann_constant``:

        k_B T_conf = ⟨|∇U|²⟩ / ⟨∇²U⟩

    (Rugh, PRL 78, 772 (1997); Butler, Ayton, Jepps, Evans, JCP 109, 6519 (1998)). For samples
    of p ∝ exp(−U / k_B T) with the Lebesgue measure on the coordinates, integration by parts,
    ∫ ∇·(∇U e^{−U/k_B T}) dx = 0, gives ⟨∇²U⟩ = ⟨|∇U|²⟩ / k_B T, so T_conf = T; samples at
    another temperature, or not yet relaxed, give another value. It needs no energies'
    normalisation and no velocities, only U's first and second derivatives.

    The gradient and Laplacian are taken with respect to the coordinates ``x`` themselves (for
    a system: its flow coordinates, whose measure is Lebesgue, e.g. a particle system's
    centre-of-mass-free Helmert coordinates; in coordinates with a non-constant Jacobian the
    identity does not hold as written). Both are exact, by torch autograd in float64: the
    Laplacian is the trace of each sample's Hessian, ∇²U = Σ_k ∂²U/∂x_k², one Hessian-vector
    product per coordinate k for a whole chunk of ``chunk_size`` samples at once (default
    ~2²² / dim², which bounds the autograd graph's memory). The potential must map
    (batch, dim) -> (batch,) with samples independent (U of one row depends on that row
    only), twice differentiable at the samples.

    Error: the delta method on block means. The samples are split into ``n_blocks`` contiguous
    blocks (sizes equal within one) with means G_b of |∇U|² and L_b of ∇²U; with
    R = ⟨|∇U|²⟩ / ⟨∇²U⟩ over all samples, the ratio's variance is
    var(G_b − R L_b) / (n_blocks ⟨∇²U⟩²) (sample variance over blocks). Correlated samples are
    handled when they are in time order and a block spans many correlation times (e.g. the
    frames of one chain after another, chain-major: blocks of whole independent chains are
    independent); the error is then honest to the extent that block means are independent.
    Where |∇U|² is heavy-tailed (close contacts of Lennard-Jones particles: skewness ~3,
    kurtosis ~20 per sample in LJ13), a sample short of the rare large values gives both a low
    T_conf and a low error, so the error is optimistic for few samples: over 12 independent
    replica-exchange runs of LJ13 (ordered pairs; 128 chains in 32 blocks of whole chains),
    the rms of (T_conf − T) / err at kT = 1 was 1.7 with 50 frames per chain, 1.4 with 100
    and 1.1 with 400 (1.3 to 1.5 at kT = 1.5); an honest error gives 1.

    Raises ValueError for a bad shape, too few samples (fewer than ``n_blocks``), non-finite
    derivatives or ⟨∇²U⟩ <= 0 (no temperature then).
    """
    kb = check_float("boltzmann_constant", boltzmann_constant, positive=True)
    n_blocks = check_int("n_blocks", n_blocks, minimum=2)
    if isinstance(x, torch.Tensor):
        samples = x.detach().to(device="cpu", dtype=torch.float64)
    else:
        samples = torch.as_tensor(np.array(x, dtype=np.float64))
    if samples.ndim != 2 or samples.shape[0] < n_blocks:
        raise ValueError(f"x: shape {tuple(samples.shape)} is not allowed; need (N, dim) with "
                         f"N >= n_blocks ({n_blocks})")
    n, dim = samples.shape
    if chunk_size is None:
        # The autograd graph of a chunk holds a few numbers per pair per sample, ~dim² for a
        # pair potential: ~2²² / dim² samples keep it to some hundred MB (LJ55: 160 samples).
        chunk_size = max(1, 2**22 // dim**2)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    with torch.no_grad():
        probe = potential(samples[:1])
    if not isinstance(probe, torch.Tensor) or probe.shape != (1,):
        raise ValueError("potential: must map a (batch, dim) tensor to a (batch,) tensor; got "
                         f"{type(probe).__name__} of shape {tuple(getattr(probe, 'shape', ()))}")
    squared_gradient = np.empty(n)
    laplacian = np.empty(n)
    with torch.enable_grad():
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            squared_gradient[start:stop], laplacian[start:stop] = _gradient_and_laplacian(
                potential, samples[start:stop])
    if not (np.isfinite(squared_gradient).all() and np.isfinite(laplacian).all()):
        raise ValueError("x: the potential's gradient or Laplacian is not finite at some "
                         "samples; need samples where U is twice differentiable")
    mean_laplacian = float(laplacian.mean())
    if mean_laplacian <= 0.0:
        raise ValueError(f"x: mean Laplacian of U {mean_laplacian!r} is not allowed; the "
                         "configurational temperature needs ⟨∇²U⟩ > 0")
    ratio = float(squared_gradient.mean()) / mean_laplacian
    blocks = np.array_split(np.arange(n), n_blocks)
    block_g = np.array([squared_gradient[b].mean() for b in blocks])
    block_l = np.array([laplacian[b].mean() for b in blocks])
    # Delta method: R̂ − R ≈ (Ḡ − R L̄) / ⟨∇²U⟩, whose variance the block residuals estimate.
    residual = block_g - ratio * block_l
    error = float(np.sqrt(residual.var(ddof=1) / n_blocks)) / mean_laplacian
    return ratio / kb, error / kb


def _gradient_and_laplacian(potential: Callable[[torch.Tensor], torch.Tensor],
                            x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """|∇U|² and ∇²U (B,) each at the rows of ``x`` (B, dim), by autograd.

    Rows are independent, so the gradient of Σ_b U(x_b) is each row's ∇U, and the gradient of
    Σ_b ∂U/∂x_{b,k} is each row's k-th Hessian column; its k-th entry summed over k is the
    trace. dim reverse passes through one double-backward graph: on 2 CPU cores this took
    ~14 ms per LJ55 sample (dim 162), against ~100 ms for a vmap of jacfwd(grad) per sample.
    """
    xg = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(potential(xg).sum(), xg, create_graph=True)
    laplacian = torch.zeros(len(x), dtype=torch.float64)
    if grad.requires_grad:  # else ∇U is constant (a linear U) and ∇²U = 0
        for k in range(x.shape[1]):
            (column,) = torch.autograd.grad(grad[:, k].sum(), xg, retain_graph=True,
                                            materialize_grads=True)
            laplacian += column[:, k].detach()
    return grad.detach().square().sum(dim=1).numpy(), laplacian.numpy()
