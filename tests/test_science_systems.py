"""Systems: reference free energy of the double well, DW4 coordinates/symmetries, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzgen.bases import NormalBase, ThermodynamicBase
from boltzgen.registry import Registry
from boltzgen.systems import (
    DW4,
    SYSTEMS,
    DoubleWell2D,
    GaussianMixture,
    IceXI,
    LennardJonesCluster,
    PeptideSystem,
    TetrahedronInField,
    make_system,
    system_parameter_names,
)
from boltzgen.systems.dw4 import helmert_basis


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_double_well_free_energy_matches_grid_sum(temperature: float) -> None:
    """Independent check of the quadrature: trapezoid rule on a 2-D grid covering all mass.

    On [-7, 7] x [-14, 14] the neglected Boltzmann factors are < exp(-100) of the maximum, and
    the trapezoid rule converges faster than any power for such smooth, decaying integrands.
    """
    system = DoubleWell2D()
    x1 = np.linspace(-7.0, 7.0, 1401)
    x2 = np.linspace(-14.0, 14.0, 1401)
    grid = torch.as_tensor(np.stack(np.meshgrid(x1, x2, indexing="ij"), axis=-1))
    u = system.reduced_energy(grid, temperature).numpy()
    u_min = u.min()
    z_shifted = np.trapezoid(np.trapezoid(np.exp(-(u - u_min)), x2, axis=1), x1)
    f_grid = -math.log(z_shifted) + u_min
    assert abs(system.exact_free_energy(temperature) - f_grid) < 1e-8


def test_double_well_potential_and_observables() -> None:
    system = DoubleWell2D(a=0.5, b=-1.0, c=0.2)
    x = torch.tensor([[1.5, -2.0], [0.0, 1.0]], dtype=torch.float64)
    expected = 0.5 * x[:, 0] ** 4 - x[:, 0] ** 2 + 0.2 * x[:, 0] + 0.5 * x[:, 1] ** 2
    torch.testing.assert_close(system.potential(x), expected)
    torch.testing.assert_close(system.reduced_energy(x, 2.0), expected / 2.0)
    obs = system.observables(x.numpy())
    assert set(obs) == {"x1", "x2"} and obs["x1"].shape == (2,)
    assert system.dim == 2 and system.boltzmann_constant == 1.0 and system.kind == "double_well"
    with pytest.raises(ValueError, match="temperature: -1.0"):
        system.reduced_energy(x, -1.0)
    with pytest.raises(ValueError, match=r"x: shape \(2, 3\)"):
        system.potential(torch.zeros(2, 3, dtype=torch.float64))
    # No symmetry operations are known: the identity alone.
    assert system.symmetry_operation_count == 1 and not system.supports_symmetry_images()
    np.testing.assert_array_equal(system.symmetry_images(x.numpy()), x.numpy())
    with pytest.raises(ValueError, match="operations: only 0"):
        system.symmetry_images(x.numpy(), np.array([0, 1]))


def test_double_well_gaussian_limit() -> None:
    """a tiny, b = 0.5, c = 0: x1 is nearly N(0, T): f = -ln(2 pi T) + O(a)."""
    system = DoubleWell2D(a=1e-12, b=0.5, c=0.0)
    assert abs(system.exact_free_energy(1.5) + math.log(2 * math.pi * 1.5)) < 1e-9


def test_helmert_basis_orthonormal() -> None:
    for n in (2, 4, 7):
        h = helmert_basis(n)
        np.testing.assert_allclose(h @ h.T, np.eye(n - 1), atol=1e-14)
        np.testing.assert_allclose(h @ np.ones(n), np.zeros(n - 1), atol=1e-14)


def test_dw4_coordinates() -> None:
    system = DW4()
    gen = torch.Generator().manual_seed(0)
    z = torch.randn((5, 6), generator=gen, dtype=torch.float64)
    x = system.to_cartesian(z)
    assert x.shape == (5, 4, 2)
    torch.testing.assert_close(x.sum(dim=-2), x.new_zeros(5, 2), rtol=0, atol=1e-13)
    torch.testing.assert_close(system.from_cartesian(x), z, rtol=0, atol=1e-13)
    # from_cartesian projects out a translation; to_cartesian is an isometry
    shifted = x + torch.tensor([3.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(system.from_cartesian(shifted), z, rtol=0, atol=1e-13)
    torch.testing.assert_close(x.flatten(1).norm(dim=1), z.norm(dim=1), rtol=0, atol=1e-13)


def test_dw4_invariances_and_value() -> None:
    system = DW4()
    gen = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn((8, 4, 2), generator=gen, dtype=torch.float64)
    u = system.potential(system.from_cartesian(x))
    angle = 0.7
    rot = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(system.potential(system.from_cartesian(x @ rot.T)), u)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(system.potential(system.from_cartesian(x[:, perm])), u)
    # square of side 4: four distances d0 (zero energy) and two diagonals 4 sqrt(2)
    square = torch.tensor([[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]], dtype=torch.float64)
    s = 4.0 * math.sqrt(2.0) - 4.0
    expected = 2.0 * (0.9 * s**4 - 4.0 * s**2)
    assert abs(float(system.potential(system.from_cartesian(square))) - expected) < 1e-12
    obs = system.observables(system.from_cartesian(x).numpy())
    assert obs["pair_distance"].shape == (48,) and obs["energy"].shape == (8,)
    np.testing.assert_allclose(obs["energy"], u.numpy())
    assert system.exact_free_energy(1.0) is None
    assert "centre-of-mass-free" in system.estimand_note


def test_registry_and_errors() -> None:
    assert SYSTEMS == {"double_well": DoubleWell2D, "dw4": DW4,
                       "tetrahedron_field": TetrahedronInField, "ice_xi": IceXI,
                       "peptide": PeptideSystem, "lj": LennardJonesCluster,
                       "gaussian_mixture": GaussianMixture}
    assert system_parameter_names("double_well") == ["a", "b", "c"]
    assert system_parameter_names("dw4") == ["b", "c", "d0"]
    system = make_system({"kind": "dw4", "d0": 3.0})
    assert isinstance(system, DW4) and system.d0 == 3.0 and system.c == 0.9
    with pytest.raises(
        ValueError,
        match=r"system\.kind: 'xyz' is not a known system; choose one of double_well, dw4",
    ):
        make_system({"kind": "xyz"})
    with pytest.raises(ValueError, match=r"system\.kind: 'xyz'"):
        system_parameter_names("xyz")
    with pytest.raises(ValueError, match=r"system\.d: not a parameter.*allowed: a, b, c"):
        make_system({"kind": "double_well", "d": 1.0})
    with pytest.raises(ValueError, match=r"system\.a: -1\.0 is not allowed; must be > 0"):
        make_system({"kind": "double_well", "a": -1.0})
    with pytest.raises(ValueError, match=r"system\.c: True is not a real number"):
        make_system({"kind": "dw4", "c": True})
    with pytest.raises(ValueError, match=r"system\.kind: missing"):
        make_system({"a": 1.0})
    with pytest.raises(TypeError):
        DoubleWell2D(0.25)  # parameters are keyword-only


def test_registry_class() -> None:
    """The generic registry: register (a decorator), get with a message naming the field,
    names in registration order, a read-only mapping; duplicates and mismatched kinds refused."""
    things: Registry[object] = Registry("thing")

    @things.register("a")
    class A:
        pass

    @things.register("b")
    class B:
        kind = "b"

    assert things.get("a", "x.kind") is A and things["b"] is B and things.names() == ["a", "b"]
    assert list(things) == ["a", "b"] and len(things) == 2 and "a" in things
    assert dict(things) == {"a": A, "b": B}
    with pytest.raises(ValueError,
                       match=r"^x\.kind: 'c' is not a known thing; choose one of a, b$"):
        things.get("c", "x.kind")
    with pytest.raises(ValueError, match=r"x\.kind: 3 is not a known thing"):
        things.get(3, "x.kind")
    with pytest.raises(ValueError, match="already registered"):
        things.register("a")(B)
    with pytest.raises(ValueError, match="B.kind is 'b'"):
        things.register("c")(B)
    assert isinstance(SYSTEMS, Registry) and SYSTEMS.names() == [
        "double_well", "dw4", "tetrahedron_field", "ice_xi", "peptide", "lj", "gaussian_mixture"]


def test_base_states() -> None:
    base = NormalBase(3, scale=2.0)
    sample = base.sample(5, torch.Generator().manual_seed(0))
    assert sample.shape == (5, 3) and sample.dtype == torch.float64 and base.free_energy == 0.0
    x = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    log_pdf = torch.distributions.Normal(0.0, 2.0).log_prob(x).sum(-1)
    torch.testing.assert_close(base.reduced_energy(x), -log_pdf)
    with pytest.raises(ValueError, match="scale: 0.0"):
        NormalBase(2, scale=0.0)
    thermo = ThermodynamicBase(DoubleWell2D(), temperature=2.0)
    assert thermo.free_energy is None and thermo.dim == 2
    torch.testing.assert_close(
        thermo.reduced_energy(x[:, :2]), DoubleWell2D().potential(x[:, :2]) / 2
    )
