"""The Z-matrix of a bond graph, internal <-> Cartesian coordinates and the volume element of
the quotient of R^{3n} by rigid motions (:mod:`boltzgen.internal_coordinates`), float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzgen.internal_coordinates import (
    ZMatrix,
    bond_angle,
    dihedral,
    log_volume_element,
    valid_internal,
    wrap_angle,
)
from boltzgen.layouts import MoleculeLayout

# Alanine dipeptide (ACE-ALA-NME), 22 atoms in the usual order of its PDB file.
ALA2_ELEMENTS = ("H", "C", "H", "H", "C", "O", "N", "H", "C", "H", "C", "H", "H", "H", "C", "O",
                 "N", "H", "C", "H", "H", "H")
ALA2_BONDS = ((1, 0), (1, 2), (1, 3), (1, 4), (4, 5), (4, 6), (6, 7), (6, 8), (8, 9), (8, 10),
              (10, 11), (10, 12), (10, 13), (8, 14), (14, 15), (14, 16), (16, 17), (16, 18),
              (18, 19), (18, 20), (18, 21))
ALA2 = MoleculeLayout(22, ALA2_ELEMENTS, ALA2_BONDS)
# Pyrrolidine (a proline-like five-membered ring): N0, C1..C4, NH, two H per carbon.
PYRROLIDINE = MoleculeLayout(
    14, ("N", "C", "C", "C", "C", "H", "H", "H", "H", "H", "H", "H", "H", "H"),
    ((0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 5), (1, 6), (1, 7), (2, 8), (2, 9), (3, 10),
     (3, 11), (4, 12), (4, 13)))
LAYOUTS = {"ala2": ALA2, "pyrrolidine": PYRROLIDINE}


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    """A proper rotation (3, 3) from the QR decomposition of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def random_internal(zmatrix: ZMatrix, n: int, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid internal coordinates: bonds in (0.09, 0.16) nm, angles in (0.3, 2.9) rad,
    torsions uniform in [−π, π)."""
    gen = torch.Generator().manual_seed(seed)
    atoms = zmatrix.n_atoms
    bonds = 0.09 + 0.07 * torch.rand(n, atoms - 1, generator=gen, dtype=torch.float64)
    angles = 0.3 + 2.6 * torch.rand(n, atoms - 2, generator=gen, dtype=torch.float64)
    torsions = 2 * math.pi * torch.rand(n, atoms - 3, generator=gen, dtype=torch.float64) - math.pi
    return bonds, angles, torsions


# -- the Z-matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_z_matrix_places_a_heavy_frame_then_heavy_atoms_then_hydrogens(name: str) -> None:
    layout = LAYOUTS[name]
    zmatrix = ZMatrix.from_layout(layout)
    bonded = {frozenset(b) for b in layout.bonds}
    hydrogen = [e == "H" for e in layout.elements]
    a, b, c = zmatrix.order[:3]
    assert sorted(zmatrix.order) == list(range(layout.n_atoms))
    assert frozenset((a, b)) in bonded and frozenset((b, c)) in bonded
    assert not any(hydrogen[i] for i in (a, b, c))
    kinds = [hydrogen[i] for i in zmatrix.order]
    assert kinds == sorted(kinds)  # every heavy atom before every hydrogen
    rank = {atom: position for position, atom in enumerate(zmatrix.order)}
    for i, j, k, far in zmatrix.entries:
        assert frozenset((i, j)) in bonded and frozenset((j, k)) in bonded
        assert max(rank[j], rank[k], rank[far]) < rank[i] and len({i, j, k, far}) == 4
        assert frozenset((j, far)) in bonded or frozenset((k, far)) in bonded
    assert zmatrix == ZMatrix.from_bonds(layout.n_atoms, tuple(reversed(layout.bonds)),
                                         layout.elements)  # deterministic, not bond order
    assert len(zmatrix.entries) == zmatrix.n_torsions == layout.n_atoms - 3
    assert sum(len(level) for level in zmatrix.levels) == len(zmatrix.entries)


def test_methyl_hydrogens_after_the_first_take_their_torsion_from_a_sibling() -> None:
    """The 2nd and 3rd hydrogen of every ala2 methyl: l bonded to j (a unimodal torsion about
    j–k); the first: l bonded to k (the methyl's rotation)."""
    zmatrix = ZMatrix.from_layout(ALA2)
    bonded = {frozenset(b) for b in ALA2.bonds}
    for carbon in (1, 10, 18):  # the three methyl carbons
        entries = [e for e in zmatrix.entries if e[1] == carbon and ALA2_ELEMENTS[e[0]] == "H"]
        assert len(entries) == 3
        first, *rest = entries
        assert frozenset((first[2], first[3])) in bonded and frozenset((carbon, first[3])) \
            not in bonded
        for _, j, _, far in rest:
            assert frozenset((j, far)) in bonded


def test_z_matrix_refuses_disconnected_graphs_and_fewer_than_three_atoms() -> None:
    with pytest.raises(ValueError, match=r"^bonds: a graph in which atoms 3, 4 are not "
                       r"connected to atom 0 is not allowed; the bonds must connect all 5 atoms$"):
        ZMatrix.from_bonds(5, ((0, 1), (1, 2), (3, 4)))
    with pytest.raises(ValueError, match=r"^n_atoms: 2 is not allowed; a Z-matrix needs >= 3 "
                       r"atoms$"):
        ZMatrix.from_bonds(2, ((0, 1),))
    zmatrix = ZMatrix.from_layout(ALA2)
    with pytest.raises(ValueError, match=r"x: shape \(4, 21, 3\) is not allowed"):
        zmatrix.to_internal(torch.zeros(4, 21, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"torsions: shape \(4, 18\) is not allowed"):
        zmatrix.to_cartesian(torch.ones(4, 21, dtype=torch.float64),
                             torch.ones(4, 20, dtype=torch.float64),
                             torch.ones(4, 18, dtype=torch.float64))


def test_three_atoms_without_elements() -> None:
    """A bent triatomic: no torsions; the atom with two bonds is the centre."""
    zmatrix = ZMatrix.from_bonds(3, ((0, 1), (0, 2)))
    assert zmatrix.order == (1, 0, 2) and zmatrix.entries == () and zmatrix.dim == 3
    x = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.2, 0.0]], dtype=torch.float64)
    bonds, angles, torsions = zmatrix.to_internal(x)
    torch.testing.assert_close(bonds, torch.tensor([0.1, 0.2], dtype=torch.float64))
    torch.testing.assert_close(angles, torch.tensor([math.pi / 2], dtype=torch.float64))
    assert torsions.shape == (0,)


