"""Bijections of the circle for periodic coordinates (one per coordinate: a torus).

Angles are in [0, 2π). Both maps return (angle', log|dθ'/dθ|) shaped like the angles.

**Möbius map** (Rezende et al., "Normalizing flows on tori and spheres", ICML 2020). With
z = e^{iθ} and a parameter ω in the open unit disk (as two real numbers),

    M(z) = (1 − |ω|²)/|z − ω|² · (z − ω) − ω = (z − ω)/(1 − ω̄ z),
    log|dθ'/dθ| = ln((1 − |ω|²)/|z − ω|²),

and M⁻¹ is the same map with −ω. ω = 0 is the identity.

**Circular rational-quadratic spline** (Rezende et al. 2020; Durkan et al. 2019): the RQ spline
of :mod:`boltzgen.flows.spline` on [−π, π] (θ − π) with one learnable slope shared by both ends,
so the map is C¹ across the identified ends, followed by a rotation θ' -> θ' + δ (mod 2π).
Parameters per angle: K widths, K heights, K − 1 interior slopes, 1 end slope, 1 shift.
"""

from __future__ import annotations

import math

import torch

from boltzgen.flows.spline import rational_quadratic_spline

__all__ = ["circle_mobius", "circular_spline", "circular_spline_parameter_count"]

TWO_PI = 2.0 * math.pi


def circle_mobius(angle: torch.Tensor, omega: torch.Tensor, inverse: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Möbius map of angles (...) with ω (..., 2), |ω| < 1; returns (angle', log-derivative)."""
    radius = torch.linalg.vector_norm(omega.detach(), dim=-1)
    if radius.numel() and (not bool(torch.isfinite(radius).all()) or float(radius.max()) >= 1):
        raise ValueError(f"omega: a Möbius parameter |omega| of {float(radius.max()):.6g} is not "
                         "allowed; it must be finite and strictly inside the unit disk (< 1)")
    w = -omega if inverse else omega
    z = torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1)
    diff = z - w
    dist2 = (diff * diff).sum(-1)
    scale = (1.0 - (w * w).sum(-1)) / dist2
    image = scale[..., None] * diff - w
    out = torch.remainder(torch.atan2(image[..., 1], image[..., 0]), TWO_PI)
    return out, torch.log(scale)


def circular_spline_parameter_count(n_bins: int) -> int:
    return 3 * n_bins + 1


def circular_spline(angle: torch.Tensor, params: torch.Tensor, inverse: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Circular RQ spline of angles (...) with unnormalized parameters (..., 3K + 1).

    Layout of ``params``: widths (K), heights (K), interior slopes (K − 1), end slope (1),
    shift (1). All zeros is the identity.
    """
    k = (params.shape[-1] - 1) // 3
    widths, heights = params[..., :k], params[..., k : 2 * k]
    slopes, end_slope, shift = params[..., 2 * k : 3 * k - 1], params[..., 3 * k - 1 : 3 * k], \
        params[..., 3 * k]
    if inverse:
        angle = torch.remainder(angle - shift, TWO_PI)
    out, log_derivative = rational_quadratic_spline(
        angle - math.pi, widths, heights, slopes, inverse=inverse, tail_bound=math.pi,
        unnormalized_boundary_derivative=end_slope)
    out = out + math.pi
    if not inverse:
        out = out + shift
    return torch.remainder(out, TWO_PI), log_derivative
