"""A classic Boltzmann generator for molecules: a coupling flow on internal coordinates.

Noé, Olsson, Köhler, Wu, "Boltzmann generators", Science 365 (2019) eaaw1147; the torsions on a
torus with circular splines as in Rezende et al. (ICML 2020) and Köhler et al. (2021). The
Z-matrix, the canonical frame and the volume element are those of
:mod:`boltzgen.internal_coordinates`.

Latent z (3n − 6, the flow's own prior :class:`boltzgen.priors.InternalCoordinatePrior`):

    z = (u_bonds (n − 1), u_angles (n − 2), τ' (n − 3)),   u ~ N(0, I),  τ' ~ U[−π, π)^{n−3}.

Forward, z -> x: ``n_layers`` blocks of couplings (below), then the bonds and angles are
denormalised, r = μ_r + σ_r v_r (nm), θ = μ_θ + σ_θ v_θ (rad), every torsion goes through a
fixed Möbius map of the circle that concentrates it about its data's circular mean μ_τ,
τ = M_{−ω}(τ_c) with ω = ρ e^{iμ_τ} (:func:`boltzgen.flows.circle.circle_mobius`; the uniform
distribution becomes a wrapped Cauchy of centre μ_τ and ρ = e^{−σ_c}, σ_c the data's circular
standard deviation), and the internal coordinates go to Cartesian coordinates in the canonical
frame (nm, flattened x[3 i + a], atom order of the layout). So

    log|det J(z)| = Σ coupling log-dets + Σ ln σ_r + Σ ln σ_θ + Σ ln M'_{−ω}(τ_c)
                    + Σ 2 ln r + Σ ln sin θ,

Why the Möbius maps: most torsions of a molecule are narrow (an sp2 centre's sibling at
180° ± 0.1 rad, a peptide bond's ω, the 2nd and 3rd hydrogens of a methyl at ±120°), and a
circular spline of a few bins on [0, 2π) fits a peak 0.1 rad wide poorly; after the map the
couplings see them spread over the circle. Broad torsions (a methyl's rotation, R ≈ 0) get
ρ ≈ 0, nearly the identity.

the last two the log volume element of the quotient of R^{3n} by rigid motions. A block:

1. the torsions in one half (the complement of :func:`boltzgen.flows.base.conditioning_indices`
   of the block) through circular rational-quadratic splines (:func:`circular_spline`), their
   parameters an MLP of cos τ', sin τ' of the other half and of v (the normalised bonds and
   angles); then the other half the same way, conditioned on the first;
2. half of v through rational-quadratic splines on [−B, B] (B = 5, identity outside;
   :func:`rational_quadratic_spline`) conditioned on the other half of v and cos, sin of every
   torsion; then the other half.

Every conditioner's last layer is zero-initialised: the flow starts as z -> (μ + σ u, τ'),
bonds and angles independent normals around μ, torsions uniform.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from boltzgen._checks import check_int
from boltzgen.flows.base import check_stack_args, conditioner_mlp, conditioning_indices
from boltzgen.flows.circle import circle_mobius, circular_spline, circular_spline_parameter_count
from boltzgen.flows.contract import Flow
from boltzgen.flows.spline import MAX_BINS, MIN_BIN_WIDTH, rational_quadratic_spline
from boltzgen.internal_coordinates import (
    ZMatrix,
    connected,
    log_volume_element,
    valid_internal,
    wrap_angle,
)
from boltzgen.layouts import Layout, MoleculeLayout, as_layout
from boltzgen.priors import InternalCoordinatePrior

__all__ = ["InternalCoordinateFlow"]

TAIL_BOUND = 5.0  # the bond/angle splines act on [−5, 5] in units of σ
BOND_MEAN, BOND_STD = 0.12, 0.01  # nm, before fit_to_data
ANGLE_MEAN, ANGLE_STD = 1.9, 0.1  # rad, before fit_to_data
BOND_STD_FLOOR, ANGLE_STD_FLOOR = 1e-4, 1e-3  # nm, rad: the least σ fit_to_data sets
TORSION_CONCENTRATION_MAX = 0.999  # ρ of the torsions' Möbius maps: a circular std >= 1e-3 rad


def _features(torsions: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cos(torsions), torch.sin(torsions)], dim=-1)


class _Coupling(nn.Module):
    """Coordinates ``trans`` of one group (torsions or v) transformed, conditioned on the
    group's ``cond`` coordinates and on the other group (whole)."""

    def __init__(self, trans: list[int], cond: list[int], n_other: int, torsions: bool,
                 hidden: int, n_hidden_layers: int, n_bins: int) -> None:
        super().__init__()
        self.torsions = torsions
        self.register_buffer("trans", torch.tensor(trans, dtype=torch.long))
        self.register_buffer("cond", torch.tensor(cond, dtype=torch.long))
        self.n_bins = n_bins
        self.n_params = circular_spline_parameter_count(n_bins) if torsions else 3 * n_bins - 1
        n_in = (2 * len(cond) + n_other) if torsions else (len(cond) + 2 * n_other)
        self.net = conditioner_mlp(n_in, len(trans) * self.n_params, hidden, n_hidden_layers)

    def forward(self, own: torch.Tensor, other: torch.Tensor, inverse: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(own with ``trans`` transformed, log|det| of that direction)."""
        cond = own.index_select(-1, self.cond)
        features = (torch.cat([_features(cond), other], -1) if self.torsions
                    else torch.cat([cond, _features(other)], -1))
        params = self.net(features).reshape(*own.shape[:-1], len(self.trans), self.n_params)
        values = own.index_select(-1, self.trans)
        if self.torsions:  # circular_spline works on [0, 2π)
            out, log_derivative = circular_spline(values + math.pi, params, inverse)
            out = wrap_angle(out - math.pi)
        else:
            k = self.n_bins
            out, log_derivative = rational_quadratic_spline(
                values, params[..., :k], params[..., k : 2 * k], params[..., 2 * k :],
                inverse=inverse, tail_bound=TAIL_BOUND)
        return own.index_copy(-1, self.trans, out), log_derivative.sum(-1)


class InternalCoordinateFlow(Flow):
    """Coupling flow from the internal-coordinate prior to a molecule's Cartesian coordinates.

    Densities: ``log_prob(x)`` and the log q of ``sample_and_log_prob`` are in nats, of x in
    Cartesian nm, with respect to the quotient measure dμ of R^{3n} by rigid motions
    (dx^{3n} = dT dR dμ, :mod:`boltzgen.internal_coordinates`): q is a normalized density of
    the conformation, the same for every position and orientation of x. As a density on
    R^{3n} it would be q / (8π² V) for a box of volume V (nm³) and the Haar measure of SO(3)
    of mass 8π²; that constant of the external degrees of freedom is left out.

    ``forward(z)`` returns x in the canonical frame; ``inverse(x)`` takes x in any position and
    orientation and returns (z, −log|det J(z)|). Torsions enter modulo 2π. Chirality is not
    handled: a mirror image has its own density (the system decides what to do with D forms).

    Invalid samples: bonds and angles are denormalised affinely, so a latent far in the
    normal's tails (|u| beyond ~10 σ with fitted scales) can give r <= 0 or θ outside (0, π).
    The construction would still place the atom, at a point whose own internal coordinates
    are others (|r|, π − θ, …), so no density of that x comes out of this z. ``forward``
    returns such an x with log|det| = NaN: log q and any importance weight of the sample are
    then NaN, i.e. weight zero, counted in N (docs/architecture.md, Conventions), which is
    exact for the pushforward restricted to valid samples: q gives the invalid region mass
    p_invalid, and E_q[1_valid e^{-u}/q] = Z still. :meth:`valid` tells which latents are
    valid; ``inverse`` of a Cartesian x always is.

    Args:
        layout: a :class:`boltzgen.layouts.MoleculeLayout` of >= 3 atoms whose ``bonds``
            connect them all (elements, where given, put heavy atoms first in the Z-matrix).
        n_layers: coupling blocks (each: two torsion couplings, two bond/angle couplings), >= 1.
        hidden: width of the conditioner MLPs, >= 1.
        n_hidden_layers: hidden layers per conditioner (SiLU), >= 1.
        n_bins: spline bins, 2 .. 999.

    Buffers (in the state_dict): ``bond_mean``, ``bond_std`` (n − 1, nm), ``angle_mean``,
    ``angle_std`` (n − 2, rad): 0.12 ± 0.01 nm and 1.9 ± 0.1 rad until :meth:`fit_to_data`;
    ``torsion_mean``, ``torsion_concentration`` (n − 3; rad, ρ in [0, 0.999]): 0 and 0 (the
    identity) until :meth:`fit_to_data`. A state saved before the torsion maps existed loads
    with the identity.
    """

    accepts = ("molecule",)
    layout_requirement = ("needs a molecule of >= 3 atoms whose bonds connect them all (its "
                          "Z-matrix comes from the bond graph)")
    owns_prior: ClassVar[bool] = True

    def __init__(self, layout: Layout | int, n_layers: int = 4, hidden: int = 64,
                 n_hidden_layers: int = 2, n_bins: int = 8) -> None:
        layout = as_layout(layout)
        _, n_layers, hidden, n_hidden_layers = check_stack_args(layout, n_layers, hidden,
                                                                n_hidden_layers)
        n_bins = check_int("n_bins", n_bins, minimum=2)
        if n_bins > MAX_BINS:
            raise ValueError(f"n_bins: {n_bins!r} is not allowed; must be an integer <= "
                             f"{MAX_BINS} (minimum bin width {MIN_BIN_WIDTH} of the interval)")
        super().__init__(layout)
        assert isinstance(self.layout, MoleculeLayout)
        self.zmatrix = ZMatrix.from_layout(self.layout)
        n = self.layout.n_atoms
        self.n_bonds, self.n_angles, self.n_torsions = n - 1, n - 2, n - 3
        self.n_normal = self.n_bonds + self.n_angles
        self.prior = InternalCoordinatePrior(self.layout)
        self.n_layers, self.n_bins = n_layers, n_bins
        for name, value, size in (("bond_mean", BOND_MEAN, self.n_bonds),
                                  ("bond_std", BOND_STD, self.n_bonds),
                                  ("angle_mean", ANGLE_MEAN, self.n_angles),
                                  ("angle_std", ANGLE_STD, self.n_angles),
                                  ("torsion_mean", 0.0, self.n_torsions),
                                  ("torsion_concentration", 0.0, self.n_torsions)):
            self.register_buffer(name, torch.full((size,), value, dtype=torch.float64))
        couplings: list[_Coupling] = []
        for layer in range(n_layers):
            for group, size, other in ((True, self.n_torsions, self.n_normal),
                                       (False, self.n_normal, self.n_torsions)):
                first = conditioning_indices(size, layer) if size > 1 else []
                rest = [i for i in range(size) if i not in first]
                for trans, cond in ((rest, first), (first, rest)):
                    if trans:
                        couplings.append(_Coupling(trans, cond, other, group, hidden,
                                                   n_hidden_layers, n_bins))
        self.couplings = nn.ModuleList(couplings)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object,
                              **kwargs: object) -> None:
        for name in ("torsion_mean", "torsion_concentration"):  # saved before they existed
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def accepts_layout(cls, layout: Layout) -> bool:
        return (isinstance(layout, MoleculeLayout) and layout.n_atoms >= 3
                and connected(layout.n_atoms, layout.bonds))

    @property
    def latent_dim(self) -> int:
        """3n − 6."""
        return self.zmatrix.dim

    # -- normalisation ------------------------------------------------------------------------
    def _scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.bond_mean, self.angle_mean]),
                torch.cat([self.bond_std, self.angle_std]))

    def fit_to_data(self, y: torch.Tensor) -> None:
        """μ, σ of every bond and angle from target samples y (M, 3n) nm: means and standard
        deviations (divisor M) over the samples, σ at least 1e-4 nm (bonds), 1e-3 rad
        (angles), e.g. for bonds a constrained MD kept fixed. Every torsion's Möbius map: μ_τ
        the circular mean, ρ = exp(−σ_c) with σ_c = sqrt(−2 ln R), R the mean resultant length
        |mean e^{iτ}| (at most 0.999)."""
        y = self._checked("y", y, self.dim)
        if y.ndim != 2 or len(y) == 0:
            raise ValueError(f"y: shape {tuple(y.shape)} is not allowed; need (M, {self.dim}) "
                             "with M >= 1")
        with torch.no_grad():
            bonds, angles, torsions = self.zmatrix.to_internal(self._cartesian(y))
            for values, mean, std, floor in ((bonds, self.bond_mean, self.bond_std,
                                              BOND_STD_FLOOR),
                                             (angles, self.angle_mean, self.angle_std,
                                              ANGLE_STD_FLOOR)):
                mean.copy_(values.mean(0))
                std.copy_(values.std(0, correction=0).clamp(min=floor))
            resultant = torch.stack([torch.cos(torsions).mean(0), torch.sin(torsions).mean(0)])
            length = torch.linalg.vector_norm(resultant, dim=0).clamp(1e-12, 1.0)
            self.torsion_mean.copy_(torch.atan2(resultant[1], resultant[0]))
            circular_std = torch.sqrt(-2.0 * torch.log(length))
            self.torsion_concentration.copy_(
                torch.exp(-circular_std).clamp(max=TORSION_CONCENTRATION_MAX))

    # -- the map --------------------------------------------------------------------------------
    def _checked(self, name: str, x: torch.Tensor, size: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x)}")
        if x.ndim < 1 or x.shape[-1] != size:
            raise ValueError(f"{name}: shape {tuple(x.shape)} is not allowed; need (..., {size})")
        if x.dtype != torch.float64:
            raise TypeError(f"{name}: dtype {x.dtype} is not allowed; the flow is float64")
        return x

    def _cartesian(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(*y.shape[:-1], self.zmatrix.n_atoms, 3)

    def _concentrate(self, torsions: torch.Tensor, inverse: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed Möbius map of every torsion, coupling side -> data side (``inverse``: back):
        τ = M_{−ω}(τ_c) with ω = ρ e^{iμ} (:func:`boltzgen.flows.circle.circle_mobius`); returns
        (torsions, log|det| of that direction)."""
        omega = torch.stack([self.torsion_concentration * torch.cos(self.torsion_mean),
                             self.torsion_concentration * torch.sin(self.torsion_mean)], -1)
        out, log_derivative = circle_mobius(torsions, omega, inverse=not inverse)
        return wrap_angle(out), log_derivative.sum(-1)

    def _couple(self, v: torch.Tensor, torsions: torch.Tensor, inverse: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_det = v.new_zeros(v.shape[:-1])
        for coupling in (reversed(self.couplings) if inverse else self.couplings):
            if coupling.torsions:
                torsions, ld = coupling(torsions, v, inverse)
            else:
                v, ld = coupling(v, torsions, inverse)
            log_det = log_det + ld
        return v, torsions, log_det

    def _internal(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
        """Latent (..., 3n − 6) -> (bonds, angles, torsions, log-det of the couplings and the
        denormalisation)."""
        v, torsions, log_det = self._couple(z[..., : self.n_normal],
                                            wrap_angle(z[..., self.n_normal :]), inverse=False)
        torsions, log_concentrate = self._concentrate(torsions, inverse=False)
        mean, std = self._scales()
        ic = mean + std * v
        return (ic[..., : self.n_bonds], ic[..., self.n_bonds :], torsions,
                log_det + log_concentrate + torch.log(std).sum())

    def valid(self, z: torch.Tensor) -> torch.Tensor:
        """Whether ``forward`` maps each latent (..., 3n − 6) to bonds > 0 and angles in
        (0, π), i.e. to an x with a density (class docstring); (...) bool."""
        bonds, angles, _, _ = self._internal(self._checked("z", z, self.latent_dim))
        return valid_internal(bonds, angles)

    def _run(self, x: torch.Tensor, name: str, inverse: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if inverse:
            ic = self.zmatrix.to_internal(self._cartesian(self._checked(name, x, self.dim)))
            bonds, angles, torsions = ic
            mean, std = self._scales()
            v = (torch.cat([bonds, angles], -1) - mean) / std
            torsions, log_spread = self._concentrate(torsions, inverse=True)
            v, torsions, log_det = self._couple(v, torsions, inverse=True)
            log_det = (log_det + log_spread - torch.log(std).sum()
                       - log_volume_element(bonds, angles))
            return torch.cat([v, torsions], -1), log_det
        bonds, angles, torsions, log_det = self._internal(self._checked(name, x, self.latent_dim))
        valid = valid_internal(bonds, angles)
        # Finite stand-ins where invalid, so that no inf/NaN reaches a gradient through where.
        log_volume = log_volume_element(torch.where(valid[..., None], bonds, 1.0),
                                        torch.where(valid[..., None], angles, 0.5 * math.pi))
        log_det = torch.where(valid, log_det + log_volume, math.nan)
        y = self.zmatrix.to_cartesian(bonds, angles, torsions)
        return y.flatten(-2), log_det
