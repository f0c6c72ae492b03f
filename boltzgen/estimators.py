"""Free-energy estimators in reduced units (kT); formulas of docs/architecture.md, Conventions.

Conventions: f = -ln Z (dimensionless, kT), ΔF = f_B - f_A for a map T from state A to state B.

- LFEP / importance weighting (Jarzynski 1997; Wirnsberger et al., J. Chem. Phys. 153, 144112,
  2020), x ~ A:  log w(x) = u_A(x) + log|det J_T(x)| - u_B(T(x)),
  ΔF ≈ ln N - logsumexp(log w). With a normalized base (f_A = 0) this is the BG estimate
  f_B ≈ -(logsumexp(log w) - ln N) with log w = -u_B(y) - log q(y).
- Kish effective sample size fraction: ESS/N = exp(2 logsumexp(log w) - logsumexp(2 log w)) / N.
- LBAR: Bennett's acceptance ratio (Bennett 1976; Shirts et al., PRL 91, 140601, 2003) on the
  generalized works of the map and its inverse (pymbar ``other_estimators.bar``).
- MBAR (Shirts & Chodera, J. Chem. Phys. 129, 124105, 2008) over a temperature ladder,
  errors by bootstrap.

Samples with non-finite log weight get weight zero, are counted and reported; a non-finite
estimate is never reported as valid.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from boltzgen._checks import check_float, check_int
from boltzgen._pymbar import pymbar


def logsumexp(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``scipy.special.logsumexp``, imported at the first call: every actor process imports
    this module, and most never estimate anything."""
    from scipy.special import logsumexp as scipy_logsumexp

    return scipy_logsumexp(a, axis=axis)


@dataclass
class FreeEnergyEstimate:
    """An importance-weighting estimate of ΔF = f_B - f_A (kT)."""

    delta_f: float  # kT; NaN when no finite estimate exists (then valid is False)
    delta_f_err: float  # 1 sigma, kT (delta method)
    ess: float  # Kish ESS / N, fraction in [0, 1]
    n_samples: int  # N, including samples with non-finite log weight
    n_nonfinite: int  # samples whose log weight was not finite (weight 0, counted in N)
    valid: bool  # True iff delta_f and delta_f_err are finite


