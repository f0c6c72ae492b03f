"""Registry of systems and construction from a config mapping.

``make_system({"kind": "double_well", "a": 0.25})`` builds a system; every error names the
config field (``system.kind``, ``system.<param>``), shows the value and lists what is allowed.
:data:`SYSTEMS` is a :class:`boltzgen.registry.Registry` (a mapping kind -> class); a new
system is one ``SYSTEMS.register(kind)(cls)`` line here.
"""

from __future__ import annotations

from collections.abc import Mapping

from boltzgen.registry import Registry
from boltzgen.systems.base import System
from boltzgen.systems.double_well import DoubleWell2D
from boltzgen.systems.dw4 import DW4
from boltzgen.systems.gaussian_mixture import GaussianMixture
from boltzgen.systems.ice import IceXI
from boltzgen.systems.lennard_jones import LennardJonesCluster
from boltzgen.systems.particles import ParticleSystem
from boltzgen.systems.peptide import PeptideSystem
from boltzgen.systems.tetrahedron import TetrahedronInField

SYSTEMS: Registry[System] = Registry("system", field="system.kind")
SYSTEMS.register("double_well")(DoubleWell2D)
SYSTEMS.register("dw4")(DW4)
SYSTEMS.register("tetrahedron_field")(TetrahedronInField)
SYSTEMS.register("ice_xi")(IceXI)
SYSTEMS.register("peptide")(PeptideSystem)
SYSTEMS.register("lj")(LennardJonesCluster)
SYSTEMS.register("gaussian_mixture")(GaussianMixture)

__all__ = [
    "DW4",
    "SYSTEMS",
    "DoubleWell2D",
    "GaussianMixture",
    "IceXI",
    "LennardJonesCluster",
    "ParticleSystem",
    "PeptideSystem",
    "System",
    "TetrahedronInField",
    "make_system",
    "system_parameter_names",
]


def system_parameter_names(kind: str) -> list[str]:
    """The keyword parameters accepted by system ``kind`` (ValueError for an unknown kind)."""
    return SYSTEMS.get(kind, "system.kind").parameter_names()


def make_system(config: Mapping) -> System:
    """Build a system from ``{"kind": <name>, <param>: <value>, ...}``.

    Unknown kind, unknown parameter or a bad value raise ValueError naming the field
    (``system.kind`` / ``system.<param>``); parameters left out take the class defaults.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"system: expected a mapping with a 'kind' key, got {type(config)}")
    if "kind" not in config:
        raise ValueError(f"system.kind: missing; choose one of {', '.join(SYSTEMS)}")
    cls = SYSTEMS.get(config["kind"], "system.kind")
    params = {k: v for k, v in config.items() if k != "kind"}
    allowed = cls.parameter_names()
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"system.{key}: not a parameter of system {cls.kind!r}; "
                f"allowed: {', '.join(allowed)}"
            )
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"system.{err}") from err
