"""Replica-exchange Metropolis Monte Carlo, vectorized over temperatures and chains.

State: K temperatures x n_chains independent chains, tensor (K, n_chains, dim), float64.
Each step, every replica proposes a Gaussian random-walk move x' = x + σ_k ε, ε ~ N(0, I), and
accepts with probability min(1, exp(-(U(x') - U(x)) / (k_B T_k))) (Metropolis et al. 1953).
Every ``exchange_every`` steps, neighbouring temperatures (alternately the pairs (0,1), (2,3), ...
and (1,2), (3,4), ...) swap configurations, chain by chain, with probability

    min(1, exp((β_i - β_j)(U_i - U_j))),   β = 1 / (k_B T)

(Swendsen & Wang 1986; Hukushima & Nemoto 1996), which keeps the product of the Boltzmann
distributions invariant. During burn-in each temperature's step size σ_k is adapted toward
~0.4 acceptance (log σ_k += 0.1 (a_k - 0.4) per step, a_k the fraction of chains accepted);
it is frozen afterwards, so the production chain is a time-homogeneous Markov chain.
Proposals with non-finite energy are rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from boltzgen._checks import check_float, check_int
from boltzgen._pymbar import pymbar

_TARGET_ACCEPTANCE = 0.4
_ADAPT_GAIN = 0.1


@dataclass
class McmcResult:
    """Output of :func:`replica_exchange` (energies in the potential's units)."""

    temperatures: np.ndarray  # (K,) ascending, as given
    samples: np.ndarray  # (K, n_chains, n_frames, dim), kept frames after burn-in, thinned
    potentials: np.ndarray  # (K, n_chains, n_frames), U in energy units
    acceptance: np.ndarray  # (K,) Metropolis acceptance after burn-in
    exchange_acceptance: (
        np.ndarray
    )  # (K-1,) neighbour-swap acceptance after burn-in (NaN: none tried)
    step_sizes: np.ndarray  # (K,) random-walk σ after adaptation, coordinate units


def _energies(potential: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """U for a (K, C, dim) state; the potential sees a (K*C, dim) batch."""
    u = potential(x.reshape(-1, x.shape[-1]))
    if not isinstance(u, torch.Tensor) or u.numel() != x.shape[0] * x.shape[1]:
        raise ValueError(
            "potential: must map a (batch, dim) tensor to a (batch,) tensor; "
            f"got {type(u).__name__} of shape {tuple(getattr(u, 'shape', ()))}"
        )
    return u.reshape(x.shape[:2]).to(x.dtype)


@dataclass(frozen=True)
class _Run:
    """Checked settings of one :func:`replica_exchange` run."""

    temperatures: list[float]
    n_steps: int
    burn_in: int
    n_chains: int
    thin: int
    exchange_every: int
    step_size: float
    boltzmann_constant: float
    seed: int
    x0: torch.Tensor  # (n_chains, dim)

    @property
    def n_frames(self) -> int:
        return (self.n_steps - self.burn_in) // self.thin


def _checked_run(temperatures: Sequence[float], x0: torch.Tensor, n_steps: int, burn_in: int,
                 n_chains: int, thin: int, step_size: float, exchange_every: int,
                 boltzmann_constant: float, seed: int) -> _Run:
    """The arguments of :func:`replica_exchange`, each checked (ValueError naming it)."""
    temps = [
        check_float(f"temperatures[{i}]", t, positive=True) for i, t in enumerate(temperatures)
    ]
    if not temps:
        raise ValueError("temperatures: empty; give at least one temperature")
    if any(b <= a for a, b in zip(temps[:-1], temps[1:], strict=True)):
        raise ValueError(f"temperatures: {temps} is not allowed; must be strictly ascending")
    n_steps = check_int("n_steps", n_steps, minimum=1)
    burn_in = check_int("burn_in", burn_in, minimum=0)
    n_chains = check_int("n_chains", n_chains, minimum=1)
    thin = check_int("thin", thin, minimum=1)
    exchange_every = check_int("exchange_every", exchange_every, minimum=1)
    step_size = check_float("step_size", step_size, positive=True)
    kb = check_float("boltzmann_constant", boltzmann_constant, positive=True)
    seed = check_int("seed", seed)
    if (n_steps - burn_in) // thin < 1:
        raise ValueError(
            f"n_steps: {n_steps} with burn_in={burn_in}, thin={thin} keeps no frame; "
            "need n_steps - burn_in >= thin"
        )
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0: expected a torch.Tensor, got {type(x0)}")
    if x0.ndim == 1:
        x0 = x0.expand(n_chains, -1)
    if x0.ndim != 2 or x0.shape[0] != n_chains:
        raise ValueError(
            f"x0: shape {tuple(x0.shape)} is not allowed; need (dim,) or ({n_chains}, dim)"
        )
    return _Run(temps, n_steps, burn_in, n_chains, thin, exchange_every, step_size, kb, seed, x0)


def _metropolis_step(potential: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     u: torch.Tensor, sigma: torch.Tensor, beta: torch.Tensor,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random-walk Metropolis move of every replica: (x, u, acceptance rate per
    temperature (K,)). Draws the proposal's normals, then the uniforms, from ``gen``."""
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64, device=x.device)
    x_new = x + sigma * noise
    u_new = _energies(potential, x_new)
    log_acc = -(u_new - u) * beta[:, None]
    log_r = torch.log(torch.rand(u.shape, generator=gen, dtype=torch.float64, device=x.device))
    accept = torch.isfinite(u_new) & (log_r < log_acc)
    x = torch.where(accept[..., None], x_new, x)
    u = torch.where(accept, u_new, u)
    return x, u, accept.to(torch.float64).mean(dim=1)


def _exchange_neighbours(x: torch.Tensor, u: torch.Tensor, beta: torch.Tensor, parity: int,
                         gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Swap attempts between temperatures (i, i + 1), i = parity, parity + 2, ..., chain by
    chain; ``x`` and ``u`` are changed in place. (pairs i, accepted (pairs, C)), or None when
    there is no such pair (no uniforms are drawn then)."""
    i = torch.arange(parity, len(beta) - 1, 2, device=x.device)
    if i.numel() == 0:
        return None
    j = i + 1
    log_swap = (beta[i] - beta[j])[:, None] * (u[i] - u[j])  # (pairs, C)
    log_r = torch.log(
        torch.rand(log_swap.shape, generator=gen, dtype=torch.float64, device=x.device)
    )
    swap = log_r < log_swap
    xi, xj, ui, uj = x[i], x[j], u[i], u[j]
    x[i] = torch.where(swap[..., None], xj, xi)
    x[j] = torch.where(swap[..., None], xi, xj)
    u[i] = torch.where(swap, uj, ui)
    u[j] = torch.where(swap, ui, uj)
    return i, swap


class _Tally:
    """What the production steps keep: the thinned frames and the acceptance counts."""

    def __init__(self, run: _Run, dim: int, device: torch.device) -> None:
        n_temps = len(run.temperatures)
        self.run = run
        self.samples = np.empty((n_temps, run.n_chains, run.n_frames, dim))
        self.potentials = np.empty((n_temps, run.n_chains, run.n_frames))
        self.accepted = torch.zeros(n_temps, dtype=torch.float64, device=device)
        self.swaps_accepted = torch.zeros(max(n_temps - 1, 0), dtype=torch.float64,
                                          device=device)
        self.swaps_tried = torch.zeros(max(n_temps - 1, 0), dtype=torch.float64, device=device)
        self.frame = 0

    def swaps(self, i: torch.Tensor, swap: torch.Tensor) -> None:
        self.swaps_accepted[i] += swap.to(torch.float64).mean(dim=1)
        self.swaps_tried[i] += 1.0

    def keep(self, step: int, x: torch.Tensor, u: torch.Tensor) -> None:
        """Store the state after production ``step`` if it is a thinned frame."""
        if (step - self.run.burn_in + 1) % self.run.thin == 0 and self.frame < self.run.n_frames:
            self.samples[:, :, self.frame] = x.cpu().numpy()
            self.potentials[:, :, self.frame] = u.cpu().numpy()
            self.frame += 1

    def result(self, log_sigma: torch.Tensor) -> McmcResult:
        n_prod = self.run.n_steps - self.run.burn_in
        tried = self.swaps_tried.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            exchange = np.where(tried > 0, self.swaps_accepted.cpu().numpy() / tried, np.nan)
        return McmcResult(
            temperatures=np.asarray(self.run.temperatures, dtype=np.float64),
            samples=self.samples,
            potentials=self.potentials,
            acceptance=(self.accepted / n_prod).cpu().numpy(),
            exchange_acceptance=exchange,
            step_sizes=torch.exp(log_sigma).cpu().numpy(),
        )


def replica_exchange(
    potential: Callable[[torch.Tensor], torch.Tensor],
    temperatures: Sequence[float],
    x0: torch.Tensor,
    n_steps: int,
    burn_in: int,
    n_chains: int,
    thin: int = 1,
    step_size: float = 0.1,
    exchange_every: int = 10,
    boltzmann_constant: float = 1.0,
    seed: int = 0,
) -> McmcResult:
    """Run replica-exchange Metropolis MCMC; see the module docstring for the algorithm.

    Args:
        potential: U(x) in energy units, (batch, dim) -> (batch,).
        temperatures: K >= 1 strictly ascending temperatures (temperature units; kT for toys).
        x0: start, (dim,) or (n_chains, dim), used at every temperature.
        n_steps: total Monte Carlo steps per replica, burn-in included.
        burn_in: steps discarded (and used for step-size adaptation), 0 <= burn_in < n_steps.
        n_chains: independent chains per temperature.
        thin: keep every ``thin``-th production step; n_frames = (n_steps - burn_in) // thin.
        step_size: initial random-walk σ (coordinate units), for every temperature.
        exchange_every: steps between swap attempts.
        boltzmann_constant: energy units per temperature unit (1.0 when temperature is kT).
        seed: seed of the torch.Generator that drives all randomness (reproducible).
    """
    run = _checked_run(temperatures, x0, n_steps, burn_in, n_chains, thin, step_size,
                       exchange_every, boltzmann_constant, seed)
    n_temps, dim = len(run.temperatures), run.x0.shape[-1]
    device = run.x0.device
    # One generator drives every draw, in a fixed order per step (proposal normals, Metropolis
    # uniforms, then swap uniforms): the same seed gives the same chains.
    gen = torch.Generator(device=device).manual_seed(run.seed)
    beta = 1.0 / (run.boltzmann_constant
                  * torch.tensor(run.temperatures, dtype=torch.float64, device=device))  # (K,)
    log_sigma = torch.full((n_temps,), math.log(run.step_size), dtype=torch.float64,
                           device=device)
    x = run.x0.detach().to(torch.float64).unsqueeze(0).expand(n_temps, -1, -1).clone()
    tally = _Tally(run, dim, device)

    with torch.no_grad():
        u = _energies(potential, x)
        if not bool(torch.isfinite(u).all()):
            raise ValueError("x0: the potential is not finite at the starting configuration")
        for step in range(run.n_steps):
            production = step >= run.burn_in
            x, u, rate = _metropolis_step(potential, x, u, torch.exp(log_sigma)[:, None, None],
                                          beta, gen)
            if production:
                tally.accepted += rate
            else:  # burn-in: adapt each temperature's σ toward the target acceptance
                log_sigma += _ADAPT_GAIN * (rate - _TARGET_ACCEPTANCE)
            if n_temps > 1 and (step + 1) % run.exchange_every == 0:
                # Alternate the pairs (0,1), (2,3), ... and (1,2), (3,4), ...
                swapped = _exchange_neighbours(x, u, beta,
                                               ((step + 1) // run.exchange_every) % 2, gen)
                if swapped is not None and production:
                    tally.swaps(*swapped)
            if production:
                tally.keep(step, x, u)
    return tally.result(log_sigma)


def decorrelated(
    samples: np.ndarray, potentials: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Subsample ONE temperature's chains to (nearly) independent frames.

    samples (n_chains, n_frames, dim), potentials (n_chains, n_frames). The statistical
    inefficiency g = 1 + 2 Σ_t C(t) (1 - t/n) of the potential time series is estimated per
    chain with ``pymbar.timeseries.statistical_inefficiency`` (Chodera et al., JCTC 3, 26, 2007);
    the maximum over chains is used (conservative), and every ceil(g)-th frame of each chain is
    kept. A chain whose potential never changes (stuck) gets g = n_frames (one frame kept).

    Returns (samples (M, dim), potentials (M,), g) with M = n_chains * ceil(n_frames / ceil(g)).
    """
    timeseries = pymbar().timeseries

    samples = np.asarray(samples, dtype=np.float64)
    potentials = np.asarray(potentials, dtype=np.float64)
    if samples.ndim != 3:
        raise ValueError(
            f"samples: shape {samples.shape} is not allowed; need (n_chains, n_frames, dim)"
        )
    if potentials.shape != samples.shape[:2]:
        raise ValueError(
            f"potentials: shape {potentials.shape} is not allowed; need {samples.shape[:2]} "
            "(n_chains, n_frames) matching samples"
        )
    n_frames = samples.shape[1]
    if n_frames < 1:
        raise ValueError("samples: no frames; need n_frames >= 1")
    g = 1.0
    for series in potentials:
        if n_frames < 2:
            continue
        if np.ptp(series) == 0.0:
            g = max(g, float(n_frames))
            continue
        g = max(g, float(timeseries.statistical_inefficiency(series)))
    stride = max(1, math.ceil(g))
    kept_x = samples[:, ::stride].reshape(-1, samples.shape[-1])
    kept_u = potentials[:, ::stride].reshape(-1)
    return kept_x, kept_u, g
