"""2-D double well of Stupp & Koutsourelakis (2025), reduced units.

    U(x) = a x1^4 + b x1^2 + c x1 + 0.5 x2^2,     defaults a = 0.25, b = -3, c = 1,

energies in kT at T = 1 (temperature means kT, k_B = 1). The two coordinates decouple, so

    Z(T) = [∫ exp(-(a x1^4 + b x1^2 + c x1)/T) dx1] * sqrt(2 pi T),

and the 1-D integral is done by adaptive quadrature on a finite interval whose neglected tails
are bounded analytically (see :meth:`DoubleWell2D.exact_free_energy`).

Reference: J. Stupp, P.-S. Koutsourelakis, "Energy-based generative models for molecular
systems: data-free training with adaptive tempering", 2025 (the double-well benchmark).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from boltzgen._checks import check_float
from boltzgen.layouts import VectorLayout
from boltzgen.systems.base import System

# Relative accuracy requested for Z(T); the analytic tail bound is held well below it.
_REL_TOL = 1e-12


class DoubleWell2D(System):
    """U(x) = a x1^4 + b x1^2 + c x1 + 0.5 x2^2 on R^2 (a > 0 so that Z is finite)."""

    kind: ClassVar[str] = "double_well"
    estimand_note: ClassVar[str] = "Z over R^2 (x1, x2), Lebesgue measure"
    dim: int = 2
    boltzmann_constant: float = 1.0

    def __init__(self, *, a: float = 0.25, b: float = -3.0, c: float = 1.0) -> None:
        self.a = check_float("a", a, positive=True)
        self.b = check_float("b", b)
        self.c = check_float("c", c)

    def potential(self, x: torch.Tensor) -> torch.Tensor:
        """U(x) in kT units (at T = 1); (..., 2) -> (...)."""
        self._check_coordinates(x)
        x1, x2 = x[..., 0], x[..., 1]
        return self.a * x1**4 + self.b * x1**2 + self.c * x1 + 0.5 * x2**2

    def openmm_system(self) -> Any:
        """The same potential as an OpenMM System: one particle in the plane z = 0.

        Flow coordinates (x1, x2) are the particle's (x, y) in nm; z is held at 0 (its force is
        ignored), and OpenMM's kJ/mol read as this system's reduced energy units.
        """
        import openmm

        system = openmm.System()
        system.addParticle(1.0)
        force = openmm.CustomExternalForce("a*x^4 + b*x^2 + c*x + 0.5*y^2")
        for name, value in (("a", self.a), ("b", self.b), ("c", self.c)):
            force.addGlobalParameter(name, value)
        force.addParticle(0, [])
        system.addForce(force)
        return system

    def openmm_positions(self, x: np.ndarray) -> np.ndarray:
        """Flow coordinates (B, 2) -> positions (B, 1, 3) in nm."""
        x = np.asarray(x, dtype=np.float64)
        return np.concatenate([x, np.zeros((len(x), 1))], axis=1)[:, None, :]

    def flow_gradient(self, forces: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        """OpenMM forces (B, 1, 3) -> ∇U in flow coordinates (B, 2) (linear map: x unused)."""
        return -np.asarray(forces)[:, 0, :2]

    def _v(self, x1: float | np.ndarray) -> float | np.ndarray:
        """1-D part V(x1) = a x1^4 + b x1^2 + c x1."""
        return self.a * x1**4 + self.b * x1**2 + self.c * x1

    def _dv(self, x1: float) -> float:
        return 4.0 * self.a * x1**3 + 2.0 * self.b * x1 + self.c

    def exact_free_energy(self, temperature: float) -> float:
        """f(T) = -ln Z(T) in kT, Z over R^2 with Lebesgue measure, to ~1e-12 relative in Z.

        With V(x1) = a x1^4 + b x1^2 + c x1, V_min its global minimum and
        I = ∫ exp(-(V(x1) - V_min)/T) dx1 (shifted to avoid overflow),

            f(T) = -ln I + V_min / T - 0.5 ln(2 pi T).

        The integral runs over [-R, R] with breakpoints at the critical points of V. R is
        increased until the neglected tails are provably below 1e-13 I: for |x| >= R beyond
        every critical point and inflection point, V is convex and monotone, so
        V(x) >= V(R) + V'(R)(x - R) and the tail is <= T exp(-(V(R) - V_min)/T) / |V'(R)|
        (same on the left).
        """
        t = check_float("temperature", temperature, positive=True)
        value, v_min, _ = self._x1_integrals(t)
        return -math.log(sum(value)) + v_min / t - 0.5 * math.log(2.0 * math.pi * t)

    def _critical_points(self) -> np.ndarray:
        roots = np.roots([4.0 * self.a, 0.0, 2.0 * self.b, self.c])
        return np.sort(roots[np.abs(roots.imag) < 1e-9].real)

    def _x1_integrals(self, t: float) -> tuple[list[float], float, float]:
        """The shifted integrals of exp(-(V(x1) - V_min)/T) left and right of the barrier
        (:meth:`barrier`; the whole line split at it), V_min and the radius R of [-R, R]
        beyond which the tails are negligible (see exact_free_energy)."""
        crit = self._critical_points()
        v_min = float(np.min(self._v(crit)))
        inflection = math.sqrt(max(0.0, -self.b / (6.0 * self.a)))
        radius = max(float(np.max(np.abs(crit))), inflection) + 1.0
        split = self.barrier()
        from scipy import integrate  # here: every actor process imports this module

        while True:
            parts = [integrate.quad(lambda s: math.exp(-(self._v(s) - v_min) / t), lo, hi,
                                    points=[p for p in crit if lo < p < hi] or None,
                                    epsabs=0.0, epsrel=_REL_TOL, limit=500)[0]
                     for lo, hi in ((-radius, split), (split, radius))]
            tails = sum(
                t * math.exp(-(self._v(r) - v_min) / t) / abs(self._dv(r))
                for r in (-radius, radius)
            )
            if tails <= 0.1 * _REL_TOL * sum(parts):
                return parts, v_min, radius
            radius *= 1.5

    def exact_samples(self, n: int, temperature: float, seed: int) -> tuple[np.ndarray, int]:
        """``n`` independent samples at T: x1 by rejection from the uniform density on [−R, R]
        (accepted with probability exp(−(V(x1) − V_min)/T) ≤ 1; R the radius of
        exact_free_energy's quadrature, so the mass left out is below 1e-13 of the whole),
        x2 ~ N(0, T); also the proposals used."""
        t = check_float("temperature", temperature, positive=True)
        _, v_min, radius = self._x1_integrals(t)
        rng = np.random.default_rng(seed)
        accepted: list[np.ndarray] = []
        proposals = count = 0
        while count < n:
            x1 = rng.uniform(-radius, radius, size=max(1024, 4 * (n - count)))
            keep = x1[rng.random(len(x1)) < np.exp(-(self._v(x1) - v_min) / t)]
            proposals += len(x1)
            accepted.append(keep)
            count += len(keep)
        x1 = np.concatenate(accepted)[:n]
        return np.stack([x1, math.sqrt(t) * rng.standard_normal(n)], axis=1), proposals

    def barrier(self) -> float:
        """x1 of the barrier between the two wells (the local maximum of V), or of the one
        minimum when V has a single well."""
        crit = self._critical_points()
        return float(crit[1]) if len(crit) == 3 else float(crit[0])

    def exact_mode_probabilities(self, temperature: float) -> np.ndarray:
        """P(x1 < barrier), P(x1 > barrier) at T by quadrature (the modes of :meth:`mode_index`)."""
        t = check_float("temperature", temperature, positive=True)
        parts, _, _ = self._x1_integrals(t)
        return np.asarray(parts) / sum(parts)

    def mode_index(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """0 for samples left of the barrier in x1, 1 right of it."""
        arr = self._as_samples(x)
        return (arr[:, 0] > self.barrier()).astype(np.int64)

    def layout(self) -> VectorLayout:
        """R^2 with x1, the coordinate of the two wells, as its one slow variable."""
        return VectorLayout(2, slow_dim=1)

    def observables(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """{"x1": x[:, 0], "x2": x[:, 1]} for x of shape (N, 2)."""
        arr = self._as_samples(x)
        return {"x1": arr[:, 0].copy(), "x2": arr[:, 1].copy()}
