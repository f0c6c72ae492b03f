"""The coarse-grained latent model of Stupp & Koutsourelakis (2025): a few slow variables with a
flexible, multimodal density, fast variables Gaussian given the slow ones, and a learnable
bijection to the system's coordinates.

Latent (the model's own prior, :class:`boltzgen.priors.SlowFastPrior`): u ~ U[−B, B]^k and
ε ~ N(0, I_{D−k}), k = ``slow_dim`` of the system's D coordinates. Forward map:

1. slow variables z = S(u): ``n_layers`` rational-quadratic spline layers on [−B, B] (the
   bounded base; :func:`boltzgen.flows.spline.rational_quadratic_spline`). For k = 1 each
   layer's spline has free parameters; for k ≥ 2 the layers are couplings whose splines are
   conditioned on the other half of z by an MLP (the masks of
   :func:`boltzgen.flows.base.conditioning_indices`). The density of z is thus any smooth
   density on the box, several modes included;
2. fast variables X = μ(z) + σ(z) ⊙ ε, with [μ, ln σ] an MLP of z (last layer zero-initialised:
   X | z starts as N(0, I));
3. the bijection x = W [z; X] + b to the system's coordinates, W = L U (L unit lower-triangular,
   U upper-triangular with diagonal e^s; always invertible, ln|det W| = Σ s), initialised at
   W = I, b = 0.

So q(x) has the exact log-density

    log q(x) = log p(u, ε) − Σ_layers ln|S'| − Σ ln σ(z) − Σ s,

and the model meets the flow contract (:mod:`boltzgen.flows.contract`): ``forward`` is (u, ε)
-> x with log|det| = Σ ln|S'| + Σ ln σ(z) + Σ s, ``inverse`` goes back by triangular solves.
The prior's box and the slow splines are part of the model and train with it.

On a molecule (a :class:`boltzgen.layouts.MoleculeLayout` with ``slow_torsions``) the slow
variables are torsions on a torus (B = π, circular splines) and step 3 is the
internal-coordinate map of :class:`_InternalCoordinateMap` (class docstring of
:class:`CoarseGrainedFlow`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from boltzgen._checks import check_float, check_int
from boltzgen.flows.base import conditioner_mlp, conditioning_indices
from boltzgen.flows.circle import circular_spline, circular_spline_parameter_count
from boltzgen.flows.contract import Flow
from boltzgen.flows.spline import MAX_BINS, rational_quadratic_spline
from boltzgen.internal_coordinates import ZMatrix, connected, log_volume_element, wrap_angle
from boltzgen.layouts import Layout, MoleculeLayout, VectorLayout, as_layout
from boltzgen.priors import SlowFastPrior

__all__ = ["CoarseGrainedFlow"]


class _SlowSpline(nn.Module):
    """One spline layer on the slow variables: free parameters (k = 1) or a coupling (k ≥ 2)
    whose conditioned half are the indices ``cond`` of z. On a box [−B, B] (rational-quadratic
    splines, ``circular`` False) or on the circle [−π, π) (circular splines, conditioned on
    cos and sin of the other half)."""

    def __init__(self, slow_dim: int, layer: int, hidden: int, n_hidden_layers: int,
                 n_bins: int, bound: float, circular: bool = False) -> None:
        super().__init__()
        self.bound, self.n_bins, self.circular = bound, n_bins, circular
        n_params = circular_spline_parameter_count(n_bins) if circular else 3 * n_bins - 1
        self.n_params = n_params
        cond = conditioning_indices(slow_dim, layer) if slow_dim > 1 else []
        trans = [i for i in range(slow_dim) if i not in cond]
        self.register_buffer("cond", torch.tensor(cond, dtype=torch.long))
        self.register_buffer("trans", torch.tensor(trans, dtype=torch.long))
        if cond:
            n_in = 2 * len(cond) if circular else len(cond)
            self.net: nn.Module | None = conditioner_mlp(n_in, len(trans) * n_params,
                                                         hidden, n_hidden_layers)
        else:
            self.net = None
            # Zero: the identity spline (equal bins, unit slopes), like a zero-initialised
            # conditioner's output.
            self.theta = nn.Parameter(torch.zeros(len(trans), n_params, dtype=torch.float64))

    def forward(self, z: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.n_bins
        moving = z.index_select(-1, self.trans)
        if self.net is None:
            theta = self.theta.expand(*z.shape[:-1], *self.theta.shape)
        else:
            cond = z.index_select(-1, self.cond)
            features = _circle_features(cond) if self.circular else cond
            theta = self.net(features).reshape(*z.shape[:-1], len(self.trans), self.n_params)
        if self.circular:  # circular_spline works on [0, 2π)
            out, log_derivative = circular_spline(moving + math.pi, theta, inverse)
            out = wrap_angle(out - math.pi)
        else:
            out, log_derivative = rational_quadratic_spline(
                moving, theta[..., :k], theta[..., k:2 * k], theta[..., 2 * k:],
                inverse=inverse, tail_bound=self.bound)
        z = z.clone()
        z[..., self.trans] = out
        return z, log_derivative.sum(-1)


def _circle_features(angles: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class _LinearBijection(nn.Module):
    """x = W [z; X] + b with W = L U (module docstring), identity at initialisation."""

    def __init__(self, dim: int, slow_dim: int) -> None:
        super().__init__()
        self.slow_dim = slow_dim
        self.lower = nn.Parameter(torch.zeros(dim, dim, dtype=torch.float64))
        self.upper = nn.Parameter(torch.zeros(dim, dim, dtype=torch.float64))
        self.log_diagonal = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.shift = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(len(self.shift), dtype=self.shift.dtype, device=self.shift.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(torch.exp(self.log_diagonal))
        return lower, upper

    def forward(self, z: torch.Tensor, fast: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower, upper = self._factors()
        x = torch.cat([z, fast], -1) @ (lower @ upper).T + self.shift
        return x, x.new_zeros(x.shape[:-1]) + self.log_diagonal.sum()

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lower, upper = self._factors()
        rhs = (x - self.shift).reshape(-1, x.shape[-1]).T
        v = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        y = torch.linalg.solve_triangular(upper, v, upper=True).T.reshape(x.shape)
        k = self.slow_dim
        return y[..., :k], y[..., k:], x.new_zeros(x.shape[:-1]) - self.log_diagonal.sum()


class _InternalCoordinateMap(nn.Module):
    """(slow torsions z, fast X) -> a molecule's Cartesian x (nm, canonical frame of its
    Z-matrix, :mod:`boltzgen.internal_coordinates`), for the coarse-grained model of a
    molecule (class docstring of :class:`CoarseGrainedFlow`).

    The slow variables are the Z-matrix torsions that carry the rotations about the declared
    slow torsions' central bonds (:meth:`ZMatrix.rotation_entry`; for a peptide, φ itself and
    the N–CA–C–O torsion, ψ + π up to the peptide plane's small twist). The fast X = (X_r
    (n − 1), X_θ (n − 2), X_τ (n − 3 − k)) go to the other internal coordinates by smooth
    bijections onto their whole domains, so that every latent point is a valid molecule:

        r = exp(c_r + s_r X_r)  (nm, > 0),   θ = π σ(c_θ + s_θ X_θ)  (rad, in (0, π)),
        τ = c_τ + 2 atan(s_τ X_τ)  (rad, the circle less the point opposite c_τ),

    σ the logistic function, with centres c (buffers) from the molecule's own structure
    (:meth:`fit_to_structure`; no data): X = 0 is that structure. The fixed unit scales s_r =
    0.03, s_θ = 0.1, s_τ = 0.15 make X ~ N(0, I), the fast variables' start, a molecule at
    room temperature (bonds ±3 %, angles ±0.08 rad, torsions ±0.3 rad) instead of one whose
    atoms overlap (energies of 1e18 kT, from which no tempering can start). log|det| =
    Σ (c_r + s_r X_r) + Σ [ln π + ln σ(a) + ln σ(−a)] (a = c_θ + s_θ X_θ)
    + Σ [ln 2 − ln(1 + (s_τ X_τ)²)] + Σ ln s + log_volume_element(r, θ) (Σ 2 ln r +
    Σ ln sin θ, the quotient by rigid motions).
    """

    def __init__(self, layout: MoleculeLayout, slow_dim: int) -> None:
        super().__init__()
        self.zmatrix = ZMatrix.from_layout(layout)
        n = layout.n_atoms
        slow = [self.zmatrix.rotation_entry(b, c) for _, b, c, _ in
                layout.slow_torsions[:slow_dim]]
        if len(set(slow)) != len(slow):
            raise ValueError(f"slow_torsions: {layout.slow_torsions[:slow_dim]!r} is not "
                             "allowed; two slow torsions turn about the same bond")
        other = [p for p in range(n - 3) if p not in slow]
        self.n_bonds, self.n_angles = n - 1, n - 2
        self.log_units = ((n - 1) * math.log(BOND_UNIT) + (n - 2) * math.log(ANGLE_UNIT)
                          + len(other) * math.log(TORSION_UNIT))
        self.register_buffer("slow_positions", torch.tensor(slow, dtype=torch.long))
        self.register_buffer("other_positions", torch.tensor(other, dtype=torch.long))
        # Until fit_to_structure: 0.12 nm bonds, 1.9 rad angles, torsions at 0.
        for name, value, size in (("bond_centre", math.log(BOND_START), n - 1),
                                  ("angle_centre", _logit(ANGLE_START / math.pi), n - 2),
                                  ("torsion_centre", 0.0, len(other))):
            self.register_buffer(name, torch.full((size,), value, dtype=torch.float64))

    def fit_to_structure(self, x0: torch.Tensor) -> None:
        """Centres from one structure x0 (n, 3) nm: c_r = ln r, c_θ = logit(θ/π), c_τ = τ."""
        with torch.no_grad():
            bonds, angles, torsions = self.zmatrix.to_internal(x0)
            self.bond_centre.copy_(torch.log(bonds))
            self.angle_centre.copy_(_logit(angles / math.pi))
            self.torsion_centre.copy_(torsions.index_select(-1, self.other_positions))

    def forward(self, z: torch.Tensor, fast: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nb, na = self.n_bonds, self.n_angles
        log_r = self.bond_centre + BOND_UNIT * fast[..., :nb]
        a = self.angle_centre + ANGLE_UNIT * fast[..., nb : nb + na]
        x_tau = TORSION_UNIT * fast[..., nb + na :]
        bonds, angles = torch.exp(log_r), math.pi * torch.sigmoid(a)
        torsions = z.new_zeros((*z.shape[:-1], self.zmatrix.n_torsions))
        torsions = torsions.index_copy(-1, self.slow_positions, z)
        torsions = torsions.index_copy(-1, self.other_positions,
                                       wrap_angle(self.torsion_centre + 2.0 * torch.atan(x_tau)))
        log_det = (log_r.sum(-1) + _log_angle_derivative(a).sum(-1)
                   + (math.log(2.0) - torch.log1p(x_tau**2)).sum(-1)
                   + log_volume_element(bonds, angles) + self.log_units)
        return self.zmatrix.to_cartesian(bonds, angles, torsions).flatten(-2), log_det

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.zmatrix.n_atoms
        bonds, angles, torsions = self.zmatrix.to_internal(x.reshape(*x.shape[:-1], n, 3))
        log_r = torch.log(bonds)
        a = torch.log(angles) - torch.log(math.pi - angles)  # logit(θ / π)
        x_tau = torch.tan(0.5 * wrap_angle(torsions.index_select(-1, self.other_positions)
                                           - self.torsion_centre))
        fast = torch.cat([(log_r - self.bond_centre) / BOND_UNIT,
                          (a - self.angle_centre) / ANGLE_UNIT, x_tau / TORSION_UNIT], -1)
        log_det = -(log_r.sum(-1) + _log_angle_derivative(a).sum(-1)
                    + (math.log(2.0) - torch.log1p(x_tau**2)).sum(-1)
                    + log_volume_element(bonds, angles) + self.log_units)
        return torsions.index_select(-1, self.slow_positions), fast, log_det


BOND_START, ANGLE_START = 0.12, 1.9  # nm, rad: the centres before fit_to_structure
BOND_UNIT, ANGLE_UNIT, TORSION_UNIT = 0.03, 0.1, 0.15  # s_r, s_θ, s_τ (class docstring)


def _logit(p: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(p, torch.Tensor):
        return torch.log(p) - torch.log1p(-p)
    return math.log(p) - math.log1p(-p)


def _log_angle_derivative(a: torch.Tensor) -> torch.Tensor:
    """ln dθ/da of θ = π σ(a): ln π + ln σ(a) + ln σ(−a)."""
    return math.log(math.pi) + F.logsigmoid(a) + F.logsigmoid(-a)


class CoarseGrainedFlow(Flow):
    """The coarse-grained latent model (module docstring) for a system that declares slow
    variables: a vector whose first ``slow_dim`` coordinates they are
    (:class:`boltzgen.layouts.VectorLayout`), or a molecule with ``slow_torsions``
    (:class:`boltzgen.layouts.MoleculeLayout`: a peptide's φ and ψ).

    On a molecule the slow variables are torsions: their base is uniform on [−π, π)^k (the
    prior ``slow_fast`` with B = π), their spline layers circular (conditioned on cos and sin),
    the fast variables' μ, ln σ an MLP of cos z, sin z, and the bijection the internal-coordinate
    map of :class:`_InternalCoordinateMap` instead of W: latent (k + 3n − 6 − k = 3n − 6
    numbers, the model's own prior) -> x (3n, nm, the canonical frame of the Z-matrix). Its
    densities are on the quotient of R^{3n} by rigid motions, as those of the
    ``internal_coordinates`` flow (:mod:`boltzgen.flows.internal`). Its centres come from
    the molecule's own structure (:meth:`fit_to_structure`, called by training with the
    system's minimised structure; no data). A fast torsion is unimodal about its centre: of
    a methyl's three rotamers, which the relabelling of its identical hydrogens maps onto each
    other, the model covers one, so its −ln Z misses ln 3 per methyl while every observable
    that does not tell those hydrogens apart (φ, ψ, energies) is unaffected.

    Args:
        layout: the system's layout.
        slow_dim: k, the number of slow variables modelled (the first k declared); default
            and maximum: the system's declared number.
        n_layers: spline layers of the slow density, >= 1.
        hidden, n_hidden_layers: width and depth of the MLPs (slow conditioners and the fast
            variables' μ, ln σ).
        n_bins: spline bins, 2 .. 999.
        bound: B, half-width of a vector's slow variables' box (their units: the system's
            coordinates, before W), > 0; default 4. Not for a molecule (its torsions' box is
            [−π, π)).
        fast_linear: a molecule only: a learnable linear map X' = W_f X + b_f (W_f = L U as
            W, identity at the start) of the fast variables before the internal-coordinate
            map, so that they are a correlated Gaussian given z (bond lengths and angles of one
            centre move together), where without it each is independent given z; log|det|
            gains Σ s_f. A vector's W already does this.
    """

    accepts: ClassVar[tuple[str, ...]] = ("vector", "molecule")
    layout_requirement: ClassVar[str] = ("needs a system that declares slow variables "
                                         "(double_well, gaussian_mixture, peptide)")
    owns_prior: ClassVar[bool] = True

    @classmethod
    def accepts_layout(cls, layout: Layout) -> bool:
        if isinstance(layout, MoleculeLayout):
            return (bool(layout.slow_torsions) and layout.n_atoms >= 4
                    and connected(layout.n_atoms, layout.bonds))
        return isinstance(layout, VectorLayout) and layout.slow_dim is not None

    def __init__(self, layout: Layout | int, slow_dim: int | None = None, n_layers: int = 4,
                 hidden: int = 64, n_hidden_layers: int = 2, n_bins: int = 8,
                 bound: float | None = None, fast_linear: bool = False) -> None:
        layout = as_layout(layout)
        super().__init__(layout)
        molecule = isinstance(layout, MoleculeLayout)
        declared = (len(layout.slow_torsions) if isinstance(layout, MoleculeLayout)
                    else layout.slow_dim)
        assert declared is not None
        k = declared if slow_dim is None else check_int("slow_dim", slow_dim, minimum=1)
        if k > declared:
            raise ValueError(f"slow_dim: {slow_dim!r} is not allowed; the system declares "
                             f"{declared} slow variable(s), so 1 .. {declared}")
        n_layers = check_int("n_layers", n_layers, minimum=1)
        hidden = check_int("hidden", hidden, minimum=1)
        n_hidden_layers = check_int("n_hidden_layers", n_hidden_layers, minimum=1)
        n_bins = check_int("n_bins", n_bins, minimum=2)
        if n_bins > MAX_BINS:
            raise ValueError(f"n_bins: {n_bins!r} is not allowed; must be <= {MAX_BINS}")
        if not isinstance(fast_linear, bool):
            raise ValueError(f"fast_linear: {fast_linear!r} is not allowed; true or false")
        if fast_linear and not molecule:
            raise ValueError("fast_linear: True is not allowed for a vector; its linear map W "
                             "already mixes the fast variables (leave fast_linear out)")
        if molecule and bound is not None:
            raise ValueError(f"bound: {bound!r} is not allowed for a molecule; its slow "
                             "variables are torsions on [-pi, pi) (leave bound out)")
        bound = math.pi if molecule else check_float("bound", 4.0 if bound is None else bound,
                                                     positive=True)
        latent = layout.dim - 6 if molecule else layout.dim
        self.slow_dim, self.fast_dim, self.molecule = k, latent - k, molecule
        self.prior = SlowFastPrior(layout, k, bound)  # on 3n − 6 numbers for a molecule
        self.slow = nn.ModuleList(_SlowSpline(k, layer, hidden, n_hidden_layers, n_bins, bound,
                                              circular=molecule)
                                  for layer in range(n_layers))
        self.fast = conditioner_mlp(2 * k if molecule else k, 2 * self.fast_dim, hidden,
                                    n_hidden_layers)
        self.bijection: nn.Module = (_InternalCoordinateMap(layout, k) if isinstance(
            layout, MoleculeLayout) else _LinearBijection(self.dim, k))
        self.fast_linear = _LinearBijection(self.fast_dim, 0) if fast_linear else None

    @property
    def latent_dim(self) -> int:
        """The layout's dim, or 3n − 6 for a molecule."""
        return self.slow_dim + self.fast_dim

    def fit_to_structure(self, x0: torch.Tensor) -> None:
        """A molecule's internal-coordinate centres from its structure x0 (dim,) nm (the
        system's minimised structure); nothing for a vector."""
        if isinstance(self.bijection, _InternalCoordinateMap):
            self.bijection.fit_to_structure(x0.reshape(-1, 3).to(self.bijection.bond_centre))

    def slow_log_density(self, y: torch.Tensor) -> torch.Tensor:
        """log q_slow(z) = log p_u(S⁻¹ z) + Σ_layers ln|(S⁻¹)'| of the slow splines at the slow
        variables z of ``y`` (the bijection's inverse, without gradient). The splines map the
        box (or torus) onto itself, so fitting this density by the reweighted forward KL
        moves probability between modes and cannot shrink the model's support (fitting the
        whole log q to the model's own samples would: maximum likelihood narrows a bounded
        support to the samples' range, step after step)."""
        self._check_euclidean_input("y", y, self.dim)
        with torch.no_grad():
            z = self.bijection.inverse(y)[0]
        log_density = z.new_full(z.shape[:-1], -self.slow_dim * math.log(2.0 * self.prior.bound))
        for layer in reversed(self.slow):
            z, ld = layer(z, inverse=True)
            log_density = log_density + ld
        return log_density

    def _fast_parameters(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fast(_circle_features(z) if self.molecule else z)
        return out[..., : self.fast_dim], out[..., self.fast_dim :]

    def _run(self, x: torch.Tensor, name: str, inverse: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_euclidean_input(name, x, self.dim if inverse else self.latent_dim)
        k = self.slow_dim
        if inverse:
            z, fast, logdet = self.bijection.inverse(x)
            if self.fast_linear is not None:
                _, fast, ld = self.fast_linear.inverse(fast)
                logdet = logdet + ld
            mean, log_scale = self._fast_parameters(z)
            eps = (fast - mean) * torch.exp(-log_scale)
            logdet = logdet - log_scale.sum(-1)
            for layer in reversed(self.slow):
                z, ld = layer(z, inverse=True)
                logdet = logdet + ld
            return torch.cat([z, eps], -1), logdet
        z, eps = x[..., :k], x[..., k:]
        if self.molecule:
            z = wrap_angle(z)
        logdet = x.new_zeros(x.shape[:-1])
        for layer in self.slow:
            z, ld = layer(z, inverse=False)
            logdet = logdet + ld
        mean, log_scale = self._fast_parameters(z)
        fast = mean + torch.exp(log_scale) * eps
        logdet = logdet + log_scale.sum(-1)
        if self.fast_linear is not None:
            fast, ld = self.fast_linear(fast[..., :0], fast)
            logdet = logdet + ld
        y, ld = self.bijection(z, fast)
        return y, logdet + ld
