"""The Gaussian mixture of Stupp & Koutsourelakis (2025): multimodal slow variables and fast
variables that follow them linearly, normalized, so every answer is known exactly.

With s = x[:k] (the slow variables) and f = x[k:] (the fast ones),

    p(x) = [ (1/C) Σ_c N(s; m_c, σ² I_k) ] · N(f; B s, σ_f² I_{D−k}),      U(x) = −ln p(x),

energies in kT at T = 1 (temperature means kT). The paper's setting, the default here: C = 3
equal components, k = 10, D − k = 10, σ = σ_f = 0.1. The centres m_c are uniform in
[−1, 1]^k and B has entries N(0, 1/k) (so B s is of the order of s), both drawn from a numpy
generator seeded with ``seed`` (a system parameter, so recorded with every job). p is a
normalized density: Z(1) = 1 and the exact f = −ln Z = 0; the modes (the components, found
as the nearest centre in s) have probability 1/C each, up to the mass a component puts in
another's Voronoi cell, bounded by :meth:`GaussianMixture.misassignment_bound` (below 1e-20
for the defaults).
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from boltzgen._checks import check_float, check_int
from boltzgen.layouts import VectorLayout
from boltzgen.systems.base import System


class GaussianMixture(System):
    """The normalized mixture p(x) above; flow coordinates x = (s, f) in R^{k + fast_dim}."""

    kind: ClassVar[str] = "gaussian_mixture"
    estimand_note: ClassVar[str] = "Z over R^D (slow then fast coordinates), Lebesgue measure"
    boltzmann_constant: float = 1.0

    def __init__(self, *, n_components: int = 3, slow_dim: int = 10, fast_dim: int = 10,
                 sd: float = 0.1, fast_sd: float = 0.1, seed: int = 2025) -> None:
        self.n_components = check_int("n_components", n_components, minimum=1)
        self.slow_dim = check_int("slow_dim", slow_dim, minimum=1)
        self.fast_dim = check_int("fast_dim", fast_dim, minimum=1)
        self.sd = check_float("sd", sd, positive=True)
        self.fast_sd = check_float("fast_sd", fast_sd, positive=True)
        self.seed = check_int("seed", seed, minimum=0)
        self.dim = self.slow_dim + self.fast_dim
        rng = np.random.default_rng(self.seed)
        self.centres = rng.uniform(-1.0, 1.0, size=(self.n_components, self.slow_dim))
        self.coupling = rng.normal(0.0, 1.0 / math.sqrt(self.slow_dim),
                                   size=(self.fast_dim, self.slow_dim))

    def layout(self) -> VectorLayout:
        return VectorLayout(self.dim, slow_dim=self.slow_dim)

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """U(x) = −ln p(x) in kT at T = 1; (..., D) -> (...)."""
        self._check_coordinates(x)
        k = self.slow_dim
        s, f = x[..., :k], x[..., k:]
        centres = torch.as_tensor(self.centres, dtype=x.dtype, device=x.device)
        coupling = torch.as_tensor(self.coupling, dtype=x.dtype, device=x.device)
        squared = ((s[..., None, :] - centres) ** 2).sum(-1)  # (..., C)
        log_slow = (torch.logsumexp(-0.5 * squared / self.sd**2, -1) - math.log(self.n_components)
                    - k * math.log(self.sd) - 0.5 * k * math.log(2.0 * math.pi))
        residual = f - s @ coupling.T
        log_fast = (-0.5 * (residual**2).sum(-1) / self.fast_sd**2
                    - self.fast_dim * (math.log(self.fast_sd) + 0.5 * math.log(2.0 * math.pi)))
        return -(log_slow + log_fast)

    def exact_free_energy(self, temperature: float) -> float | None:
        """0 at T = 1 (p is normalized); None at other temperatures (∫ p^{1/T} of a mixture
        has no closed form)."""
        t = check_float("temperature", temperature, positive=True)
        return 0.0 if t == 1.0 else None

    def exact_mode_probabilities(self, temperature: float) -> np.ndarray | None:
        """1/C per component at T = 1 (module docstring), else None."""
        t = check_float("temperature", temperature, positive=True)
        return np.full(self.n_components, 1.0 / self.n_components) if t == 1.0 else None

    def mode_index(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """The component whose centre is nearest to each sample's slow variables."""
        arr = self._as_samples(x)
        squared = ((arr[:, None, : self.slow_dim] - self.centres) ** 2).sum(-1)
        return squared.argmin(-1).astype(np.int64)

    def misassignment_bound(self) -> float:
        """An upper bound on the probability that a sample of one component lies nearer
        another's centre: Σ over ordered pairs of Φ(−|m_a − m_b| / (2σ)) / C (the half-space
        beyond the bisecting plane holds at least the other cell)."""
        from scipy.special import ndtr

        gaps = np.linalg.norm(self.centres[:, None] - self.centres[None], axis=-1)
        off = ~np.eye(self.n_components, dtype=bool)
        return float(ndtr(-gaps[off] / (2.0 * self.sd)).sum() / self.n_components)

    def exact_samples(self, n: int, temperature: float, seed: int) -> tuple[np.ndarray, int]:
        """``n`` independent samples of p at T = 1 (component, then slow, then fast)."""
        t = check_float("temperature", temperature, positive=True)
        if t != 1.0:
            raise ValueError(f"temperature: {t!r} is not allowed; the mixture is sampled "
                             "exactly at T = 1 only")
        rng = np.random.default_rng(check_int("seed", seed, minimum=0))
        component = rng.integers(self.n_components, size=n)
        s = self.centres[component] + self.sd * rng.standard_normal((n, self.slow_dim))
        f = s @ self.coupling.T + self.fast_sd * rng.standard_normal((n, self.fast_dim))
        return np.concatenate([s, f], axis=1), n

    def observables(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The first two slow coordinates (the marginal plots)."""
        arr = self._as_samples(x)
        return {"s1": arr[:, 0].copy(), "s2": arr[:, 1].copy()} if self.slow_dim > 1 else {
            "s1": arr[:, 0].copy()}
