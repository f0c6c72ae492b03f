"""Thin Ray actor classes: each wraps science stage functions and owns its resources.

Actors import the science package (``boltzgen``) and Ray, never ``campaign``.
"""

from actors.roles import (
    ROLE_CLASSES,
    EnergyEvaluatorActor,
    McmcActor,
    SamplerActor,
    TrainerActor,
    make_actor,
)

__all__ = [
    "ROLE_CLASSES",
    "EnergyEvaluatorActor",
    "McmcActor",
    "SamplerActor",
    "TrainerActor",
    "make_actor",
]
