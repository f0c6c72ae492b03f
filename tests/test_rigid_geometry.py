"""Quaternions, rigid templates and boxes: conversions, sampling, measures and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzgen.rigid.bodies import (
    TETRAHEDRON,
    WATER_TIP4P_EW,
    PeriodicBox,
    RigidLayout,
    RigidTemplate,
)
from boltzgen.rigid.quaternions import (
    canonical,
    check_unit_quaternion,
    conjugate,
    matrix_to_quaternion,
    multiply,
    quaternion_to_matrix,
    random_unit_quaternions,
    rotation_angle_between,
    tangent_basis,
)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_matrix_round_trip_is_stable_in_both_precisions(dtype, tolerance) -> None:
    g = torch.Generator().manual_seed(0)
    q = random_unit_quaternions(20000, g, dtype=dtype)
    # include the hard cases: rotations by π (w = 0) and the identity
    q = torch.cat([q, torch.eye(4, dtype=dtype)])
    r = quaternion_to_matrix(q)
    eye = torch.eye(3, dtype=dtype)
    assert (r @ r.transpose(-1, -2) - eye).abs().max() <= 10 * tolerance
    assert (matrix_to_quaternion(r) - canonical(q)).abs().max() <= 10 * tolerance
    assert torch.equal(quaternion_to_matrix(-q), r)


def test_product_conjugate_and_rotation_agree() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = random_unit_quaternions(100, g), random_unit_quaternions(100, g)
    ra, rb = quaternion_to_matrix(a), quaternion_to_matrix(b)
    assert (quaternion_to_matrix(multiply(a, b)) - ra @ rb).abs().max() < 1e-13
    v = torch.randn(100, 3, generator=g, dtype=torch.float64)
    pure = torch.cat([torch.zeros(100, 1, dtype=torch.float64), v], -1)
    rotated = multiply(multiply(a, pure), conjugate(a))[:, 1:]
    assert (rotated - (ra @ v[..., None])[..., 0]).abs().max() < 1e-13
    assert rotation_angle_between(a, -a).abs().max() < 1e-6


def test_uniform_quaternions_give_haar_rotations() -> None:
    """Under Haar measure E[R] = 0 and E[trace R] = 0; tolerance 5 standard errors."""
    g = torch.Generator().manual_seed(2)
    r = quaternion_to_matrix(random_unit_quaternions(200000, g))
    mean = r.mean(0)
    # each entry of R has variance 1/3 under Haar measure
    assert mean.abs().max() < 5 * math.sqrt(1 / 3 / 200000)
    # the rotation angle ω has density (1 − cos ω)/π on [0, π]: E[ω] = π/2 + 2/π
    omega = 2 * torch.acos(canonical(random_unit_quaternions(200000, g))[:, 0].clamp(max=1))
    expected = math.pi / 2 + 2 / math.pi
    assert abs(float(omega.mean()) - expected) < 5 * float(omega.std()) / math.sqrt(200000)


def test_tangent_basis_is_orthonormal_and_tangent() -> None:
    q = random_unit_quaternions(50, torch.Generator().manual_seed(3))
    e = tangent_basis(q)
    assert (e.transpose(-1, -2) @ e - torch.eye(3, dtype=q.dtype)).abs().max() < 1e-14
    assert (q[:, None, :] @ e).abs().max() < 1e-15


def test_bad_quaternions_are_refused_with_the_argument_named() -> None:
    with pytest.raises(ValueError, match=r"orientation: a quaternion has norm 1\.01"):
        check_unit_quaternion(torch.tensor([[1.01, 0.0, 0.0, 0.0]]), "orientation")
    with pytest.raises(ValueError, match="q: contains non-finite"):
        check_unit_quaternion(torch.tensor([[float("nan"), 0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"need \(\.\.\., 4\)"):
        check_unit_quaternion(torch.zeros(3, 3))
    check_unit_quaternion(torch.tensor([[1.0 + 5e-6, 0.0, 0.0, 0.0]]))  # within tolerance


@pytest.mark.parametrize("template", [WATER_TIP4P_EW, TETRAHEDRON])
def test_template_sites_round_trip(template: RigidTemplate) -> None:
    g = torch.Generator().manual_seed(4)
    q = random_unit_quaternions(64, g)
    t = torch.randn(64, 3, generator=g, dtype=torch.float64)
    sites = template.to_sites(t, q)
    t2, q2 = template.from_sites(sites)
    assert (t2 - t).abs().max() < 1e-12
    if template is TETRAHEDRON:  # symmetric: only the rotation of the sites is identifiable
        assert (template.to_sites(t2, q2) - sites).abs().max() < 1e-12
    else:
        assert (q2 - canonical(q)).abs().max() < 1e-12
    # distances inside the body are those of the template
    d = torch.cdist(sites, sites)
    d0 = torch.cdist(template.coordinates(), template.coordinates())
    assert (d - d0).abs().max() < 1e-13


def test_water_geometry_and_measure_factor() -> None:
    s = WATER_TIP4P_EW.coordinates()
    assert abs(float((s[1] - s[0]).norm()) - 0.09572) < 1e-12
    cos_hoh = float((s[1] @ s[2]) / (s[1].norm() * s[2].norm()))
    assert abs(math.degrees(math.acos(cos_hoh)) - 104.52) < 1e-9
    assert WATER_TIP4P_EW.measure_factor() > 0


def test_bad_templates_boxes_and_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="sites: 2 site"):
        RigidTemplate("dimer", ((0.0, 0.0, 0.0), (0.1, 0.0, 0.0)))
    with pytest.raises(ValueError, match="collinear"):
        RigidTemplate("line", ((0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.25, 0.0, 0.0)))
    with pytest.raises(ValueError, match="box: edge y = 0.0 is not allowed"):
        PeriodicBox((1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="box: edge z = -1.0"):
        PeriodicBox((1.0, 1.0, -1.0))
    with pytest.raises(ValueError, match="pinned_positions: 3 is not a body index"):
        RigidLayout(3, PeriodicBox((1.0, 1.0, 1.0)), pinned_positions=(3,))


def test_box_wraps_whole_positions() -> None:
    box = PeriodicBox((1.0, 2.0, 3.0))
    x = torch.tensor([[-0.25, 2.5, 6.1]], dtype=torch.float64)
    assert torch.allclose(box.wrap(x), torch.tensor([[0.75, 0.5, 0.1]], dtype=torch.float64))
    assert torch.allclose(box.from_angles(box.to_angles(x)), box.wrap(x))


def test_thermal_scaling_is_the_harmonic_map_between_temperatures() -> None:
    """Fitted to narrow Gaussian samples about a crystal-like structure, the thermal scaling
    layer keeps the mean and shrinks every displacement by s (exact for a harmonic crystal):
    for displacements below 4e-3 rad the curvature of circle and sphere changes the map by
    O(δ³) < 1e-8 absolute, and the log-det is 3 log s per mobile position and orientation."""
    from boltzgen.flows.rigid import RigidBodyFlow


    g = torch.Generator().manual_seed(0)
    box = PeriodicBox((0.9, 0.78, 0.73))
    layout = RigidLayout(4, box, pinned_positions=(0,))
    flow = RigidBodyFlow(layout, n_blocks=1, channels=8, heads=2, attention_blocks=0,
                         thermal_scaling=True)
    layer = flow.layers[0]
    centre_positions = torch.rand(1, 4, 3, generator=g, dtype=torch.float64) * torch.tensor(
        box.edges, dtype=torch.float64)
    centre_positions[:, 0] = 0.0
    centre_q = torch.nn.functional.normalize(torch.randn(1, 4, 4, generator=g,
                                                         dtype=torch.float64), dim=-1)
    n, sigma, s = 4000, 1e-4, 0.5
    positions = box.wrap(centre_positions + sigma * torch.randn(n, 4, 3, generator=g,
                                                                dtype=torch.float64))
    positions[:, 0] = 0.0
    signs = torch.where(torch.rand(n, 4, 1, generator=g) < 0.5, -1.0, 1.0).double()
    q = signs * torch.nn.functional.normalize(
        centre_q + sigma * torch.randn(n, 4, 4, generator=g, dtype=torch.float64), dim=-1)
    x = layout.join(positions, q)
    flow.fit_thermal_scaling(x, s)
    angles = box.to_angles(positions)
    with torch.no_grad():
        new_angles, new_q, log_det = layer(angles, q)
    centre = box.to_angles(centre_positions)
    displacement = torch.remainder(angles - centre + math.pi, 2 * math.pi) - math.pi
    new_displacement = torch.remainder(new_angles - centre + math.pi, 2 * math.pi) - math.pi
    fitted = layer.centre.detach()
    fitted_offset = torch.remainder(fitted - centre[0] + math.pi, 2 * math.pi) - math.pi
    expected = fitted_offset + s * (displacement - fitted_offset)
    np.testing.assert_allclose(new_displacement[:, 1:].numpy(), expected[:, 1:].numpy(),
                               atol=1e-8)
    assert torch.equal(new_angles[:, 0], angles[:, 0])  # the pinned body does not move
    # Orientation: the tangent part (orthogonal to the fitted ±q0) shrinks by s.
    q0 = torch.linalg.eigh(torch.einsum("bni,bnj->nij", q, q)).eigenvectors[..., -1]
    tangent = q - (q * q0).sum(-1, keepdim=True) * q0
    new_tangent = new_q - (new_q * q0).sum(-1, keepdim=True) * q0
    np.testing.assert_allclose(new_tangent.norm(dim=-1).numpy(),
                               s * tangent.norm(dim=-1).numpy(), rtol=1e-5, atol=1e-12)
    mobile = 3 * 3 + 3 * 4  # 3 mobile positions and 4 orientations, 3 dimensions each
    np.testing.assert_allclose(log_det.numpy(), mobile * math.log(s), atol=1e-4)
