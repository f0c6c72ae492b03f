"""The OpenMM energy backend reproduces the torch potential and its gradient."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from boltzgen.openmm_bridge import OpenMMEvaluator
from boltzgen.pipeline import make_energy_function

CONFIG = {"system": {"kind": "double_well"}}


@pytest.mark.parametrize("platform", ["CPU", "Reference"])
def test_openmm_double_well_matches_torch(platform: str) -> None:
    x = np.random.default_rng(0).normal(scale=2.0, size=(64, 2))
    u_torch, g_torch = make_energy_function({**CONFIG, "energy": {"backend": "torch"}})(x)
    u_mm, g_mm = make_energy_function(
        {**CONFIG, "energy": {"backend": "openmm", "platform": platform}}, threads=1)(x)
    # OpenMM's CPU platform evaluates custom forces in mixed precision; Reference in double.
    rtol = 1e-5 if platform == "CPU" else 1e-12
    np.testing.assert_allclose(u_mm, u_torch, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(g_mm, g_torch, rtol=rtol, atol=rtol * 10)


def test_evaluator_travels_without_its_context() -> None:
    import openmm

    from boltzgen.systems import make_system

    xml = openmm.XmlSerializer.serialize(make_system({"kind": "double_well"}).openmm_system())
    evaluator = OpenMMEvaluator(xml, platform="Reference")
    evaluator.energies_and_forces(np.zeros((1, 1, 3)))
    assert evaluator._context is not None
    clone = pickle.loads(pickle.dumps(evaluator))
    assert clone._context is None
    u, _ = clone.energies_and_forces(np.zeros((1, 1, 3)))
    assert u[0] == 0.0


def test_bad_platform_is_refused() -> None:
    with pytest.raises(ValueError, match="energy.platform: 'Metal' is not allowed"):
        OpenMMEvaluator("<System/>", platform="Metal")


def test_actors_hold_openmm_pme_to_their_threads() -> None:
    """OpenMM's CPU PME kernels ignore a Context's Threads property and use every core unless
    OPENMM_CPU_THREADS is set: an actor sets it to its own threads (fresh process, because the
    actor also sets torch's thread count)."""
    code = ("import os; from actors.roles import ReferenceSamplerActor, TrainerActor; "
            "ReferenceSamplerActor(cpus=0.45); a = os.environ['OPENMM_CPU_THREADS']; "
            "TrainerActor(cpus=2.0); print(a, os.environ['OPENMM_CPU_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k != "OPENMM_CPU_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    assert out.stdout.split() == ["1", "2"], out.stderr[-2000:]
