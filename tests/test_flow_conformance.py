"""One conformance suite for every registered flow kind on every layout kind, in float64.

Each case is a flow built through the registry (``build_flow(layout, settings)``) at a tiny
size, with its parameters moved away from the (near-)identity start so that no test passes
trivially. A meta-test fails when a registered flow kind or layout kind has no case here.

Checks (the flow contract, :mod:`boltzgen.flows.contract`): round trip (Euclidean <= 1e-10,
rigid <= 1e-8, rotations up to sign and positions modulo the box), inverse log-det =
−forward log-det, log-det against the autograd Jacobian projected to the tangent spaces
(identity for Euclidean coordinates; q⊗i, q⊗j, q⊗k per quaternion) in both directions,
gradients reaching every parameter, state_dict round trip giving the same outputs bit for bit,
context handling (None accepted, a context refused with a clear error: no flow here is
conditional), the prior and ``sample_and_log_prob`` (the prior's draws pushed forward, log q
equal to ``log_prob`` of the samples), sampling without autograd, float64 throughout, input
checks, identity at initialisation (Euclidean flows), batch shapes, and flip equivariance on S³
(the rigid flows except the rotation-vector baseline, which ignores the double cover).

A flow that owns a prior on a latent space of its own (``internal_coordinates``: 3n − 6
internal coordinates -> 3n Cartesian ones, canonical frame) takes latent points on the prior
side and Cartesian points in the canonical frame on the target side; its log-det is checked
against the autograd Jacobian between the latent and the frame coordinates plus ln(x_b² y_c)
(:mod:`boltzgen.internal_coordinates`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from boltzgen.flows import FLOWS, Flow, build_flow
from boltzgen.internal_coordinates import ZMatrix
from boltzgen.layouts import LAYOUTS, Layout, MoleculeLayout, ParticleLayout, VectorLayout
from boltzgen.priors import (
    GaussianPrior,
    InternalCoordinatePrior,
    SlowFastPrior,
    UniformRigidPrior,
)
from boltzgen.rigid.bodies import RigidLayout
from boltzgen.rigid.quaternions import tangent_basis
from tests.flow_helpers import (
    BOX,
    IC_SMALL,
    NO_BOX,
    RANDOM_SCALE,
    SMALL,
    WITH_BOX,
    internal_coordinate_targets,
    perturb,
    randomize,
    rigid_flow_input,
)

# The affine flow at initialisation is the identity bit for bit; the spline evaluates
# y_k + h_k ξ with ξ = (x - x_k) / w_k and h_k = w_k, exact only up to a few ulps.
# A CNF starts with a zero field; the solver's interpolation to t = 1 rounds (a few ulps).
IDENTITY_ATOL = {"affine_coupling": 0.0, "spline_coupling": 1e-13, "egnn_cnf": 1e-13,
                 "hollow_cnf": 1e-13, "mlp_cnf": 1e-13, "coarse_grained": 1e-13}
RIGID_SMALL = {"channels": 8, "heads": 2}
CNF_SMALL = {"hidden": 8, "n_layers": 2, "atol": 1e-9, "rtol": 1e-9}
CONTINUOUS_ATOL = 1e-6  # round trip and log-det of a CNF: the solver's tolerance, not ulps


@dataclass
class Case:
    """A flow kind on a layout: its settings, how it is moved from its start, its inputs."""

    kind: str
    layout: Layout
    settings: dict = field(default_factory=dict)
    flip_equivariant: bool = False  # f(−q) = −f(q) body by body, same log-det

    @property
    def rigid(self) -> bool:
        return isinstance(self.layout, RigidLayout)

    @property
    def internal(self) -> bool:
        """A flow from a latent space of 3n − 6 internal coordinates to a molecule's 3n
        Cartesian ones (canonical frame): the internal-coordinate flow, and the coarse-grained
        model on a molecule."""
        return isinstance(self.layout, MoleculeLayout) and FLOWS[self.kind].owns_prior

    @property
    def slow_torsions(self) -> int:
        """Latent coordinates that come first and are torsions (the coarse-grained model of a
        molecule: its slow variables); the rest of its latent is normal."""
        if self.kind == "coarse_grained" and isinstance(self.layout, MoleculeLayout):
            return len(self.layout.slow_torsions)
        return 0

    @property
    def latent_dim(self) -> int:
        return self.layout.dim - 6 if self.internal else self.layout.dim

    @property
    def continuous(self) -> bool:
        return bool(getattr(FLOWS[self.kind], "is_continuous", False))

    @property
    def round_trip_atol(self) -> float:
        return CONTINUOUS_ATOL if self.continuous else 1e-8 if self.rigid else 1e-10

    @property
    def log_det_atol(self) -> float:
        return 1e-6 if self.rigid or self.continuous else 1e-10

    def fresh(self, seed: int = 0) -> Flow:
        torch.manual_seed(seed)
        return build_flow(self.layout, {"kind": self.kind, **self.settings})

    def flow(self, seed: int = 0) -> Flow:
        """The flow with parameters away from the identity: random for the Euclidean flows,
        perturbed by 0.2 N(0, 1) for the rigid ones (their S³ maps need |q| < 1); then fitted
        to target samples (``fit_to_data``: a no-op but for the internal-coordinate flow)."""
        if self.rigid:
            flow = perturb(self.fresh(), scale=0.2)
        else:
            flow = randomize(self.fresh(), RANDOM_SCALE[self.kind], seed)
        flow.fit_to_data(self.targets(64, seed=11))
        return flow

    def points(self, n: int, seed: int = 1, spread: float = 1.0) -> torch.Tensor:
        """n points (n, latent dim) on the prior side: 1.5 spread N(0, I) (internal
        coordinates: for the bonds and angles, torsions uniform), or random rigid states."""
        if self.rigid:
            return rigid_flow_input(self.layout, n, seed)
        gen = torch.Generator().manual_seed(seed)
        if self.slow_torsions:
            slow = 2 * torch.pi * torch.rand((n, self.slow_torsions), generator=gen,
                                             dtype=torch.float64) - torch.pi
            normal = 1.5 * spread * torch.randn((n, self.latent_dim - self.slow_torsions),
                                                generator=gen, dtype=torch.float64)
            return torch.cat([slow, normal], -1)
        n_normal = self.latent_dim - (self.layout.n_atoms - 3 if self.internal else 0)
        normal = 1.5 * spread * torch.randn((n, n_normal), generator=gen, dtype=torch.float64)
        if not self.internal:
            return normal
        torsions = 2 * torch.pi * torch.rand((n, self.latent_dim - n_normal), generator=gen,
                                             dtype=torch.float64) - torch.pi
        return torch.cat([normal, torsions], -1)

    def targets(self, n: int, seed: int = 1) -> torch.Tensor:
        """n points (n, dim) on the target side: :meth:`points`, or for internal coordinates
        molecule-like Cartesian coordinates in the canonical frame."""
        if self.internal:
            return internal_coordinate_targets(self.layout, n, seed)
        return self.points(n, seed)


def _euclidean_cases() -> dict[str, Case]:
    cases = {}
    for kind in ("affine_coupling", "spline_coupling"):
        for dim in (2, 3, 6):
            cases[f"{kind}-vector{dim}"] = Case(kind, VectorLayout(dim), SMALL[kind])
    # DW4's layout (Helmert coordinates, R^6) and a molecule's Cartesian coordinates (R^9).
    cases["affine_coupling-particles"] = Case("affine_coupling", ParticleLayout(4, 2, True),
                                              SMALL["affine_coupling"])
    cases["spline_coupling-molecule"] = Case("spline_coupling", MoleculeLayout(3, ("O", "H", "H"),
                                                                               ((0, 1), (0, 2))),
                                             SMALL["spline_coupling"])
    # Internal coordinates: a branched molecule with hydrogens (C0 bonded to C1, N2, O3; a
    # methylene, an NH and an OH) and a three-membered ring with one hydrogen per carbon.
    cases["internal_coordinates-branched"] = Case("internal_coordinates", MoleculeLayout(
        8, ("C", "C", "N", "O", "H", "H", "H", "H"),
        ((0, 1), (0, 2), (0, 3), (3, 4), (1, 5), (1, 6), (2, 7))), IC_SMALL)
    cases["internal_coordinates-ring"] = Case("internal_coordinates", MoleculeLayout(
        6, ("C", "C", "C", "H", "H", "H"), ((0, 1), (1, 2), (2, 0), (0, 3), (1, 4), (2, 5))),
        IC_SMALL)
    # Continuous flows, solved to 1e-9 (their maps are exact only to the solver tolerance).
    cases["egnn_cnf-particles"] = Case("egnn_cnf", ParticleLayout(4, 2, True), CNF_SMALL)
    cases["hollow_cnf-particles"] = Case("hollow_cnf", ParticleLayout(5, 3, True), CNF_SMALL)
    cases["mlp_cnf-vector3"] = Case("mlp_cnf", VectorLayout(3), CNF_SMALL)
    # The coarse-grained latent model: one slow variable (a free spline), and two (couplings).
    cases["coarse_grained-slow1"] = Case("coarse_grained", VectorLayout(3, slow_dim=1),
                                         SMALL["coarse_grained"])
    cases["coarse_grained-slow2"] = Case("coarse_grained", VectorLayout(4, slow_dim=2),
                                         SMALL["coarse_grained"])
    # On a molecule: the branched one above with two slow torsions, about C0–N2 (carried by
    # H7's entry) and C0–O3 (H4's), the rest through the internal-coordinate map.
    cases["coarse_grained-molecule"] = Case("coarse_grained", MoleculeLayout(
        8, ("C", "C", "N", "O", "H", "H", "H", "H"),
        ((0, 1), (0, 2), (0, 3), (3, 4), (1, 5), (1, 6), (2, 7)),
        slow_torsions=((1, 0, 2, 7), (1, 0, 3, 4))),
        {k: v for k, v in SMALL["coarse_grained"].items() if k != "bound"})
    # ... and with its fast variables mixed by a learnable linear map (fast_linear).
    cases["coarse_grained-molecule-fast-linear"] = Case(
        "coarse_grained", cases["coarse_grained-molecule"].layout,
        {**cases["coarse_grained-molecule"].settings, "fast_linear": True})
    return cases


CASES: dict[str, Case] = {
    **_euclidean_cases(),
    "rigid_double_mobius_box": Case("rigid_body", WITH_BOX, {
        "rotation_layer": "double_mobius", "position_layer": "circle_mobius", "n_blocks": 2,
        **RIGID_SMALL, "attention_blocks": 1, "mixture_components": 3}, flip_equivariant=True),
    "rigid_convex_gradient_box": Case("rigid_body", WITH_BOX, {
        "rotation_layer": "convex_gradient", "position_layer": "circular_spline", "n_blocks": 1,
        **RIGID_SMALL, "attention_blocks": 1, "convex_terms": 6}, flip_equivariant=True),
    "rigid_double_mobius_single_body": Case("rigid_body", RigidLayout(1), {
        "rotation_layer": "double_mobius", "n_blocks": 2, **RIGID_SMALL,
        "rotation_layers_per_block": 2}, flip_equivariant=True),
    # The tetrahedron spec's convex-gradient flow: one body, a near-polyhedral potential (m = 8).
    "rigid_convex_gradient_exponent_8": Case("rigid_body", RigidLayout(1), {
        "rotation_layer": "convex_gradient", "n_blocks": 2, **RIGID_SMALL, "convex_terms": 6,
        "convex_exponent": 8}, flip_equivariant=True),
    "rigid_double_mobius_complex_centres": Case("rigid_body", RigidLayout(1), {
        "rotation_layer": "double_mobius", "n_blocks": 2, **RIGID_SMALL,
        "mixture_components": 3, "axial_layer": "axial_circle_mobius"}, flip_equivariant=True),
    "rigid_thermal_scaling_box": Case("rigid_body", WITH_BOX, {
        "rotation_layer": "double_mobius", "n_blocks": 1, **RIGID_SMALL, "attention_blocks": 1,
        "thermal_scaling": True}, flip_equivariant=True),
    "rotation_vector_spline": Case("rotation_vector_spline", NO_BOX,
                                   {"n_layers": 2, "hidden": 8}),
}
EUCLIDEAN = [key for key, case in CASES.items() if not case.rigid]
INTERNAL = [key for key, case in CASES.items() if case.internal]
IC_FLOWS = [key for key, case in CASES.items() if case.kind == "internal_coordinates"]


def test_every_flow_kind_and_layout_kind_has_a_case() -> None:
    """A flow or layout registered without a case here fails this test (add one to CASES)."""
    assert {case.kind for case in CASES.values()} == set(FLOWS)
    assert {case.layout.kind for case in CASES.values()} == set(LAYOUTS)
    for kind, cls in FLOWS.items():
        assert issubclass(cls, Flow), kind
        assert cls.accepts and set(cls.accepts) <= set(LAYOUTS), kind
        assert isinstance(cls.needs_autograd_for_sampling, bool), kind
        assert isinstance(cls.takes_context, bool), kind
        assert isinstance(cls.owns_prior, bool), kind
    for case in CASES.values():
        flow = case.fresh()
        assert flow.latent_dim == case.latent_dim and flow.prior.dim == case.latent_dim
        # A latent space of another size is always the flow's own (the coarse-grained model
        # owns a prior of the layout's size).
        assert flow.owns_prior or case.latent_dim == case.layout.dim


# -- maps and log-dets ----------------------------------------------------------------------


def distance(case: Case, a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest coordinate difference; rotations up to sign, positions modulo the box."""
    if not case.rigid:
        return float((a - b).detach().abs().max())
    layout = case.layout
    pa, qa = layout.split(a.detach())
    pb, qb = layout.split(b.detach())
    out = float(torch.minimum((qa - qb).abs().amax(-1), (qa + qb).abs().amax(-1)).max())
    if pa is not None:
        edges = BOX.tensor(pa)
        wrapped = torch.remainder(pa - pb + edges / 2, edges) - edges / 2
        out = max(out, float(wrapped.abs().max()))
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_round_trip_and_inverse_log_det(key: str) -> None:
    case = CASES[key]
    flow = case.flow()
    x = case.points(16)
    y, log_det = flow(x)
    x_back, log_det_inv = flow.inverse(y)
    unmoved = case.fresh()(x)[0] if case.internal else x  # the (near-)identity start
    assert distance(case, y, unmoved) > 1e-3, "the perturbed flow should not be the start"
    assert distance(case, x_back, x) <= case.round_trip_atol
    assert (log_det + log_det_inv).abs().max() <= case.round_trip_atol
    # and the other way round (internal coordinates: from the canonical frame)
    target = case.targets(16)
    x_in, log_det_in = flow.inverse(target)
    y2, log_det2 = flow(x_in)
    assert distance(case, y2, target) <= case.round_trip_atol
    assert (log_det2 + log_det_in).abs().max() <= case.round_trip_atol
    if case.rigid and case.layout.pinned_positions:
        positions, _ = case.layout.split(x)
        back, _ = case.layout.split(x_back)
        for body in case.layout.pinned_positions:
            assert torch.equal(back[:, body], positions[:, body])  # pinned: untouched