# -- angles and signs -----------------------------------------------------------------------


def test_dihedral_sign_and_range() -> None:
    """IUPAC: looking along j -> k, l clockwise from i is positive; 180° maps to −π."""
    j = torch.zeros(3, dtype=torch.float64)
    k = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    i = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for phi in (0.3, 1.5, -2.0, math.pi):
        far = torch.tensor([math.cos(phi), math.sin(phi), 1.0], dtype=torch.float64)
        want = -math.pi if phi == math.pi else phi
        assert abs(float(dihedral(i, j, k, far)) - want) < 1e-14
        assert abs(float(dihedral(far, k, j, i)) - want) < 1e-14  # reversal: the same
    assert abs(float(bond_angle(i, j, k)) - math.pi / 2) < 1e-15
    wrapped = wrap_angle(torch.tensor([math.pi, -math.pi, 3 * math.pi, 7.0], dtype=torch.float64))
    assert bool(((wrapped >= -math.pi) & (wrapped < math.pi)).all())
    torch.testing.assert_close(wrapped[:3], torch.full((3,), -math.pi, dtype=torch.float64))


# -- round trips and invariance -------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cartesian_internal_cartesian_gives_the_canonical_frame(name: str) -> None:
    layout = LAYOUTS[name]
    zmatrix = ZMatrix.from_layout(layout)
    gen = torch.Generator().manual_seed(3)
    x = 0.3 * torch.randn(16, layout.n_atoms, 3, generator=gen, dtype=torch.float64)
    back = zmatrix.to_cartesian(*zmatrix.to_internal(x))
    canonical = zmatrix.canonical_frame(x)
    assert (back - canonical).abs().max() <= 1e-10
    a, b, c = zmatrix.order[:3]
    assert canonical[:, a].abs().max() <= 1e-15
    assert canonical[:, b, 1:].abs().max() <= 1e-15 and bool((canonical[:, b, 0] > 0).all())
    assert canonical[:, c, 2].abs().max() <= 1e-15 and bool((canonical[:, c, 1] > 0).all())
    # the canonical frame is x moved rigidly: the same pair distances
    torch.testing.assert_close(torch.cdist(canonical, canonical), torch.cdist(x, x))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_internal_cartesian_internal_round_trip(name: str) -> None:
    zmatrix = ZMatrix.from_layout(LAYOUTS[name])
    internal = random_internal(zmatrix, 64)
    x = zmatrix.to_cartesian(*internal)
    assert x.shape == (64, zmatrix.n_atoms, 3)
    for got, want in zip(zmatrix.to_internal(x), internal, strict=True):
        assert (got - want).abs().max() <= 1e-10
    # batch shapes (2, 32, ...)
    x2 = zmatrix.to_cartesian(*(t.reshape(2, 32, -1) for t in internal))
    torch.testing.assert_close(x2.reshape(64, -1, 3), x, rtol=0, atol=1e-15)


