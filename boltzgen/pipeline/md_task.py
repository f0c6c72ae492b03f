"""The MD-run task of a free-energy job (one temperature of its reference ladder), in a module
of its own so that the actor that runs it imports only what MD needs: importing this module
imports numpy and :mod:`boltzgen.md`, not PyTorch, the flows or the estimators (the graph's
other task functions live in :mod:`boltzgen.pipeline.job`, whose imports do).

Running the task builds the job's system, and every system class is written in PyTorch (ice's
flow coordinates, which the MD cache stores, come from its rigid-body code), so the run itself
still imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from boltzgen.md import MDProtocol
from boltzgen.pipeline.graph import TaskContext


def md_run_task(ctx: TaskContext, system: Mapping[str, Any], protocol: MDProtocol,
                platform: str, work_dir: str | None) -> float:
    """One MD run (``protocol``: temperature, lengths, seed) of the system of settings
    ``system`` on OpenMM ``platform`` into the work directory's MD cache; seconds it took (0
    if it was there)."""
    if work_dir is None:
        raise ValueError("work_dir: None is not allowed for reference.sampler 'md'; MD frames "
                         "are cached in the campaign's work directory")
    # Imported here, not above: the reference stage's module imports PyTorch.
    from boltzgen.pipeline.reference import run_md_rung

    return run_md_rung(system, protocol, work_dir, ctx.threads, platform)
