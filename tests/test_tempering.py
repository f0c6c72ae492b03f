"""Adaptive tempering (boltzgen.tempering): the importance-weighted KL estimate against closed
forms, the schedule's rules (steps accepted at most delta, a stalled schedule and a spent budget
fail with the beta reached, non-finite energies counted and given zero weight), and a resumed
run that ends as an uninterrupted one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from boltzgen.flows import build_flow
from boltzgen.settings import TemperingSettings
from boltzgen.systems import make_system
from boltzgen.tempering import AdaptiveTempering, TemperingStalled, importance_weighted_kl
from boltzgen.training import TrainingState, train_flow


def test_importance_weighted_kl_of_gaussians_matches_the_closed_form() -> None:
    """q = N(0, 1), p_β ∝ exp(−β x²/(2 s²)) = N(0, s²/β): KL(q ‖ p_β) = ½(σ²/τ² − 1 − ln σ²/τ²)
    with σ² = 1, τ² = s²/β < 2 (the weights then have a finite variance). Tolerance: 4 sigma,
    sigma the delta-method error of the two terms, sd(ℓ)/√M for the mean and sd(w)/(w̄ √M)
    for the log-mean (whose O(1/M) bias is far below it)."""
    gen = torch.Generator().manual_seed(3)
    m = 200_000
    x = torch.randn(m, generator=gen, dtype=torch.float64)
    log_q = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    s2 = 2.0
    u = x**2 / (2 * s2)
    for beta in (1.5, 3.0, 6.0):
        tau2 = s2 / beta
        exact = 0.5 * (1 / tau2 - 1 - math.log(1 / tau2))
        ell = -beta * u - log_q
        w = torch.exp(ell - ell.max())
        sigma = (float(ell.std()) + float(w.std() / w.mean())) / math.sqrt(m)
        estimate = importance_weighted_kl(log_q, u, beta)
        assert abs(estimate - exact) < 4 * sigma, (beta, estimate, exact, sigma)
    # q equal to p_β: every weight equal, the estimate is 0 up to rounding
    assert abs(importance_weighted_kl(log_q, u, 2.0)) < 1e-9


def test_non_finite_energies_get_zero_weight() -> None:
    log_q = torch.tensor([-1.0, -2.0, -1.5, -1.0], dtype=torch.float64)
    u = torch.tensor([1.0, 2.0, math.inf, math.nan], dtype=torch.float64)
    assert importance_weighted_kl(log_q, u, 0.5) == pytest.approx(
        importance_weighted_kl(log_q[:2], u[:2], 0.5), abs=1e-15)


def _double_well_run(settings: TemperingSettings, steps: int, **kwargs: object
                     ) -> tuple[torch.nn.Module, AdaptiveTempering, list[float]]:
    system = make_system({"kind": "double_well"})
    torch.manual_seed(0)
    flow = build_flow(system.layout(), {"kind": "coarse_grained", "n_layers": 2, "hidden": 16})
    gen = torch.Generator().manual_seed(1)
    objective = AdaptiveTempering(settings)
    result = train_flow(flow, objective, steps, 64, 3e-3, u_a=flow.prior.reduced_energy,
                        u_b=system.potential, sample_a=lambda n: flow.prior.sample(n, gen),
                        data_b=None, **kwargs)
    return flow, objective, result.losses


def test_schedule_reaches_one_with_steps_within_delta() -> None:
    settings = TemperingSettings(beta0=1e-2, delta=0.2, steps_per_level=20, check_samples=512)
    _, objective, losses = _double_well_run(settings, 2000)
    assert objective.beta == 1.0 and objective.finished()
    levels = objective.levels
    assert len(losses) == levels[-1]["step"] + 1 < 2000  # the phase ended early, at beta = 1
    betas = [settings.beta0] + [level["beta"] for level in levels]
    assert all(b1 > b0 for b0, b1 in zip(betas, betas[1:], strict=False))
    assert all(level["kl_increase"] <= settings.delta for level in levels)
    # every accepted step is the proposal 1 - beta shrunk by 0.6 a whole number of times
    for before, level in zip(betas, levels, strict=False):
        expected = (1 - before) * 0.6 ** level["shrinks"]
        assert level["delta_beta"] == pytest.approx(expected, rel=1e-12)
    series = objective.series()
    assert series["tempering_beta"] == [level["beta"] for level in levels]
    assert objective.summary()["tempering_beta_reached"] == 1.0


def test_a_schedule_that_cannot_advance_fails_with_the_beta_reached() -> None:
    settings = TemperingSettings(beta0=1e-2, delta=1e-9, steps_per_level=5, check_samples=256,
                                 min_step=1e-3)
    with pytest.raises(TemperingStalled, match=r"min_step: the step of beta shrank below "
                       r"0\.001 at beta = 0\.\d+ \(step \d+; KL estimate"):
        _double_well_run(settings, 1000)
    short = TemperingSettings(beta0=1e-4, delta=0.01, steps_per_level=10, check_samples=256)
    with pytest.raises(TemperingStalled, match=r"training\.steps: .*reached beta = 0\.0"):
        _double_well_run(short, 30)


def test_a_resumed_schedule_ends_as_an_uninterrupted_one() -> None:
    settings = TemperingSettings(beta0=1e-2, delta=0.2, steps_per_level=15, check_samples=256)
    flow, objective, losses = _double_well_run(settings, 400)
    saved: list[tuple[TrainingState, dict]] = []

    def keep(state: TrainingState) -> None:
        saved.append((state, {k: v.clone() for k, v in flow_a.state_dict().items()}))

    # Interrupted after 40 steps (mid-schedule: two steps of beta taken), then resumed.
    system = make_system({"kind": "double_well"})
    torch.manual_seed(0)
    flow_a = build_flow(system.layout(), {"kind": "coarse_grained", "n_layers": 2,
                                          "hidden": 16})
    gen = torch.Generator().manual_seed(1)
    first = AdaptiveTempering(settings)
    with pytest.raises(TemperingStalled):  # a budget of 40 steps: the checkpoint is what counts
        train_flow(flow_a, first, 40, 64, 3e-3, u_a=flow_a.prior.reduced_energy,
                   u_b=system.potential, sample_a=lambda n: flow_a.prior.sample(n, gen),
                   data_b=None, checkpoint_every=40, on_checkpoint=keep)
    state, params = saved[-1]
    assert 0.01 < state.objective["beta"] < 1.0 and state.step == 40
    # The rest: a new process would rebuild the flow, load the parameters and generators.
    torch.manual_seed(0)
    flow_b = build_flow(system.layout(), {"kind": "coarse_grained", "n_layers": 2,
                                          "hidden": 16})
    flow_b.load_state_dict(params)
    second = AdaptiveTempering(settings)
    gen_b = torch.Generator()
    gen_b.set_state(gen.get_state())
    result = train_flow(flow_b, second, 400, 64, 3e-3, u_a=flow_b.prior.reduced_energy,
                        u_b=system.potential, sample_a=lambda n: flow_b.prior.sample(n, gen_b),
                        data_b=None, resume=state)
    assert second.levels == objective.levels
    assert result.losses == losses
    for a, b in zip(flow.parameters(), flow_b.parameters(), strict=True):
        assert torch.equal(a, b)


class _Interrupted(Exception):
    pass


def test_a_trainer_killed_mid_schedule_resumes_from_its_progress_checkpoint(
        tmp_path: Path) -> None:
    """The job's training (pipeline.train) with progress checkpoints every 20 steps, stopped
    at step 70 (mid-schedule: beta between beta0 and 1), then run again on the same directory:
    it resumes from step 60 and ends with the losses, the schedule and the flow of an
    uninterrupted run."""
    from boltzgen.pipeline.flow_training import train

    job = {"seed": 3, "temperature": 1.0, "system": {"kind": "double_well"},
           "base": {"kind": "normal", "scale": 1.0}, "reference": {"sampler": "none"},
           "flow": {"kind": "coarse_grained", "n_layers": 2, "hidden": 16},
           "training": {"objective": "adaptive_tempering", "steps": 600, "batch_size": 64,
                        "learning_rate": 0.003,
                        "tempering": {"beta0": 0.01, "delta": 0.2, "steps_per_level": 30,
                                      "final_steps": 40, "check_samples": 256}}}
    whole = train(job, None, checkpoint_dir=str(tmp_path / "whole"), checkpoint_every=20)

    def stop(step: int, steps: int, loss: float) -> None:
        if step == 70:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train(job, None, checkpoint_dir=str(tmp_path / "cut"), checkpoint_every=20,
              on_step=stop)
    saved = torch.load(tmp_path / "cut" / "progress.pt", weights_only=False)
    assert saved["state"].step == 60 and 0.01 < saved["state"].objective["beta"] < 1.0
    resumed = train(job, None, checkpoint_dir=str(tmp_path / "cut"), checkpoint_every=20)
    assert resumed.resumed_from_step == 60
    assert resumed.losses == whole.losses and resumed.series == whole.series
    assert resumed.summary == whole.summary and resumed.summary["tempering_beta_reached"] == 1
    assert resumed.checkpoint == whole.checkpoint


def test_the_slow_density_is_normalized_and_leaves_the_map_alone() -> None:
    """The coarse-grained model's slow density (what the reweighted forward KL fits) at the slow
    variable z of y: its integral over the box [-B, B] is 1 (trapezoid on 100001 points; the
    error goes as h^2: 1.5e-4 measured on 4001 points, so ~2e-7 here), for random spline
    parameters; no gradient reaches the linear map W or the fast variables' network."""
    system = make_system({"kind": "double_well"})
    torch.manual_seed(3)
    flow = build_flow(system.layout(), {"kind": "coarse_grained", "n_layers": 2, "hidden": 16})
    with torch.no_grad():
        for layer in flow.slow:
            layer.theta.normal_(0.0, 0.5)
        flow.bijection.lower.normal_(0.0, 0.3)
        flow.bijection.log_diagonal.normal_(0.0, 0.3)
    bound = flow.prior.bound
    z = torch.linspace(-bound, bound, 100001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        y, _ = flow.bijection(z, torch.zeros((len(z), 1), dtype=torch.float64))
        density = torch.exp(flow.slow_log_density(y))
    assert float(torch.trapezoid(density, z[:, 0])) == pytest.approx(1.0, abs=1e-5)
    assert float(density.max()) > 1.5 / (2 * bound)  # the random splines are far from uniform
    flow.slow_log_density(y[:64]).sum().backward()
    assert all(p.grad is not None for p in flow.slow.parameters())
    assert all(p.grad is None for p in [*flow.bijection.parameters(), *flow.fast.parameters()])
