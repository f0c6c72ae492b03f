"""Normalizing flows: the registry of flow kinds and their construction for a layout.

``build_flow(system.layout(), {"kind": "affine_coupling", "n_layers": 8})``; every error names
the config field (``flow.kind``, ``flow.<param>``), shows the value and lists what is allowed.
Every flow follows one contract (:mod:`boltzgen.flows.contract`): ``forward`` / ``inverse``
with log-dets, a prior it owns, ``sample_and_log_prob``, the layout kinds it accepts.

Kinds for Euclidean layouts (a vector, particles, a molecule; the coordinates as R^dim):
``affine_coupling`` (RealNVP, :mod:`boltzgen.flows.coupling`) and ``spline_coupling``
(rational-quadratic neural spline flow, :mod:`boltzgen.flows.spline`). Kinds for rigid-body
layouts (:class:`boltzgen.rigid.bodies.RigidLayout`): ``rigid_body`` (torus × S³ coupling flow,
:mod:`boltzgen.flows.rigid`) and ``rotation_vector_spline`` (the baseline that ignores the
double cover, :mod:`boltzgen.flows.rotation_baseline`). For a molecule with bonds:
``internal_coordinates`` (a Boltzmann generator on the Z-matrix's bonds, angles and torsions,
:mod:`boltzgen.flows.internal`; it owns its prior on the 3n − 6 internal coordinates).
Continuous flows (:mod:`boltzgen.flows.cnf`, trained by flow matching or likelihood):
``egnn_cnf`` and ``hollow_cnf`` (equivariant fields, centre-of-mass-free particles) and
``mlp_cnf`` (the non-equivariant baseline, any Euclidean layout). For data-free training
(Stupp & Koutsourelakis 2025): ``coarse_grained``, slow variables with a spline density, fast
ones Gaussian given them and a learnable linear map to the coordinates, or for a molecule
the internal-coordinate map with its slow torsions (φ, ψ) on a torus
(:mod:`boltzgen.flows.coarse_grained`; systems that declare slow variables). A new
kind: a :class:`Flow` subclass and one ``FLOWS.register(kind)(cls)`` line here (and a case in
tests/test_flow_conformance.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from boltzgen.flows.cnf import MLPCNF, ContinuousFlow, EquivariantCNF, HollowCNF
from boltzgen.flows.coarse_grained import CoarseGrainedFlow
from boltzgen.flows.contract import FLOWS, Flow
from boltzgen.flows.coupling import AffineCouplingFlow
from boltzgen.flows.internal import InternalCoordinateFlow
from boltzgen.flows.rigid import RigidBodyFlow
from boltzgen.flows.rotation_baseline import RotationVectorSplineFlow
from boltzgen.flows.spline import SplineCouplingFlow
from boltzgen.layouts import Layout, VectorLayout, as_layout
from boltzgen.rigid.bodies import RigidLayout

FLOWS.register("affine_coupling")(AffineCouplingFlow)
FLOWS.register("spline_coupling")(SplineCouplingFlow)
FLOWS.register("rigid_body")(RigidBodyFlow)
FLOWS.register("rotation_vector_spline")(RotationVectorSplineFlow)
FLOWS.register("internal_coordinates")(InternalCoordinateFlow)
FLOWS.register("egnn_cnf")(EquivariantCNF)
FLOWS.register("hollow_cnf")(HollowCNF)
FLOWS.register("mlp_cnf")(MLPCNF)
FLOWS.register("coarse_grained")(CoarseGrainedFlow)

FLOW_KINDS: list[str] = FLOWS.names()
RIGID_FLOW_KINDS: list[str] = [k for k, c in FLOWS.items() if c.accepts_layout(RigidLayout(1))]
EUCLIDEAN_FLOW_KINDS: list[str] = [k for k, c in FLOWS.items()
                                   if c.accepts_layout(VectorLayout(2))]

__all__ = [
    "EUCLIDEAN_FLOW_KINDS",
    "FLOWS",
    "FLOW_KINDS",
    "RIGID_FLOW_KINDS",
    "AffineCouplingFlow",
    "CoarseGrainedFlow",
    "ContinuousFlow",
    "EquivariantCNF",
    "HollowCNF",
    "MLPCNF",
    "Flow",
    "InternalCoordinateFlow",
    "RigidBodyFlow",
    "RotationVectorSplineFlow",
    "SplineCouplingFlow",
    "build_flow",
    "flow_kinds_for",
    "flow_parameter_names",
]


def flow_parameter_names(kind: str) -> list[str]:
    """Config parameters of flow ``kind`` (its constructor's arguments other than the layout)."""
    sig = inspect.signature(FLOWS.get(kind, "flow.kind").__init__)
    return [name for name in sig.parameters if name not in ("self", "dim", "layout")]


def flow_kinds_for(layout: Layout) -> list[str]:
    """The flow kinds that accept ``layout``, in registry order."""
    return [kind for kind, cls in FLOWS.items() if cls.accepts_layout(layout)]


def build_flow(layout: Layout | int, settings: Mapping) -> Flow:
    """Build a float64 flow for ``layout`` from ``{"kind": <name>, <param>: <value>, ...}``.

    ``layout``: the system's (:meth:`boltzgen.systems.base.System.layout`), or an int for a
    plain vector in R^dim. Unknown kind, unknown parameter, a flow that does not accept the
    layout (e.g. "flow.kind: 'rigid_body' needs a rigid-body system, but ...; choose one of
    ...") or a bad value raise ValueError naming the field. The flow's prior is the layout's
    default (:func:`boltzgen.priors.default_prior`); assign ``flow.prior`` to change it.
    """
    layout = as_layout(layout)
    if not isinstance(settings, Mapping):
        raise TypeError(f"flow: expected a mapping with a 'kind' key, got {type(settings)}")
    if "kind" not in settings:
        raise ValueError(f"flow.kind: missing; choose one of {', '.join(FLOWS)}")
    kind = settings["kind"]
    cls = FLOWS.get(kind, "flow.kind")
    allowed = flow_parameter_names(kind)
    params = {k: v for k, v in settings.items() if k != "kind"}
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"flow.{key}: not a parameter of flow {kind!r}; allowed: {', '.join(allowed)}"
            )
    if not cls.accepts_layout(layout):
        raise ValueError(f"flow.kind: {kind!r} {cls.layout_requirement}, but this system's "
                         f"coordinates are {layout.description}; choose one of "
                         f"{', '.join(flow_kinds_for(layout))}")
    try:
        return cls(layout, **params)
    except (TypeError, ValueError) as err:
        prefix = "" if str(err).startswith("dim:") else "flow."
        raise ValueError(f"{prefix}{err}") from err
