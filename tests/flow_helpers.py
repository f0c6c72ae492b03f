"""Test inputs shared by the flow conformance suite and the rigid-layer suite (float64)."""

from __future__ import annotations

import math

import torch

from boltzgen.internal_coordinates import ZMatrix
from boltzgen.layouts import MoleculeLayout
from boltzgen.rigid.bodies import PeriodicBox, RigidLayout
from boltzgen.rigid.quaternions import random_unit_quaternions

# Small Euclidean flows. The spline's tail bound (3) is close to the scale of the test points
# (1.5 N(0, 1)) so that a few per cent of them lie in the linear tails of every coupling.
SMALL = {
    "affine_coupling": {"n_layers": 4, "hidden": 16, "n_hidden_layers": 2, "scale_clamp": 2.0},
    "spline_coupling": {"n_layers": 4, "hidden": 16, "n_hidden_layers": 2, "n_bins": 6,
                        "tail_bound": 3.0},
    "coarse_grained": {"n_layers": 2, "hidden": 8, "n_hidden_layers": 2, "n_bins": 5,
                       "bound": 3.0},
}
# Standard deviation of the random parameters. The spline's conditioner outputs go through a
# softmax: at 0.4 some bins get slopes h/w ~ 1e-3 and a 6-D flow log|det| down to -55, whose
# inverse then loses ~5 digits to conditioning alone (not a bug: |dx/dy| ~ 1e5). 0.25 still gives
# bins of very unequal size, knot derivatives well away from 1 and log|det| of O(±10) (checked
# in tests/test_science_flows.py::test_randomized_splines_use_bins_and_tails).
RANDOM_SCALE = {"affine_coupling": 0.4, "spline_coupling": 0.25, "internal_coordinates": 0.25,
                "egnn_cnf": 0.3, "hollow_cnf": 0.3, "mlp_cnf": 0.3,
                "coarse_grained": 0.25}
IC_SMALL = {"n_layers": 2, "hidden": 12, "n_hidden_layers": 2, "n_bins": 5}
BOX = PeriodicBox((0.9, 0.78, 0.73))
WITH_BOX = RigidLayout(3, BOX, pinned_positions=(0,), pinned_orientations=(0,))
NO_BOX = RigidLayout(2)


def internal_coordinate_targets(layout: MoleculeLayout, n: int, seed: int = 1) -> torch.Tensor:
    """n molecule-like configurations (n, 3 n_atoms) in the canonical frame of the layout's
    Z-matrix: bonds 0.10 nm (to hydrogens) or 0.15 nm, ± 0.004 nm, angles 1.91 ± 0.06 rad,
    torsions uniform (a ring's closing bond is not enforced)."""
    zmatrix = ZMatrix.from_layout(layout)
    gen = torch.Generator().manual_seed(seed)
    hydrogen = [element == "H" for element in layout.elements]
    order, entries = zmatrix.order, zmatrix.entries
    pairs = [(order[1], order[0]), (order[2], order[1]), *((i, j) for i, j, _, _ in entries)]
    r0 = torch.tensor([0.10 if hydrogen[i] or hydrogen[j] else 0.15 for i, j in pairs],
                      dtype=torch.float64)
    bonds = r0 + 0.004 * torch.randn((n, len(pairs)), generator=gen, dtype=torch.float64)
    angles = 1.91 + 0.06 * torch.randn((n, layout.n_atoms - 2), generator=gen,
                                       dtype=torch.float64)
    torsions = 2 * math.pi * torch.rand((n, layout.n_atoms - 3), generator=gen,
                                        dtype=torch.float64) - math.pi
    return zmatrix.to_cartesian(bonds, angles, torsions).reshape(n, 3 * layout.n_atoms)


def perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> torch.nn.Module:
    """Add ``scale`` N(0, 1) to every parameter (away from a (near-)identity start)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def randomize(module: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter by ``scale`` N(0, 1) (far from the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def random_state(layout: RigidLayout, batch: int, seed: int = 2
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Random torus angles (batch, N, 3) in [0, 2π) (None without a box) and unit quaternions
    (batch, N, 4)."""
    g = torch.Generator().manual_seed(seed)
    q = random_unit_quaternions((batch, layout.n_bodies), g)
    if not layout.has_positions:
        return None, q
    angles = 2 * math.pi * torch.rand(batch, layout.n_bodies, 3, generator=g, dtype=torch.float64)
    return angles, q


def rigid_flow_input(layout: RigidLayout, batch: int, seed: int = 3) -> torch.Tensor:
    """Flat flow coordinates (batch, dim) of random rigid-body states, pinned positions at 0."""
    angles, q = random_state(layout, batch, seed)
    positions = None if angles is None else BOX.from_angles(angles)
    if positions is not None:
        positions[:, list(layout.pinned_positions)] = 0.0
    return layout.join(positions, q)