def test_internal_coordinates_are_invariant_under_rigid_motions_not_reflections() -> None:
    zmatrix = ZMatrix.from_layout(ALA2)
    gen = torch.Generator().manual_seed(5)
    x = zmatrix.to_cartesian(*random_internal(zmatrix, 8, seed=2))
    moved = x @ random_rotation(gen).T + torch.randn(3, generator=gen, dtype=torch.float64)
    for got, want in zip(zmatrix.to_internal(moved), zmatrix.to_internal(x), strict=True):
        assert (got - want).abs().max() <= 1e-12
    mirrored = x * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    bonds, angles, torsions = zmatrix.to_internal(mirrored)
    ref_bonds, ref_angles, ref_torsions = zmatrix.to_internal(x)
    torch.testing.assert_close(bonds, ref_bonds)
    torch.testing.assert_close(angles, ref_angles)
    assert (wrap_angle(torsions + ref_torsions)).abs().max() <= 1e-12  # every torsion flips


# -- the volume element ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_log_volume_element_against_the_autograd_jacobian_of_frame_coordinates(name: str) -> None:
    """log|det ∂(frame coordinates)/∂q| = Σ 2 ln r + Σ ln sin θ − ln(x_b² y_c)."""
    zmatrix = ZMatrix.from_layout(LAYOUTS[name])
    n_bonds, n_angles = zmatrix.n_atoms - 1, zmatrix.n_atoms - 2
    for q in torch.cat(random_internal(zmatrix, 3, seed=7), dim=-1):

        def frame(v: torch.Tensor) -> torch.Tensor:
            x = zmatrix.to_cartesian(v[:n_bonds], v[n_bonds : n_bonds + n_angles],
                                     v[n_bonds + n_angles :])
            return zmatrix.frame_coordinates(x)

        sign, log_abs_det = torch.linalg.slogdet(torch.autograd.functional.jacobian(frame, q))
        x = zmatrix.to_cartesian(q[:n_bonds], q[n_bonds : n_bonds + n_angles],
                                 q[n_bonds + n_angles :])
        want = (log_volume_element(q[:n_bonds], q[n_bonds : n_bonds + n_angles])
                - zmatrix.log_frame_volume(x))
        assert sign != 0 and abs(float(log_abs_det - want)) <= 1e-10
        torch.testing.assert_close(zmatrix.from_frame_coordinates(frame(q)), x, rtol=0,
                                   atol=1e-15)


