"""Adding to the science is a registered class plus a spec: no change in ``campaign/`` or
``actors/``.

This module registers a toy objective (tempered reverse KL, whose inverse temperature is
annealed during training and kept in the objective's state) and a toy reference sampler
(the replica-exchange MCMC reference with a diagnostic of its own), both
defined here only, and launches a spec that names them through the real command line on the
in-process backend (the classes live in this process). The registries refuse an unknown name
with one line naming the field, the value and every registered choice, the toy ones included.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from boltzgen.objectives import OBJECTIVES, Objective, reverse_kl_loss
from boltzgen.pipeline.samplers import REFERENCE_SAMPLERS, ReferenceSampler
from boltzgen.registry import Registry
from boltzgen.settings import SettingError
from campaign.cli import app
from tests.conftest import TINY_SPEC, write_spec

runner = CliRunner()


class TemperedReverseKL(Objective):
    """Reverse KL to exp(-β u_B) with β annealed linearly from 1/2 to 1 over the first half of
    training, then 1: an objective whose state (β) changes as it trains."""

    def __init__(self) -> None:
        self.beta = 0.5
        self.betas: list[float] = []

    @classmethod
    def complaints(cls, job: Any, system: Any) -> Iterator[SettingError]:
        if not job.base.kind == "normal":
            yield SettingError("base.kind", job.base.kind, "tempered_reverse_kl draws from a "
                               "normal base; use 'normal'")

    def validate(self, sample_a: Callable[[int], torch.Tensor] | None, data_b: Any) -> None:
        if sample_a is None:
            raise ValueError("sample_a: None is not allowed for tempered_reverse_kl")

    def loss(self, flow: nn.Module, step: int, batch_size: int, generator: torch.Generator,
             u_a: Any, u_b: Any, sample_a: Any, data_b: Any) -> torch.Tensor:
        self.beta = min(1.0, 0.5 + step / 200)
        self.betas.append(self.beta)
        return reverse_kl_loss(flow, sample_a(batch_size), u_a,
                               lambda y: self.beta * u_b(y))

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = state.get("beta", 0.5)


class CountingMCMC(ReferenceSampler):
    """The replica-exchange MCMC reference under a name of its own, with a diagnostic that
    shows the campaign recorded what this class returned."""

    @classmethod
    def run(cls, job: Any, problem: Any, work_dir: str | None, threads: int) -> Any:
        from boltzgen.pipeline.reference import mcmc_reference

        reference = mcmc_reference(job, problem)
        reference.diagnostics["toy_sampler_draws"] = float(len(reference.target_train)
                                                           + len(reference.target_test))
        return reference


@pytest.fixture
def toy_choices() -> Iterator[None]:
    OBJECTIVES.register("tempered_reverse_kl")(TemperedReverseKL)
    REFERENCE_SAMPLERS.register("counting_mcmc")(CountingMCMC)
    yield
    OBJECTIVES.unregister("tempered_reverse_kl")
    REFERENCE_SAMPLERS.unregister("counting_mcmc")


def _toy_spec(directory: Path) -> Path:
    data = copy.deepcopy(TINY_SPEC)
    data["name"] = "toy"
    data["reference"] = {**data["reference"], "sampler": "counting_mcmc"}
    data["training"] = {"objective": "tempered_reverse_kl", "steps": 200, "batch_size": 256,
                        "learning_rate": 0.003}
    data["sampling"] = {"n_samples": 2000, "energy_batch_size": 1000}
    return write_spec(directory, data)


def test_registered_toy_objective_and_sampler_run_end_to_end(
        workdir: Path, toy_choices: None) -> None:
    spec = _toy_spec(workdir)
    result = runner.invoke(app, ["launch", str(spec), "--backend", "local",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert len(summary["finished"]) == 1 and not summary["failed"], summary

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("toy")
    (run,) = client.search_runs([experiment.experiment_id], "tags.campaign_role = 'job'")
    metrics = run.data.metrics
    assert metrics["toy_sampler_draws"] > 0  # the toy sampler's own diagnostic
    assert metrics["train_steps_run"] == 200.0
    # A 200-step flow from the tempered objective need not be good, but its estimate must be a
    # number with an error bar.
    assert torch.isfinite(torch.tensor([metrics["delta_f"], metrics["delta_f_err"]])).all()


def test_toy_objective_keeps_its_state_across_a_resume(toy_choices: None) -> None:
    """The objective's annealed β is checkpointed with the training state and restored."""
    from boltzgen.bases import NormalBase
    from boltzgen.flows import build_flow
    from boltzgen.systems import make_system
    from boltzgen.training import train_flow

    system = make_system({"kind": "double_well"})
    base = NormalBase(system.dim, 2.0)
    saved: list[Any] = []

    def run(steps_resume: Any = None, objective: Objective | None = None) -> Objective:
        torch.manual_seed(0)
        flow = build_flow(system.dim, {"kind": "affine_coupling", "n_layers": 2, "hidden": 8})
        gen = torch.Generator().manual_seed(1)
        chosen = objective or TemperedReverseKL()
        train_flow(flow, chosen, 20, 64, 1e-3, u_a=base.reduced_energy,
                   u_b=lambda y: system.reduced_energy(y, 1.0),
                   sample_a=lambda n: base.sample(n, gen), data_b=None,
                   resume=steps_resume, checkpoint_every=10, on_checkpoint=saved.append)
        return chosen

    run()
    assert saved[0].step == 10 and saved[0].objective == {"beta": 0.5 + 9 / 200}
    resumed = TemperedReverseKL()
    resumed.load_state_dict(saved[0].objective)
    assert resumed.beta == 0.5 + 9 / 200


def test_unknown_choice_lists_the_registered_ones(workdir: Path, toy_choices: None) -> None:
    data = copy.deepcopy(TINY_SPEC)
    data["training"] = {"objective": "forward_kl"}
    result = runner.invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 2
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: training.objective: ")
    assert "'forward_kl'" in line
    for name in ("reverse_kl", "maximum_likelihood", "tempered_reverse_kl"):
        assert name in line, line


def test_registered_class_checks_its_fit_with_the_job(workdir: Path, toy_choices: None) -> None:
    data = copy.deepcopy(TINY_SPEC)
    data["base"] = {"kind": "thermodynamic", "temperature": 2.0}
    data["training"] = {"objective": "tempered_reverse_kl"}
    result = runner.invoke(app, ["validate", str(write_spec(workdir, data))])
    assert result.exit_code == 2
    assert "base.kind" in result.stderr and "tempered_reverse_kl draws" in result.stderr


def test_registry_refuses_a_taken_name() -> None:
    registry: Registry[object] = Registry("toy", field="toy.kind")

    @registry.register("a")
    class A:
        pass

    with pytest.raises(ValueError, match="toy.kind: 'a' is already registered"):
        registry.register("a")(type("B", (), {}))
    with pytest.raises(ValueError, match="toy.kind: 'b' is not a known toy; choose one of a"):
        registry.get("b")
    assert registry.get("a") is A and registry.names() == ["a"]
