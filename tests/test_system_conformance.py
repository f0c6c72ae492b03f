"""One conformance suite over every registered system (:data:`boltzgen.systems.SYSTEMS`).

Each case gives a system at its defaults and a few reference samples of its Boltzmann
distribution from what the system offers: its exact sampler (tetrahedron, Gaussian mixture), a
tiny Metropolis run (double well, DW4; the LJ cluster from a perturbed lattice), or its ideal
structure slightly
perturbed (ice XI, whose thermal samples need MD). A meta-test fails when a registered system
has no case here.

Checks: the potential is finite on the reference samples and shaped like the batch, the reduced
energy is U / (k_B T); forces F = −∇U: the autograd gradient of the potential agrees with a
central finite difference along a random direction in the tangent space of the coordinates
(S³ for quaternions, pinned coordinates fixed), and where the system has an OpenMM form, the
OpenMM forces mapped to flow coordinates (``flow_gradient``) equal minus the autograd
gradient; the declared layout is registered, has ``dim`` coordinates, round-trips through its
plain-data form, is the rigid layout iff the system is rigid-body, and some flow accepts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
import torch

from boltzgen.flows import build_flow, flow_kinds_for
from boltzgen.layouts import LAYOUTS, layout_from_dict
from boltzgen.mcmc import replica_exchange
from boltzgen.priors import default_prior
from boltzgen.rigid.bodies import RigidLayout
from boltzgen.systems import SYSTEMS, System, make_system
from boltzgen.systems.particles import cubic_lattice

logging.getLogger("genice_core").setLevel(logging.ERROR)


def _mcmc(system: System, temperature: float, seed: int) -> np.ndarray:
    """Eight decorrelated-enough frames of a tiny Metropolis run at ``temperature``."""
    x0 = torch.zeros(system.dim, dtype=torch.float64) + 0.5
    result = replica_exchange(system.potential, [temperature], x0, n_steps=300, burn_in=200,
                              n_chains=4, thin=50, step_size=0.3,
                              boltzmann_constant=system.boltzmann_constant, seed=seed)
    return result.samples[0].reshape(-1, system.dim)


def _mcmc_cluster(system: System, temperature: float, seed: int) -> np.ndarray:
    """As :func:`_mcmc`, started from a perturbed cubic lattice at spacing r_m (a constant
    start puts particles on a line, close enough for r^-12 energies to dominate)."""
    g = torch.Generator().manual_seed(seed)
    lattice = torch.as_tensor(cubic_lattice(system.n_particles, system.spatial_dim))
    x0 = system.from_cartesian(lattice + 0.05 * torch.randn((4, *lattice.shape), generator=g,
                                                            dtype=torch.float64))
    result = replica_exchange(system.potential, [temperature], x0, n_steps=300, burn_in=200,
                              n_chains=4, thin=50, step_size=0.05,
                              boltzmann_constant=system.boltzmann_constant, seed=seed)
    return result.samples[0].reshape(-1, system.dim)


def _exact(system: System, temperature: float, seed: int) -> np.ndarray:
    return system.exact_samples(8, temperature, seed)[0]


def _perturbed_ideal(system: System, temperature: float, seed: int) -> np.ndarray:
    """The ideal crystal with every mobile position moved by ~0.005 nm and every orientation
    by ~0.01 rad (a thermal-like neighbourhood of the minimum)."""
    layout = system.rigid_layout()
    g = torch.Generator().manual_seed(seed)
    ideal = torch.as_tensor(system.ideal_coordinates())[None].expand(4, -1)
    positions, q = layout.split(ideal)
    moved = positions + 0.005 * torch.randn(positions.shape, generator=g, dtype=torch.float64)
    moved[:, list(layout.pinned_positions)] = positions[:, list(layout.pinned_positions)]
    q = q + 0.005 * torch.randn(q.shape, generator=g, dtype=torch.float64)
    return layout.join(moved, q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)).numpy()


def _perturbed_molecule(system: System, temperature: float, seed: int) -> np.ndarray:
    """The minimised molecule with every atom moved by ~0.002 nm (a thermal-like
    neighbourhood of the minimum: bonds to hydrogen fluctuate by ~0.003 nm at 300 K)."""
    rng = np.random.default_rng(seed)
    ideal = system.ideal_coordinates()
    return ideal + 0.002 * rng.standard_normal((4, len(ideal)))


# kind -> (config, temperature, reference sampler)
CASES: dict[str, tuple[dict, float, Callable[[System, float, int], np.ndarray]]] = {
    "double_well": ({"kind": "double_well"}, 1.0, _mcmc),
    "dw4": ({"kind": "dw4"}, 1.0, _mcmc),
    "tetrahedron_field": ({"kind": "tetrahedron_field"}, 300.0, _exact),
    "ice_xi": ({"kind": "ice_xi", "molecules": 16}, 100.0, _perturbed_ideal),
    "peptide": ({"kind": "peptide", "sequence": "ACE-ALA-NME"}, 300.0, _perturbed_molecule),
    "lj": ({"kind": "lj"}, 1.0, _mcmc_cluster),
    "gaussian_mixture": ({"kind": "gaussian_mixture"}, 1.0, _exact),
}


@cache
def _system(kind: str) -> System:
    """The case's system; one whose potential is OpenMM's (ice) evaluates it on the
    double-precision Reference platform here (the CPU platform's forces are single precision,
    too coarse for finite differences)."""
    system = make_system(CASES[kind][0])
    if hasattr(system, "_local_evaluator"):
        import openmm

        from boltzgen.openmm_bridge import OpenMMEvaluator

        system._evaluator = OpenMMEvaluator(
            openmm.XmlSerializer.serialize(system.openmm_system()), platform="Reference")
    return system


@cache
def _samples(kind: str) -> torch.Tensor:
    _, temperature, sampler = CASES[kind]
    return torch.as_tensor(np.asarray(sampler(_system(kind), temperature, 7), dtype=np.float64))


def test_every_registered_system_has_a_case() -> None:
    """A system registered without a case here fails this test (add one to CASES)."""
    assert set(CASES) == set(SYSTEMS)
    for kind, cls in SYSTEMS.items():
        assert issubclass(cls, System) and cls.kind == kind


@pytest.mark.parametrize("kind", list(CASES))
def test_energy_is_finite_on_reference_samples(kind: str) -> None:
    system, x = _system(kind), _samples(kind)
    temperature = CASES[kind][1]
    assert x.ndim == 2 and x.shape[1] == system.dim and len(x) >= 4
    u = system.potential(x)
    assert u.shape == (len(x),) and u.dtype == torch.float64
    assert bool(torch.isfinite(u).all()), u
    torch.testing.assert_close(system.reduced_energy(x, temperature),
                               u / (system.boltzmann_constant * temperature), rtol=1e-15, atol=0)


def _tangent_direction(system: System, x: torch.Tensor, seed: int) -> torch.Tensor:
    """A random direction (B, dim) tangent to the coordinates' manifold at x: on S³ orthogonal
    to each quaternion, zero on pinned coordinates."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    layout = system.rigid_layout()
    if layout is None:
        return v
    positions, q = layout.split(v)
    _, q_at = layout.split(x)
    q = q - (q * q_at).sum(-1, keepdim=True) * q_at
    q[:, list(layout.pinned_orientations)] = 0.0
    if positions is not None:
        positions = 0.01 * positions  # nm: positions move on a smaller scale than angles
        positions[:, list(layout.pinned_positions)] = 0.0
    return layout.join(positions, q)