def _as_1d(name: str, values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: shape {arr.shape} is not allowed; need a 1-D array (N,)")
    return arr


def lfep_log_weights(
    u_a: torch.Tensor | np.ndarray,
    logdet: torch.Tensor | np.ndarray,
    u_b: torch.Tensor | np.ndarray,
) -> np.ndarray:
    """log w(x) = u_A(x) + log|det J_T(x)| - u_B(T(x)) for x ~ A, float64 (N,).

    ``u_a`` = u_A(x), ``logdet`` = log|det J_T(x)|, ``u_b`` = u_B(T(x)), all reduced (kT), (N,).
    Non-finite values propagate (they are handled by :func:`importance_free_energy`).
    """
    a, ld, b = _as_1d("u_a", u_a), _as_1d("logdet", logdet), _as_1d("u_b", u_b)
    if not a.shape == ld.shape == b.shape:
        raise ValueError(
            f"u_a, logdet, u_b: shapes {a.shape}, {ld.shape}, {b.shape} must be equal (N,)"
        )
    with np.errstate(invalid="ignore", over="ignore"):
        return a + ld - b


def normalized_weights(log_w: np.ndarray) -> np.ndarray:
    """Importance weights up to a constant: exp(log w − max log w), with non-finite log weights
    as 0 (all 0 when none is finite), for weighted histograms and averages."""
    finite = np.isfinite(log_w)
    w = np.zeros_like(log_w, dtype=np.float64)
    if finite.any():
        w[finite] = np.exp(log_w[finite] - log_w[finite].max())
    return w


def kish_ess_fraction(log_w: torch.Tensor | np.ndarray) -> float:
    """Kish ESS / N = exp(2 logsumexp(log w) - logsumexp(2 log w)) / N, in [0, 1].

    Non-finite log weights count as weight zero (they stay in N); 0.0 if none is finite.
    """
    lw = _as_1d("log_w", log_w)
    if lw.size == 0:
        raise ValueError("log_w: empty; need at least one log weight")
    finite = lw[np.isfinite(lw)]
    if finite.size == 0:
        return 0.0
    ess = math.exp(2.0 * logsumexp(finite) - logsumexp(2.0 * finite)) / lw.size
    return min(1.0, ess)


def kish_ess_fraction_err(log_w: torch.Tensor | np.ndarray, n_bootstrap: int = 200,
                          seed: int = 0) -> float:
    """Bootstrap standard error of :func:`kish_ess_fraction`: the standard deviation of the
    ESS fraction over ``n_bootstrap`` resamples (with replacement) of the N log weights.

    The resampling treats the samples as independent (held-out MD frames are taken one
    statistical inefficiency apart). With heavy-tailed weights the ESS of a few hundred
    samples moves by several hundredths between data sets; this says by about how much, and
    errs low: a resample cannot hold a large weight the sample did not draw. Measured against
    the spread of the ESS over 300 independent sets of log-normal weights: 0.90 of it for
    log w ~ N(0, 0.5²) (N = 300, ESS 0.78), 0.71 for N(0, 1) (N = 300, ESS 0.38) and 0.72 for
    N(0, 1.5²) (N = 150, ESS 0.18).
    """
    def ess_fractions(resampled: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            log_ess = 2.0 * logsumexp(resampled, axis=1) - logsumexp(2.0 * resampled, axis=1)
        return np.minimum(1.0, np.nan_to_num(np.exp(log_ess), nan=0.0) / resampled.shape[1])

    return float(np.std(_bootstrap_log_weights(log_w, ess_fractions, n_bootstrap, seed),
                        ddof=1))


def importance_free_energy(log_w: torch.Tensor | np.ndarray) -> FreeEnergyEstimate:
    """ΔF = ln N - logsumexp(log w) (kT), with its delta-method error and Kish ESS.

    N counts every sample; non-finite log w get weight zero. The 1-sigma error is
    sqrt(var(w) / (N mean(w)^2)) = sqrt((1/ess - 1) / N) with ess the Kish fraction
    (delta method on ΔF = -ln mean(w)). It is only meaningful when the weights' variance is
    finite; a small ESS flags that it is not trustworthy.
    """
    lw = _as_1d("log_w", log_w)
    n = lw.size
    if n == 0:
        raise ValueError("log_w: empty; need at least one log weight")
    mask = np.isfinite(lw)
    n_nonfinite = int(n - mask.sum())
    if n_nonfinite == n:
        return FreeEnergyEstimate(math.nan, math.nan, 0.0, n, n_nonfinite, False)
    finite = lw[mask]
    lse = float(logsumexp(finite))
    delta_f = math.log(n) - lse
    ess = kish_ess_fraction(lw)
    # sqrt(var(w) / (N mean(w)^2)) with w scaled by exp(-max log w) (no overflow; identical
    # weights give exactly 0); equals sqrt((1/ess - 1)/N) with non-finite samples as w = 0.
    w = np.zeros(n)
    w[mask] = np.exp(finite - finite.max())
    err = math.sqrt(float(w.var()) / (n * float(w.mean()) ** 2))
    valid = math.isfinite(delta_f) and math.isfinite(err)
    if not valid:
        delta_f, err = math.nan, math.nan
    return FreeEnergyEstimate(delta_f, err, ess, n, n_nonfinite, valid)


def importance_free_energy_err_bootstrap(log_w: torch.Tensor | np.ndarray,
                                         n_bootstrap: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error (kT) of the LFEP estimate ΔF = ln N − logsumexp(log w): the
    standard deviation of ΔF over ``n_bootstrap`` resamples (with replacement) of the N log
    weights, samples taken as independent. It checks the delta-method error of
    :func:`importance_free_energy`; both err low when the weights are heavy-tailed (see
    :func:`kish_ess_fraction_err`). NaN when a resample has no finite weight."""
    def free_energies(resampled: np.ndarray) -> np.ndarray:
        return math.log(resampled.shape[1]) - logsumexp(resampled, axis=1)

    values = _bootstrap_log_weights(log_w, free_energies, n_bootstrap, seed)
    return float(np.std(values, ddof=1)) if np.all(np.isfinite(values)) else math.nan


def _bootstrap_log_weights(log_w: torch.Tensor | np.ndarray,
                           statistic: Callable[[np.ndarray], np.ndarray], n_bootstrap: int,
                           seed: int) -> np.ndarray:
    """``statistic`` (rows of resampled log weights (R, N) -> (R,)) over ``n_bootstrap``
    resamples with replacement of the N log weights, in chunks of at most ~16 MB of indices.
    As in :func:`kish_ess_fraction`, a non-finite log weight is a weight of zero that counts
    in N."""
    lw = _as_1d("log_w", log_w)
    if lw.size < 2:
        raise ValueError(f"log_w: {lw.size} log weight(s); a bootstrap needs at least 2")
    n_bootstrap = check_int("n_bootstrap", n_bootstrap, minimum=2)
    rng = np.random.default_rng(seed)
    weights = np.where(np.isfinite(lw), lw, -np.inf)
    rows = max(1, 2_000_000 // lw.size)
    values = []
    for first in range(0, n_bootstrap, rows):
        draws = rng.integers(0, lw.size, (min(rows, n_bootstrap - first), lw.size))
        values.append(statistic(weights[draws]))
    return np.concatenate(values)


def lbar(forward_work: np.ndarray, reverse_work: np.ndarray) -> tuple[float, float]:
    """LBAR estimate of ΔF = f_B - f_A (kT) and its 1-sigma error (pymbar's BAR variance).

    forward_work[n] = -log w_F = u_B(T x_n) - u_A(x_n) - log|det J_T(x_n)| for x_n ~ A;
    reverse_work[m] = u_A(T^-1 y_m) - u_B(y_m) - log|det J_{T^-1}(y_m)| for y_m ~ B.
    Non-finite works are dropped. Where pymbar's asymptotic error is not finite (overflow from
    extreme works, or round-off for a perfect map) the error is a bootstrap over both work sets
    (50 resamplings). Returns (NaN, NaN) when a side
    has no finite work, when BAR fails to bracket / converge, or when pymbar would fall back to
    its silent "0 ± 0" guess for non-overlapping work distributions (meaningless numbers).
    """
    other_estimators = pymbar().other_estimators
    BoundsError, ConvergenceError, ParameterError = (
        pymbar().utils.BoundsError, pymbar().utils.ConvergenceError, pymbar().utils.ParameterError)

    w_f = _as_1d("forward_work", forward_work)
    w_r = _as_1d("reverse_work", reverse_work)
    w_f, w_r = w_f[np.isfinite(w_f)], w_r[np.isfinite(w_r)]
    if w_f.size == 0 or w_r.size == 0:
        return math.nan, math.nan
    numpy_errors = np.geterr()  # pymbar's bar_zero switches overflow to "raise" globally
    try:
        upper = other_estimators.exp(w_f, compute_uncertainty=False)["Delta_f"]
        lower = -other_estimators.exp(w_r, compute_uncertainty=False)["Delta_f"]
        if np.isnan(other_estimators.bar_zero(w_f, w_r, upper)) or np.isnan(
            other_estimators.bar_zero(w_f, w_r, lower)
        ):
            return math.nan, math.nan
        with np.errstate(invalid="ignore"):
            result = other_estimators.bar(w_f, w_r)
    except (BoundsError, ConvergenceError, ParameterError, FloatingPointError) as err:
        warnings.warn(
            f"lbar: BAR failed ({type(err).__name__}: {err}); returning NaN", stacklevel=2
        )
        return math.nan, math.nan
    finally:
        np.seterr(**numpy_errors)
    delta_f, err = float(result["Delta_f"]), float(result["dDelta_f"])
    if not math.isfinite(delta_f):
        return math.nan, math.nan
    if not math.isfinite(err):
        # pymbar's asymptotic variance overflows (inf/inf) when a few works are extreme, and
        # turns slightly negative by round-off for a (nearly) perfect map. Neither says the
        # error is zero: fall back to a bootstrap over both work sets.
        err = lbar_err_bootstrap(w_f, w_r, n_bootstraps=50)
    return delta_f, err


def lbar_err_bootstrap(forward_work: np.ndarray, reverse_work: np.ndarray,
                       n_bootstraps: int = 100, seed: int = 0) -> float:
    """1-sigma of BAR's ΔF (kT) over bootstrap resamplings of the forward and reverse works
    (each set resampled with replacement, non-finite works dropped first, samples taken as
    independent); NaN when BAR cannot solve a resample. It checks pymbar's asymptotic error
    that :func:`lbar` reports."""
    other_estimators = pymbar().other_estimators
    w_f = _as_1d("forward_work", forward_work)
    w_r = _as_1d("reverse_work", reverse_work)
    w_f, w_r = w_f[np.isfinite(w_f)], w_r[np.isfinite(w_r)]
    if w_f.size < 2 or w_r.size < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    values = []
    numpy_errors = np.geterr()
    try:
        for _ in range(n_bootstraps):
            f = w_f[rng.integers(0, w_f.size, w_f.size)]
            r = w_r[rng.integers(0, w_r.size, w_r.size)]
            with np.errstate(all="ignore"):
                values.append(other_estimators.bar(f, r, compute_uncertainty=False)["Delta_f"])
    except Exception:  # a resample BAR cannot solve: no honest error bar
        return math.nan
    finally:
        np.seterr(**numpy_errors)
    values = np.asarray(values, dtype=float)
    return float(np.std(values, ddof=1)) if np.all(np.isfinite(values)) else math.nan


def mbar_ladder(
    potentials_per_state: Sequence[np.ndarray],
    temperatures: Sequence[float],
    boltzmann_constant: float = 1.0,
    n_bootstraps: int = 50,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """MBAR over a temperature ladder: (f_k - f_0, 1-sigma error), both (K,) in kT.

    ``potentials_per_state[k]``: potential energies U (energy units) of decorrelated samples
    drawn at ``temperatures[k]``. Pools the samples, builds u_kn = U_n / (k_B T_k) (K, N_tot)
    and solves MBAR (pymbar 4) for f_k = -ln ∫ exp(-U/(k_B T_k)) dx. Errors come from
    ``n_bootstraps`` bootstrap resamplings (reproducible from ``seed``; the global NumPy RNG
    state is restored afterwards), or from the asymptotic covariance if ``n_bootstraps == 0``.
    """
    MBAR = pymbar().MBAR

    temps = [
        check_float(f"temperatures[{i}]", t, positive=True) for i, t in enumerate(temperatures)
    ]
    kb = check_float("boltzmann_constant", boltzmann_constant, positive=True)
    n_bootstraps = check_int("n_bootstraps", n_bootstraps, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    if len(potentials_per_state) != len(temps) or not temps:
        raise ValueError(
            f"potentials_per_state: {len(potentials_per_state)} states given for "
            f"{len(temps)} temperatures; need one non-empty array per temperature (K >= 1)"
        )
    arrays = [_as_1d(f"potentials_per_state[{k}]", u) for k, u in enumerate(potentials_per_state)]
    for k, u in enumerate(arrays):
        if u.size == 0 or not np.all(np.isfinite(u)):
            raise ValueError(
                f"potentials_per_state[{k}]: needs at least one sample and only finite energies"
            )
    # Neighbouring temperatures whose energy ranges do not even touch share no configurations:
    # MBAR then has nothing to connect them with, and pymbar's solver can run for a very long
    # time before it gives up. Refuse at once, saying what to change.
    order = np.argsort(temps)
    for cold, hot in zip(order[:-1], order[1:], strict=True):
        if arrays[cold].max() < arrays[hot].min():
            raise RuntimeError(
                f"MBAR ladder: the states at {temps[cold]:g} and {temps[hot]:g} do not overlap "
                f"(highest energy at {temps[cold]:g}: {arrays[cold].max():.6g}, lowest at "
                f"{temps[hot]:g}: {arrays[hot].min():.6g}); use more rungs "
                "(reference.ladder_size) or longer runs")
    u_n = np.concatenate(arrays)
    n_k = np.array([u.size for u in arrays], dtype=int)
    beta = 1.0 / (kb * np.asarray(temps))
    u_kn = beta[:, None] * u_n[None, :]
    # From pymbar's default zero start the solver can stop at f = 0 without a word when the
    # states' free energies differ by hundreds of kT (ice between temperatures); BAR between
    # neighbours starts it near the answer. The bootstrap runs in a second MBAR started at the
    # converged f_k: pymbar 4.0.3 combines BAR initialisation and bootstrapping by overwriting
    # the point estimate with a resample's.
    state = np.random.get_state()
    try:
        # pymbar 4.0 reseeds the global NumPy RNG from entropy when rseed is None.
        f_k = np.asarray(MBAR(u_kn, n_k, initialize="BAR", rseed=seed).f_k, dtype=np.float64)
    finally:
        np.random.set_state(state)
    # The MBAR equations say every state's weights over the pooled samples sum to 1:
    # W_nk = exp(f_k − u_kn) / Σ_j N_j exp(f_j − u_jn).
    log_denominator = logsumexp(np.log(n_k)[:, None] + f_k[:, None] - u_kn, axis=0)
    column_sums = np.exp(f_k[:, None] - u_kn - log_denominator[None, :]).sum(axis=1)
    if not np.allclose(column_sums, 1.0, atol=1e-6):
        raise RuntimeError(f"MBAR did not converge: state weight sums {column_sums} differ "
                           "from 1")
    state = np.random.get_state()
    try:
        # pymbar 4.0 draws bootstrap indices from the global NumPy RNG and, when rseed is None,
        # reseeds it from entropy; a non-None rseed leaves our seeding in place.
        np.random.seed(seed)
        mbar = MBAR(u_kn, n_k, initial_f_k=f_k, n_bootstraps=n_bootstraps, rseed=seed)
        method = "bootstrap" if n_bootstraps > 0 else None
        result = mbar.compute_free_energy_differences(uncertainty_method=method)
    finally:
        np.random.set_state(state)
    return f_k - f_k[0], np.asarray(result["dDelta_f"][0], dtype=np.float64)
