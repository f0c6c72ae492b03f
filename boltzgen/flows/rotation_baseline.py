"""Baseline that ignores the double cover: a spline coupling flow on Rodrigues coordinates.

Each orientation is written as the Rodrigues vector r = v / w of its canonical quaternion
(w >= 0), r = tan(ω/2) n, which charts SO(3) minus the rotations by π (a null set) onto R³;
then z = asinh(r) elementwise tames the heavy tails. A rational-quadratic spline coupling flow
(:class:`boltzgen.flows.spline.SplineCouplingFlow`) acts on the 3N numbers z. The chart is cut
where w = 0, which is exactly the identification q ~ −q the S³ flows respect: densities near
rotations by π are torn apart, which is the cost this baseline measures.

Exact change of measure to normalized Haar measure. In Rodrigues coordinates Haar is
dμ = (1/π²)(1 + |r|²)⁻² d³r, so in z its density is

    ρ(z) = (1/π²)(1 + |r|²)⁻² Π_a cosh z_a,   r = sinh z,

and for the map z -> z' = F(z) the Jacobian with respect to Haar (the log-det this flow
reports, comparable with the S³ flows' log-dets under the normalized measures) is

    log|det J| = log|det F'(z)| + log ρ(z') − log ρ(z),   summed over bodies.

Outputs are canonical quaternions, so ``inverse(forward(q))`` is q up to sign.
"""

from __future__ import annotations

import math

import torch

from boltzgen.flows.contract import Flow
from boltzgen.flows.spline import SplineCouplingFlow
from boltzgen.rigid.bodies import RigidLayout
from boltzgen.rigid.quaternions import canonical, check_unit_quaternion

__all__ = ["RotationVectorSplineFlow", "haar_log_density_z"]


def quaternion_to_z(q: torch.Tensor) -> torch.Tensor:
    q = canonical(q)
    return torch.asinh(q[..., 1:] / q[..., :1])


def z_to_quaternion(z: torch.Tensor) -> torch.Tensor:
    r = torch.sinh(z)
    q = torch.cat([torch.ones_like(r[..., :1]), r], dim=-1)
    return q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)


def haar_log_density_z(z: torch.Tensor) -> torch.Tensor:
    """log ρ(z) of normalized Haar measure in z = asinh(Rodrigues), (..., 3) -> (...)."""
    r2 = (torch.sinh(z) ** 2).sum(-1)
    log_cosh = (z.abs() + torch.log1p(torch.exp(-2.0 * z.abs())) - math.log(2.0)).sum(-1)
    return -2.0 * math.log(math.pi) - 2.0 * torch.log1p(r2) + log_cosh


class RotationVectorSplineFlow(Flow):
    """Spline coupling flow on z = asinh(Rodrigues vector) of every body (no positions)."""

    accepts = ("rigid_bodies",)
    layout_requirement = "needs a rigid-body system"

    def __init__(self, layout: RigidLayout, n_layers: int = 6, hidden: int = 64,
                 n_hidden_layers: int = 2, n_bins: int = 8, tail_bound: float = 6.0) -> None:
        super().__init__(layout)
        if layout.has_positions or layout.pinned_orientations:
            raise ValueError("layout: the rotation-vector baseline handles free orientations "
                             "only (no box, no pinned orientations)")
        self.spline = SplineCouplingFlow(3 * layout.n_bodies, n_layers, hidden, n_hidden_layers,
                                         n_bins, tail_bound)

    def _run(self, x: torch.Tensor, name: str, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float64:
            raise TypeError(f"{name}: expected a float64 torch.Tensor")
        _, q = self.layout.split(x)
        check_unit_quaternion(q, f"{name} (quaternions)")
        z = quaternion_to_z(q)
        flat = z.reshape(*z.shape[:-2], -1)
        out, log_det = (self.spline.inverse if inverse else self.spline)(flat)
        z_out = out.reshape(z.shape)
        log_det = log_det + (haar_log_density_z(z_out) - haar_log_density_z(z)).sum(-1)
        return self.layout.join(None, z_to_quaternion(z_out)), log_det