def tangent_frame(case: Case, point: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (dim, d) of the tangent space at ``point``: the identity for
    Euclidean coordinates and positions, q⊗i, q⊗j, q⊗k for every quaternion."""
    if not case.rigid:
        return torch.eye(point.numel(), dtype=point.dtype)
    positions, q = case.layout.split(point)
    blocks = [] if positions is None else [torch.eye(positions.numel(), dtype=point.dtype)]
    return torch.block_diag(*blocks, *[tangent_basis(qi) for qi in q])


def frame_log_det(case: Case, fn: Callable, point: torch.Tensor, inverse: bool
                  ) -> torch.Tensor:
    """Internal coordinates: log|det| of the autograd Jacobian between the latent and the
    3n − 6 frame coordinates of the canonical frame, ± ln(x_b² y_c) (the quotient measure's
    density in frame coordinates; + forward, − inverse)."""
    zmatrix = ZMatrix.from_layout(case.layout)
    n = case.layout.n_atoms
    if inverse:  # point: Cartesian (3n,) in the canonical frame
        cartesian = point.reshape(n, 3)
        jac = torch.autograd.functional.jacobian(
            lambda f: fn(zmatrix.from_frame_coordinates(f).reshape(1, 3 * n))[0][0],
            zmatrix.frame_coordinates(cartesian))
    else:
        cartesian = fn(point[None])[0][0].reshape(n, 3)
        jac = torch.autograd.functional.jacobian(
            lambda v: zmatrix.frame_coordinates(fn(v[None])[0][0].reshape(n, 3)), point)
    sign, log_abs_det = torch.linalg.slogdet(jac)
    assert sign != 0
    correction = zmatrix.log_frame_volume(cartesian)
    return log_abs_det - correction if inverse else log_abs_det + correction


def projected_log_det(case: Case, fn: Callable, point: torch.Tensor) -> torch.Tensor:
    """log|det E_outᵀ J E_in| of one point's autograd Jacobian J of the embedded map."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0][0], point)
    image = fn(point[None])[0][0]
    frame_in, frame_out = tangent_frame(case, point), tangent_frame(case, image)
    sign, log_abs_det = torch.linalg.slogdet(frame_out.T @ jac @ frame_in)
    assert sign != 0
    return log_abs_det


@pytest.mark.parametrize("key", list(CASES))
@pytest.mark.parametrize("inverse", [False, True])
def test_log_det_matches_autograd_jacobian(key: str, inverse: bool) -> None:
    """Three ordinary points and, for Euclidean flows, two wide ones (spline tails)."""
    case = CASES[key]
    flow = case.flow(seed=3)
    points = case.points(3, seed=4)
    if not case.rigid:
        points = torch.cat([points, case.points(2, seed=7, spread=2.5)])
    if inverse:  # points on the target side
        points = flow(points)[0].detach()
    fn = flow.inverse if inverse else flow
    for point in points:
        reference = (frame_log_det(case, fn, point, inverse) if case.internal
                     else projected_log_det(case, fn, point))
        assert (fn(point[None])[1][0] - reference).abs() <= case.log_det_atol


@pytest.mark.parametrize("key", list(CASES))
def test_gradients_reach_every_parameter(key: str) -> None:
    case = CASES[key]
    flow = case.flow(seed=5)
    x = case.points(32)
    g = torch.Generator().manual_seed(9)
    y, log_det = flow(x)
    x_back, log_det_inv = flow.inverse(case.targets(32))
    weights = torch.randn(y.shape, generator=g, dtype=torch.float64)
    weights_back = weights if x_back.shape == y.shape else torch.randn(
        x_back.shape, generator=g, dtype=torch.float64)
    loss = (log_det.sum() + log_det_inv.sum() + (torch.sin(y) * weights).sum()
            + (torch.sin(x_back) * weights_back).sum())
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("key", list(CASES))
def test_state_dict_round_trip_gives_the_same_flow(key: str, tmp_path) -> None:
    case = CASES[key]
    flow = case.flow(seed=6)
    x = case.points(8)
    y, log_det = flow(x)
    x_back, log_det_inv = flow.inverse(y)
    torch.save(flow.state_dict(), tmp_path / "flow.pt")
    clone = case.fresh(seed=123)
    clone.load_state_dict(torch.load(tmp_path / "flow.pt", weights_only=True))
    for got, want in zip((*clone(x), *clone.inverse(y)), (y, log_det, x_back, log_det_inv),
                         strict=True):
        assert torch.equal(got, want)


# -- context, prior, sampling, dtypes -------------------------------------------------------


@pytest.mark.parametrize("key", list(CASES))
def test_context_none_is_accepted_and_a_context_refused(key: str) -> None:
    """No flow here is conditional: context=None is the plain map, and a context raises
    ValueError naming the argument (never silently ignored)."""
    case = CASES[key]
    flow = case.flow()
    assert not flow.takes_context
    x, target = case.points(4), case.targets(4)
    for got, want in zip((*flow(x, context=None), *flow.inverse(target, None)),
                         (*flow(x), *flow.inverse(target)), strict=True):
        assert torch.equal(got, want)
    context = torch.zeros(4, 2, dtype=torch.float64)
    for call in (lambda: flow(x, context), lambda: flow.inverse(target, context=context),
                 lambda: flow.log_prob(target, context=context),
                 lambda: flow.sample_and_log_prob(4, context)):
        with pytest.raises(ValueError, match=r"context: \w+ takes no context; pass None"):
            call()


@pytest.mark.parametrize("key", list(CASES))
def test_prior_and_sample_and_log_prob(key: str) -> None:
    """The flow owns its prior (Gaussian N(0, I) on Euclidean layouts, uniform on rigid
    ones, N(0, I) × uniform torsions on internal coordinates, uniform slow × N(0, I) fast
    variables for the coarse-grained model); ``sample_and_log_prob`` pushes
    the prior's draws (same generator, same numbers) forward with log q = log p(x) − log|det J|,
    which ``log_prob`` of the samples reproduces; under ``sampling_context`` nothing needs
    grad."""
    case = CASES[key]
    flow = case.flow()
    expected = (SlowFastPrior if case.kind == "coarse_grained" else InternalCoordinatePrior
                if case.internal else UniformRigidPrior if case.rigid else GaussianPrior)
    assert isinstance(flow.prior, expected) and flow.prior.dim == case.latent_dim
    assert flow.prior in list(flow.modules()) and not list(flow.prior.state_dict())
    # A continuous flow differentiates inside its map (the exact divergence).
    assert flow.needs_autograd_for_sampling is case.continuous
    with flow.sampling_context():
        y, log_q = flow.sample_and_log_prob(64, generator=torch.Generator().manual_seed(4))
    assert not y.requires_grad and not log_q.requires_grad
    assert y.shape == (64, case.layout.dim) and log_q.shape == (64,)
    assert y.dtype == log_q.dtype == torch.float64
    x = flow.prior.sample(64, torch.Generator().manual_seed(4))
    y_ref, log_det = flow(x)
    # A CNF solved while keeping its graph may round differently (ulps) from one that keeps none.
    same = (lambda a, b: bool((a - b).abs().max() <= 1e-12)) if case.continuous else torch.equal
    assert same(y, y_ref.detach())
    assert same(log_q, (flow.prior.log_prob(x) - log_det).detach())
    with torch.no_grad():
        assert (flow.log_prob(y) - log_q).abs().max() <= 10 * case.round_trip_atol
    torch.testing.assert_close(flow.prior.reduced_energy(x), -flow.prior.log_prob(x))
    with flow.sampling_context():
        assert torch.equal(flow.sample(64, generator=torch.Generator().manual_seed(4)), y)


@pytest.mark.parametrize("key", list(CASES))
def test_float64_and_input_checks(key: str) -> None:
    case = CASES[key]
    flow = case.flow()
    assert all(p.dtype == torch.float64 for p in flow.parameters())
    x = case.points(3)
    y, log_det = flow(x)
    assert y.dtype == log_det.dtype == torch.float64 and log_det.shape == (3,)
    with pytest.raises(TypeError, match="float64"):
        flow(x.float())
    with pytest.raises(ValueError, match=r"x: shape \(3, 5\)"):
        flow(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        flow.inverse(case.targets(3).float())
    if case.rigid:
        positions, q = case.layout.split(x)
        with pytest.raises(ValueError, match=r"x \(quaternions\): a quaternion has norm 1\.1"):
            flow(case.layout.join(positions, q * 1.1))
        bad = x.clone()
        bad[0, -1] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            flow.inverse(bad)
    else:
        with pytest.raises(ValueError, match=r"y: shape \(3, 5\)"):
            flow.inverse(torch.zeros(3, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="n_layers"):
            build_flow(case.layout, {"kind": case.kind, "n_layers": 2.5})
        with pytest.raises(TypeError, match="n_layers"):
            FLOWS[case.kind](case.layout, n_layers=2.5)


# -- Euclidean flows: identity start and batch shapes ---------------------------------------


@pytest.mark.parametrize("key", [key for key in EUCLIDEAN if key not in INTERNAL])
def test_identity_at_initialisation(key: str) -> None:
    case = CASES[key]
    flow = build_flow(case.layout, {"kind": case.kind, "n_layers": 3, "hidden": 8})
    x = case.points(10)
    x[0] = 10.0  # in the spline's tails (default bound 5)
    y, logdet = flow(x)
    assert y.dtype == torch.float64 and logdet.shape == (10,)
    atol = IDENTITY_ATOL[case.kind]
    torch.testing.assert_close(y, x, rtol=0, atol=atol)
    torch.testing.assert_close(logdet, x.new_zeros(10), rtol=0, atol=atol)
    x_back, logdet_inv = flow.inverse(x)
    torch.testing.assert_close(x_back, x, rtol=0, atol=atol)
    torch.testing.assert_close(logdet_inv, x.new_zeros(10), rtol=0, atol=atol)


@pytest.mark.parametrize("key", EUCLIDEAN)
def test_batch_shapes(key: str) -> None:
    case = CASES[key]
    flow = case.flow(seed=6)
    dim, latent = case.layout.dim, case.latent_dim
    x = case.points(12).reshape(3, 4, latent)
    y, logdet = flow(x)
    assert y.shape == (3, 4, dim) and logdet.shape == (3, 4)
    x_back, logdet_inv = flow.inverse(y)
    assert x_back.shape == (3, 4, latent) and logdet_inv.shape == (3, 4)
    flat_y, flat_logdet = flow(x.reshape(12, latent))
    torch.testing.assert_close(y.reshape(12, dim), flat_y, rtol=0, atol=1e-14)
    torch.testing.assert_close(logdet.reshape(12), flat_logdet, rtol=0, atol=1e-12)


# -- rigid flows: S³ sign flips -------------------------------------------------------------


@pytest.mark.parametrize("key", [k for k, c in CASES.items() if c.flip_equivariant])
def test_flip_equivariance(key: str) -> None:
    """f(−q) = −f(q) body by body with the same log-det and positions."""
    case = CASES[key]
    flow = case.flow()
    layout = case.layout
    x = case.points(6)
    positions, q = layout.split(x)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    signs = signs[:, None].expand(6, layout.n_bodies).clone()
    signs[:, -1] *= -1
    y, ld = flow(x)
    y_flip, ld_flip = flow(layout.join(positions, q * signs[..., None]))
    p_out, q_out = layout.split(y)
    p_flip, q_flip = layout.split(y_flip)
    assert (q_flip - q_out * signs[..., None]).abs().max() <= 1e-10
    assert (ld_flip - ld).abs().max() <= 1e-9
    if p_out is not None:
        assert (p_flip - p_out).abs().max() <= 1e-10


def test_flip_equivariance_covers_every_rigid_flow_but_the_baseline() -> None:
    """Every S³ flow is flip-equivariant; only the rotation-vector baseline is exempt (it
    ignores the double cover by design and returns canonical signs)."""
    exempt = {c.kind for c in CASES.values() if c.rigid and not c.flip_equivariant}
    assert exempt == {"rotation_vector_spline"}


# -- building and checkpoints ---------------------------------------------------------------


def test_build_flow_names_the_flows_that_suit_the_layout() -> None:
    with pytest.raises(ValueError, match=r"flow\.kind: 'rigid_body' needs a rigid-body system, "
                       r"but this system's coordinates are 4 particles in 2-D, centre of mass "
                       r"removed; choose one of affine_coupling, spline_coupling, egnn_cnf, "
                       r"hollow_cnf, mlp_cnf$"):
        build_flow(ParticleLayout(4, 2, True), {"kind": "rigid_body"})
    # The equivariant CNFs need particles without their centre of mass (bad input of issue 22).
    with pytest.raises(ValueError, match=r"flow\.kind: 'egnn_cnf' needs particles with the "
                       r"centre of mass removed \(dw4, lj\), but this system's coordinates are "
                       r"a vector in R\^6; choose one of affine_coupling, spline_coupling, "
                       r"mlp_cnf$"):
        build_flow(6, {"kind": "egnn_cnf"})
    with pytest.raises(ValueError, match=r"flow\.kind: 'hollow_cnf' needs particles .* "
                       r"rigid bodies \(torus × S³\); choose one of rigid_body, "
                       r"rotation_vector_spline$"):
        build_flow(WITH_BOX, {"kind": "hollow_cnf"})
    with pytest.raises(ValueError, match=r"flow\.kind: 'spline_coupling' acts on R\^dim, but "
                       r"this system's coordinates are rigid bodies \(torus × S³\); choose one "
                       r"of rigid_body, rotation_vector_spline$"):
        build_flow(WITH_BOX, {"kind": "spline_coupling"})
    with pytest.raises(ValueError, match=r"flow\.kind: 'glow' is not a known flow; choose one "
                       r"of affine_coupling, spline_coupling, rigid_body, rotation_vector_spline"):
        build_flow(3, {"kind": "glow"})
    with pytest.raises(ValueError, match=r"flow\.layout: the rotation-vector baseline"):
        build_flow(WITH_BOX, {"kind": "rotation_vector_spline"})
    with pytest.raises(ValueError, match=r"layout: AffineCouplingFlow acts on R\^dim; this "
                       r"layout is rigid bodies \(S³\)"):
        FLOWS["affine_coupling"](NO_BOX)


@pytest.mark.parametrize("key", ["affine_coupling-particles", "rigid_double_mobius_box"])
def test_checkpoints_store_layout_and_prior_and_older_ones_load(key: str) -> None:
    """``load_flow`` rebuilds the flow, its layout and its prior from a checkpoint; one saved
    before layouts and priors were stored takes its system's layout (or R^dim) and the prior
    given (or the layout's default); one with neither layout, system nor dim is refused."""
    import io

    from boltzgen.pipeline import load_flow
    from boltzgen.priors import prior_from_dict

    case = CASES[key]
    flow = case.flow()
    prior = prior_from_dict(case.layout, {"kind": "gaussian", "scale": 2.0} if not case.rigid
                            else {"kind": "uniform"})
    flow.prior = prior
    settings = {"kind": case.kind, **case.settings}
    system = {"kind": "dw4"} if not case.rigid else None

    def saved(**extra) -> bytes:
        buffer = io.BytesIO()
        torch.save({"state_dict": flow.state_dict(), "flow_config": settings, **extra}, buffer)
        return buffer.getvalue()

    x = case.points(4)
    y, log_det = flow(x)
    current = load_flow(saved(dim=case.layout.dim, layout=case.layout.to_dict(),
                              prior=prior.to_dict()))
    assert current.layout == case.layout and current.prior.to_dict() == prior.to_dict()
    assert not current.training
    for got, want in zip(current(x), (y, log_det), strict=True):
        assert torch.equal(got, want)
    if system is not None:  # before layouts: the system's (DW4: its particle layout)
        old = load_flow(saved(dim=6, system=system), prior=prior)
        assert old.layout == case.layout and old.prior is prior
        oldest = load_flow(saved(dim=6))
        assert oldest.layout == VectorLayout(6) and oldest.prior.to_dict() == {
            "kind": "gaussian", "scale": 1.0}
        assert torch.equal(oldest(x)[0], y)
    with pytest.raises(ValueError, match="checkpoint: it holds neither a layout nor a system"):
        load_flow(saved())


@pytest.mark.parametrize("key", IC_FLOWS)
def test_checkpoints_of_a_flow_that_owns_its_prior_restore_it(key: str) -> None:
    """The flow's own prior (registered, from its ``to_dict``) and its fitted buffers come back
    from a checkpoint; a base prior passed to ``load_flow`` (a checkpoint without a prior)
    does not replace it."""
    import io

    from boltzgen.pipeline import load_flow

    case = CASES[key]
    flow = case.flow()
    assert flow.owns_prior and flow.prior.to_dict() == {"kind": "internal_coordinates"}

    def saved(**extra) -> bytes:
        buffer = io.BytesIO()
        torch.save({"state_dict": flow.state_dict(), "flow_config": {"kind": case.kind,
                                                                     **case.settings},
                    "layout": case.layout.to_dict(), **extra}, buffer)
        return buffer.getvalue()

    x = case.points(4)
    y, log_det = flow(x)
    for loaded in (load_flow(saved(prior=flow.prior.to_dict())),
                   load_flow(saved(), prior=GaussianPrior(case.layout))):
        assert isinstance(loaded.prior, InternalCoordinatePrior) and loaded.layout == case.layout
        for name, buffer in flow.named_buffers():
            assert torch.equal(dict(loaded.named_buffers())[name], buffer), name
        for got, want in zip(loaded(x), (y, log_det), strict=True):
            assert torch.equal(got, want)


def test_a_flow_that_needs_autograd_is_sampled_with_gradients_on() -> None:
    """``sampling_context`` is ``no_grad`` for today's flows and a null context for a flow that
    declares ``needs_autograd_for_sampling``; the sampling stage's batches come back detached."""
    from boltzgen.flows import AffineCouplingFlow
    from boltzgen.pipeline.sampling import _batched

    class AutogradFlow(AffineCouplingFlow):
        needs_autograd_for_sampling = True

        def _run(self, x, name, inverse):
            assert torch.is_grad_enabled()
            x = x.detach().requires_grad_(True)  # e.g. an exact divergence by autograd
            y, log_det = super()._run(x, name, inverse)
            torch.autograd.grad(y.sum(), x, retain_graph=True)
            return y, log_det

    flow = AutogradFlow(2, n_layers=2, hidden=4)
    with flow.sampling_context():
        y, log_det = _batched(flow.forward, torch.zeros(5, 2, dtype=torch.float64), 2)
        y_q, log_q = flow.sample_and_log_prob(3)
    assert not y.requires_grad and not log_det.requires_grad and y.shape == (5, 2)
    assert y_q.requires_grad and log_q.shape == (3,)
    with CASES["affine_coupling-vector2"].flow().sampling_context():
        assert not torch.is_grad_enabled()
