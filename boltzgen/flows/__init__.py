"""Normalizing flows and their construction from a config mapping.

``build_flow(dim, {"kind": "affine_coupling", "n_layers": 8})``; every error names the config
field (``flow.kind``, ``flow.<param>``), shows the value and lists what is allowed.

Kinds: ``affine_coupling`` (RealNVP, :mod:`boltzgen.flows.coupling`) and ``spline_coupling``
(rational-quadratic neural spline flow, :mod:`boltzgen.flows.spline`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn

from boltzgen.flows.coupling import AffineCouplingFlow
from boltzgen.flows.spline import SplineCouplingFlow

_FLOWS: dict[str, type[nn.Module]] = {
    "affine_coupling": AffineCouplingFlow,
    "spline_coupling": SplineCouplingFlow,
}
FLOW_KINDS: list[str] = list(_FLOWS)

__all__ = [
    "FLOW_KINDS",
    "AffineCouplingFlow",
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
    return [name for name in sig.parameters if name not in ("self", "dim")]


def build_flow(dim: int, config: Mapping) -> nn.Module:
    """Build a float64 flow on R^dim from ``{"kind": <name>, <param>: <value>, ...}``.

    Unknown kind, unknown parameter or a bad value raise ValueError naming the field.
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
    try:
        return cls(dim, **params)
    except (TypeError, ValueError) as err:
        prefix = "" if str(err).startswith("dim:") else "flow."
        raise ValueError(f"{prefix}{err}") from err
