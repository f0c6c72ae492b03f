"""Thin Ray actor classes: each runs tasks of the science's job graphs and owns its resources.

Actors import the science package (``boltzgen``) and Ray, never ``campaign``.
"""

from actors.progress import ProgressFile
from actors.roles import (
    ROLE_CLASSES,
    EnergyEvaluatorActor,
    PooledEnergy,
    ReferenceSamplerActor,
    SamplerActor,
    TaskWorker,
    TrainerActor,
    make_actor,
)

__all__ = [
    "ROLE_CLASSES",
    "EnergyEvaluatorActor",
    "PooledEnergy",
    "ProgressFile",
    "ReferenceSamplerActor",
    "SamplerActor",
    "TaskWorker",
    "TrainerActor",
    "make_actor",
]