def _log_density_of_internal_coordinates(zmatrix: ZMatrix, bonds: torch.Tensor,
                                         angles: torch.Tensor, torsions: torch.Tensor
                                         ) -> torch.Tensor:
    """ln p(q) of the internal coordinates of x ~ N(0, I_{3n}), by the quotient measure:
    p(q) = 8π² ∫ dT N(T + x̂(q)) · exp(log_volume_element), with the translation integral
    ∫ dT exp(−n |T + x̄|² / 2) = (2π / n)^{3/2} (x̂ in the canonical frame, x̄ its centroid)."""
    n = zmatrix.n_atoms
    x = zmatrix.to_cartesian(bonds, angles, torsions)
    spread = ((x - x.mean(-2, keepdim=True)) ** 2).sum((-1, -2))
    return (math.log(8 * math.pi**2) + 1.5 * math.log(2 * math.pi / n)
            - 1.5 * n * math.log(2 * math.pi) - 0.5 * spread
            + log_volume_element(bonds, angles))


def test_quotient_measure_normalizes_a_gaussian_for_three_atoms() -> None:
    """The density of (r_b, r_c, θ_c) for three atoms x ~ N(0, I_9) integrates to 1 by
    Gauss–Legendre quadrature: the Haar mass 8π² and r_b² r_c² sin θ_c are right."""
    zmatrix = ZMatrix.from_bonds(3, ((0, 1), (1, 2)))
    nodes, weights = np.polynomial.legendre.leggauss(96)
    r = torch.tensor(6.0 * (nodes + 1), dtype=torch.float64)  # (0, 12)
    wr = torch.tensor(6.0 * weights, dtype=torch.float64)
    theta = torch.tensor(0.5 * math.pi * (nodes + 1), dtype=torch.float64)
    wt = torch.tensor(0.5 * math.pi * weights, dtype=torch.float64)
    rb, rc, th = torch.meshgrid(r, r, theta, indexing="ij")
    log_p = _log_density_of_internal_coordinates(
        zmatrix, torch.stack([rb, rc], -1), th[..., None], th.new_zeros((*th.shape, 0)))
    total = (torch.exp(log_p) * wr[:, None, None] * wr[None, :, None] * wt).sum()
    assert abs(float(total) - 1.0) < 1e-8, float(total)


def test_quotient_measure_normalizes_a_gaussian_for_a_branched_molecule() -> None:
    """Five atoms (three torsions, a sibling one among them): ∫ p(q) dq = 1 by importance
    sampling from r = 1.8 |N(0, I_3)|, cos θ uniform, τ uniform (4 standard errors)."""
    zmatrix = ZMatrix.from_bonds(5, ((0, 1), (0, 2), (0, 3), (3, 4)))
    gen = torch.Generator().manual_seed(0)
    m = 400_000
    bonds = 1.8 * torch.linalg.vector_norm(
        torch.randn(m, 4, 3, generator=gen, dtype=torch.float64), dim=-1)
    angles = torch.arccos(1 - 2 * torch.rand(m, 3, generator=gen, dtype=torch.float64))
    torsions = 2 * math.pi * torch.rand(m, 2, generator=gen, dtype=torch.float64) - math.pi
    # proposal: chi_3 scaled by 1.8, sin θ / 2, 1 / 2π
    log_g = (0.5 * math.log(2 / math.pi) + torch.log(bonds**2 / 1.8**3)
             - bonds**2 / (2 * 1.8**2)).sum(-1) \
        + torch.log(torch.sin(angles) / 2).sum(-1) - 2 * math.log(2 * math.pi)
    ratio = torch.exp(_log_density_of_internal_coordinates(zmatrix, bonds, angles, torsions)
                      - log_g)
    mean, error = float(ratio.mean()), float(ratio.std() / math.sqrt(m))
    assert abs(mean - 1.0) < 4 * error and error < 0.01, (mean, error)


def test_valid_internal() -> None:
    bonds = torch.tensor([[0.1, 0.1], [0.1, -0.1], [0.1, 0.1], [0.1, 0.1]], dtype=torch.float64)
    angles = torch.tensor([[1.9], [1.9], [-0.1], [3.2]], dtype=torch.float64)
    assert valid_internal(bonds, angles).tolist() == [True, False, False, False]
