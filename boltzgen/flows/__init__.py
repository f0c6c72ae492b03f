"""Normalizing flows and their construction from a config mapping.

``build_flow(dim, {"kind": "affine_coupling", "n_layers": 8})``; every error names the config
field (``flow.kind``, ``flow.<param>``), shows the value and lists what is allowed.

Kinds on R^dim: ``affine_coupling`` (RealNVP, :mod:`boltzgen.flows.coupling`) and
``spline_coupling`` (rational-quadratic neural spline flow, :mod:`boltzgen.flows.spline`).
Kinds for rigid-body systems, which need the system's :class:`boltzgen.rigid.bodies.RigidLayout`:
``rigid_body`` (torus × S³ coupling flow, :mod:`boltzgen.flows.rigid`) and
``rotation_vector_spline`` (the baseline that ignores the double cover,
:mod:`boltzgen.flows.rotation_baseline`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn

from boltzgen.flows.coupling import AffineCouplingFlow
from boltzgen.flows.rigid import RigidBodyFlow
from boltzgen.flows.rotation_baseline import RotationVectorSplineFlow
from boltzgen.flows.spline import SplineCouplingFlow
from boltzgen.rigid.bodies import RigidLayout

_FLOWS: dict[str, type[nn.Module]] = {
    "affine_coupling": AffineCouplingFlow,
    "spline_coupling": SplineCouplingFlow,
    "rigid_body": RigidBodyFlow,
    "rotation_vector_spline": RotationVectorSplineFlow,
}
FLOW_KINDS: list[str] = list(_FLOWS)
RIGID_FLOW_KINDS: list[str] = [k for k, c in _FLOWS.items() if getattr(c, "needs_layout", False)]
EUCLIDEAN_FLOW_KINDS: list[str] = [k for k in FLOW_KINDS if k not in RIGID_FLOW_KINDS]

__all__ = [
    "EUCLIDEAN_FLOW_KINDS",
    "FLOW_KINDS",
    "RIGID_FLOW_KINDS",
    "AffineCouplingFlow",
    "RigidBodyFlow",
    "RotationVectorSplineFlow",
    "SplineCouplingFlow",
    "build_flow",
    "flow_parameter_names",
]


def _flow_class(kind: object) -> type[nn.Module]:
    if not isinstance(kind, str) or kind not in _FLOWS:
        raise ValueError(
            f"flow.kind: {kind!r} is not a known flow; choose one of {', '.join(FLOW_KINDS)}"
        )
    return _FLOWS[kind]


def flow_parameter_names(kind: str) -> list[str]:
    """Config parameters of flow ``kind`` (its constructor's arguments other than ``dim``)."""
    sig = inspect.signature(_flow_class(kind).__init__)
    return [name for name in sig.parameters if name not in ("self", "dim", "layout")]


def build_flow(dim: int, config: Mapping, layout: RigidLayout | None = None) -> nn.Module:
    """Build a float64 flow from ``{"kind": <name>, <param>: <value>, ...}``.

    Flows on R^dim take ``dim``; rigid-body flows take the system's ``layout`` (whose ``dim``
    must equal ``dim``). Unknown kind, unknown parameter, a rigid flow without a layout, a
    Euclidean flow for a rigid-body system or a bad value raise ValueError naming the field.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"flow: expected a mapping with a 'kind' key, got {type(config)}")
    if "kind" not in config:
        raise ValueError(f"flow.kind: missing; choose one of {', '.join(FLOW_KINDS)}")
    cls = _flow_class(config["kind"])
    allowed = flow_parameter_names(config["kind"])
    params = {k: v for k, v in config.items() if k != "kind"}
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"flow.{key}: not a parameter of flow {config['kind']!r}; "
                f"allowed: {', '.join(allowed)}"
            )
    rigid = getattr(cls, "needs_layout", False)
    if rigid and layout is None:
        raise ValueError(f"flow.kind: {config['kind']!r} needs a rigid-body system; choose one "
                         f"of {', '.join(EUCLIDEAN_FLOW_KINDS)}")
    if not rigid and layout is not None:
        raise ValueError(f"flow.kind: {config['kind']!r} acts on R^dim, but this system's "
                         "coordinates are rigid bodies (torus × S³); choose one of "
                         f"{', '.join(RIGID_FLOW_KINDS)}")
    try:
        if rigid:
            return cls(layout, **params)
        return cls(dim, **params)
    except (TypeError, ValueError) as err:
        prefix = "" if str(err).startswith("dim:") else "flow."
        raise ValueError(f"{prefix}{err}") from err