def _moved(system: System, x: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """x + eps v, back on the manifold (quaternions renormalized: a second-order change)."""
    y = x + eps * v
    layout = system.rigid_layout()
    if layout is None:
        return y
    positions, q = layout.split(y)
    return layout.join(positions, q / torch.linalg.vector_norm(q, dim=-1, keepdim=True))


@pytest.mark.parametrize("kind", list(CASES))
def test_forces_are_minus_the_gradient(kind: str) -> None:
    """v·∇U(x) (autograd) equals the central difference [U(x + εv) − U(x − εv)] / 2ε
    (ε = 1e-5; error O(ε²) relative to the energy's curvature), so F = −∇U is the force; and
    OpenMM's forces, mapped to flow coordinates, are −∇U."""
    system, x = _system(kind), _samples(kind)[:4].clone()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(system.potential(xg).sum(), xg)
    assert bool(torch.isfinite(grad).all())
    v = _tangent_direction(system, x, seed=3)
    eps = 1e-5
    with torch.no_grad():
        difference = (system.potential(_moved(system, x, v, eps))
                      - system.potential(_moved(system, x, v, -eps))) / (2 * eps)
    directional = (grad * v).sum(-1)
    scale = float(directional.abs().max()) + 1.0
    assert float((difference - directional).abs().max()) <= 1e-5 * scale, (difference,
                                                                           directional)
    if system.supports_openmm():
        import openmm

        from boltzgen.openmm_bridge import OpenMMEvaluator

        evaluator = OpenMMEvaluator(openmm.XmlSerializer.serialize(system.openmm_system()),
                                    platform="Reference")
        energies, forces = evaluator.energies_and_forces(system.openmm_positions(x.numpy()))
        np.testing.assert_allclose(energies, system.potential(x).detach().numpy(), rtol=1e-9,
                                   atol=1e-9)
        np.testing.assert_allclose(-system.flow_gradient(forces, x.numpy()), -grad.numpy(),
                                   rtol=1e-7, atol=1e-7 * float(grad.abs().max()))


@pytest.mark.parametrize("kind", list(CASES))
def test_declared_layout(kind: str) -> None:
    system = _system(kind)
    layout = system.layout()
    assert LAYOUTS[layout.kind] is type(layout)
    assert layout.dim == system.dim
    assert layout_from_dict(layout.to_dict()) == layout
    assert system.rigid_layout() == (layout if isinstance(layout, RigidLayout) else None)
    assert layout.euclidean == (system.rigid_layout() is None)
    kinds = flow_kinds_for(layout)
    assert kinds, f"no flow accepts {layout.description}"
    prior_sample = default_prior(layout).sample(3, torch.Generator().manual_seed(0))
    assert prior_sample.shape == (3, system.dim)
    if kind != "ice_xi":  # a flow on the 112-D ice layout is built in the ice tests
        flow = build_flow(layout, {"kind": kinds[0]})
        y, log_det = flow(_samples(kind)[:2])
        assert y.shape == (2, system.dim) and log_det.shape == (2,)


def test_dw4_declares_its_particles() -> None:
    """DW4: 4 particles in 2-D without centre of mass; the layout's Cartesian map is the
    system's (Helmert coordinates), so an equivariant flow could act on the particles."""
    system = _system("dw4")
    layout = system.layout()
    assert (layout.kind, layout.n_particles, layout.spatial_dim, layout.com_free) == (
        "particles", 4, 2, True)
    x = _samples("dw4")
    torch.testing.assert_close(layout.to_cartesian(x), system.to_cartesian(x), rtol=0, atol=0)
    torch.testing.assert_close(layout.from_cartesian(system.to_cartesian(x)), x, rtol=0,
                               atol=1e-13)
