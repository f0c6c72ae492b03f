"""Unit quaternions as orientations: conversions, products, uniform sampling, tangent bases.

Convention: q = (w, x, y, z), scalar first, Hamilton product, active rotations. A unit
quaternion q = (cos(ω/2), sin(ω/2) n) rotates vectors by the angle ω about the unit axis n:

    R(q) v = q ⊗ (0, v) ⊗ q*.

q and −q give the same rotation: S³ covers SO(3) twice (the double cover). A density p on S³
(with respect to the surface measure) that is flip-symmetric, p(q) = p(−q), is a density on
SO(3). Factor convention used throughout this project: both S³ and SO(3) carry their
*normalized* measures (total mass 1; uniform on S³ is then the density 1, and so is Haar on
SO(3)), and under these measures a flip-symmetric density on S³ *equals* the density of the
corresponding rotation on SO(3) with respect to normalized Haar measure. (With the raw surface
measure of S³, area 2π², the SO(3) density would be 2π² times the S³ density.)

Every function is batched over leading dimensions and works in float32 and float64.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "UNIT_NORM_TOLERANCE",
    "canonical",
    "check_unit_quaternion",
    "conjugate",
    "matrix_to_quaternion",
    "multiply",
    "quaternion_to_matrix",
    "random_unit_quaternions",
    "rotation_angle_between",
    "tangent_basis",
]

UNIT_NORM_TOLERANCE = 1e-5
"""Largest allowed | |q| − 1 | of a quaternion handed in as a unit quaternion."""


def check_unit_quaternion(q: torch.Tensor, name: str = "q",
                          tolerance: float = UNIT_NORM_TOLERANCE) -> torch.Tensor:
    """``q`` if it is a finite tensor of unit quaternions (..., 4); else ValueError/TypeError.

    The message names the argument and shows the worst norm found.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (..., 4), got {type(q)}")
    if q.ndim < 1 or q.shape[-1] != 4:
        raise ValueError(f"{name}: shape {tuple(q.shape)} is not allowed; need (..., 4)")
    if not bool(torch.isfinite(q).all()):
        raise ValueError(f"{name}: contains non-finite values; unit quaternions must be finite")
    if q.numel():
        deviation = (torch.linalg.vector_norm(q, dim=-1) - 1.0).abs()
        worst = int(deviation.argmax())
        if float(deviation.detach().flatten()[worst]) > tolerance:
            norm = float(torch.linalg.vector_norm(q.detach().reshape(-1, 4)[worst]))
            raise ValueError(
                f"{name}: a quaternion has norm {norm:.8g}; unit norm is required "
                f"(| |q| - 1 | <= {tolerance:g})"
            )
    return q


def multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a ⊗ b of quaternions (..., 4), broadcasting."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        dim=-1,
    )


def conjugate(q: torch.Tensor) -> torch.Tensor:
    """q* = (w, −x, −y, −z); the inverse rotation for a unit quaternion."""
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) of quaternions (..., 4).

    Uses s = 2 / |q|², so a quaternion slightly off the unit sphere (rounding) still gives an
    orthogonal matrix to rounding precision; q and −q give the same matrix.
    """
    w, x, y, z = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)
    rows = (
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quaternion(matrix: torch.Tensor) -> torch.Tensor:
    """Canonical unit quaternions (..., 4) of rotation matrices (..., 3, 3).

    Shepperd's method: of the four algebraically equal formulas, each sample uses the one whose
    pivot (4w², 4x², 4y² or 4z², from the trace and the diagonal) is largest, so no division by a
    small number occurs in float32 or float64.
    """
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"matrix: shape {tuple(matrix.shape)} is not allowed; need (..., 3, 3)")
    m = matrix
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    pivots = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22),
        dim=-1,
    )
    d21, s21 = m[..., 2, 1] - m[..., 1, 2], m[..., 2, 1] + m[..., 1, 2]
    d02, s02 = m[..., 0, 2] - m[..., 2, 0], m[..., 0, 2] + m[..., 2, 0]
    d10, s10 = m[..., 1, 0] - m[..., 0, 1], m[..., 1, 0] + m[..., 0, 1]
    # Row k is 4 q_k times q, from the pivot component k (each row is exact for a rotation).
    candidates = torch.stack(
        (
            torch.stack((pivots[..., 0], d21, d02, d10), dim=-1),
            torch.stack((d21, pivots[..., 1], s10, s02), dim=-1),
            torch.stack((d02, s10, pivots[..., 2], s21), dim=-1),
            torch.stack((d10, s02, s21, pivots[..., 3]), dim=-1),
        ),
        dim=-2,
    )
    best = pivots.argmax(dim=-1)
    chosen = candidates.gather(-2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    return canonical(chosen / torch.linalg.vector_norm(chosen, dim=-1, keepdim=True))


def canonical(q: torch.Tensor) -> torch.Tensor:
    """The representative of ±q whose first non-zero component is positive (w >= 0 mostly)."""
    sign = torch.zeros_like(q[..., 0])
    for k in range(3, -1, -1):  # the first non-zero component decides
        component = q[..., k]
        sign = torch.where(component != 0, torch.sign(component), sign)
    return q * torch.where(sign == 0, torch.ones_like(sign), sign)[..., None]


def random_unit_quaternions(shape: tuple[int, ...] | int, generator: torch.Generator | None = None,
                            dtype: torch.dtype = torch.float64,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform samples on S³ (equivalently Haar-uniform rotations), shape (*shape, 4).

    A standard normal vector in R⁴ is rotation invariant, so its direction is uniform on S³.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    g = torch.randn((*shape, 4), generator=generator, dtype=dtype,
                    device=device if device is not None else
                    (generator.device if generator is not None else None))
    return g / torch.linalg.vector_norm(g, dim=-1, keepdim=True)


_UNIT_IMAGINARY = torch.tensor(
    [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
)


def tangent_basis(q: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (..., 4, 3) of the tangent space of S³ at unit q: columns q⊗i, q⊗j, q⊗k.

    Right multiplication by a unit quaternion is an isometry of R⁴, so the columns are
    orthonormal, and each is orthogonal to q because i, j, k are orthogonal to 1. Column a is the
    velocity of q under a body-frame rotation about axis a at half the angular rate, so the
    basis is smooth in q and flips sign with q.
    """
    units = _UNIT_IMAGINARY.to(dtype=q.dtype, device=q.device)
    return torch.stack([multiply(q, u) for u in units], dim=-1)


def rotation_angle_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle (rad, in [0, π]) of the rotation taking a to b: 2 arccos |a·b|; sign-blind."""
    dot = (a * b).sum(-1).abs().clamp(max=1.0)
    return 2.0 * torch.acos(dot)


HAAR_SO3_VOLUME_RAD3 = 8.0 * math.pi**2
"""Volume of SO(3) in the metric where a rotation by δ radians has length δ (for changes of
measure between Cartesian sites and (position, rotation))."""
