"""The equivariance experiment of "Equivariant flows" (Köhler, Klein, Noé 2020): train an
equivariant and a non-equivariant CNF on reference data restricted to part of the state space
and see which of them samples the states the data held back, and with what reweighted weight.

Restrictions (``--restriction``):

- ``pair`` (DW4): DW4's pair potential has two wells, at d ≈ 2.5 and d ≈ 5.5 (d − 4 = ±1.49);
  the training data keep only configurations whose pair (0, 1) sits in the short well
  (d_01 < 4), the held-back states have d_01 > 4. The target is invariant under relabelling
  the particles, so a held-back configuration is a relabelling of trained ones (swap particle 1
  with one at long distance from 0): an equivariant flow, whose density is permutation
  invariant, gives it the density of its trained relabelling; an MLP field has no reason to.
- ``half_space`` (DW4 or LJ13): the training data keep only configurations whose particle 0
  lies at x > 0 relative to the centre of mass; held back: x < 0, the same configurations
  rotated by 180° (reference weight 1/2 by rotation invariance).

Both flows are trained by flow matching (batch OT coupling, the same for both) for ``--steps``
steps on the restricted set; then N samples with exact log-likelihoods, importance weights
w = exp(−u − log q). Reported per flow, against the full held-out reference:

- P(held back): the fraction of samples in the held-back region, as drawn and reweighted
  (self-normalised weights; error by bootstrap over samples), and that of the reference;
- the Kish ESS (fraction) and the NLL (nats, Helmert coordinates, normalised prior) of held-out
  reference samples in the trained region and in the held-back region separately.

    python bench/equivariance_experiment.py [--system dw4|lj13] [--restriction pair|half_space]
        [--flows egnn,hollow,mlp] [--steps 2000] [--samples 4000] [--max-holdout 1000]
        [--out bench/results/equivariance-<system>-<r>.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYSTEMS = {"dw4": ({"kind": "dw4"}, 0.3), "lj13": ({"kind": "lj", "n_particles": 13}, 0.05)}
# name -> (label, flow settings); the hollow field is equivariant too, with a cheap divergence.
FLOWS = {
    "egnn": ("egnn_cnf (equivariant)", {"kind": "egnn_cnf", "hidden": 32, "n_layers": 3}),
    "hollow": ("hollow_cnf (equivariant)", {"kind": "hollow_cnf", "hidden": 32, "n_layers": 3}),
    "mlp": ("mlp_cnf (baseline)", {"kind": "mlp_cnf", "hidden": 64, "n_layers": 3}),
}


def held_back(system, x: np.ndarray, restriction: str) -> np.ndarray:
    """True for configurations in the held-back region of ``restriction`` (module docstring)."""
    import torch

    z = torch.as_tensor(np.asarray(x, dtype=np.float64))
    with torch.no_grad():
        if restriction == "pair":
            return system.pair_distances(z)[:, 0].numpy() > system.d0
        return system.to_cartesian(z)[:, 0, 0].numpy() < 0.0


def reweighted_fraction(indicator: np.ndarray, log_w: np.ndarray, seed: int = 0,
                        n_boot: int = 200) -> tuple[float, float]:
    """Σ w 1[held back] / Σ w and its bootstrap standard deviation."""
    finite = np.isfinite(log_w)
    ind, lw = indicator[finite], log_w[finite]
    w = np.exp(lw - lw.max())
    value = float((w * ind).sum() / w.sum())
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(w), len(w))
        boots.append((w[idx] * ind[idx]).sum() / w[idx].sum())
    return value, float(np.std(boots))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=sorted(SYSTEMS), default="dw4")
    parser.add_argument("--restriction", choices=["pair", "half_space"], default="pair")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--flows", default="egnn,mlp",
                        help=f"comma-separated, from {', '.join(FLOWS)} (the EGNN's exact "
                             "divergence costs about a CPU-second per LJ13 sample)")
    parser.add_argument("--max-holdout", type=int, default=1000,
                        help="held-out reference samples pulled back for the NLL")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.restriction == "pair" and args.system != "dw4":
        parser.error("--restriction pair is defined for dw4 (its two pair wells)")
    flow_names = args.flows.split(",")
    unknown = [name for name in flow_names if name not in FLOWS]
    if unknown:
        parser.error(f"--flows: {', '.join(unknown)} not in {', '.join(FLOWS)}")
    out = args.out or str(ROOT / "bench" / "results" /
                          f"equivariance-{args.system}-{args.restriction}.json")

    import torch

    from boltzgen.estimators import kish_ess_fraction, kish_ess_fraction_err
    from boltzgen.flow_matching import FlowMatching
    from boltzgen.flows import build_flow
    from boltzgen.pipeline.reference import run_reference
    from boltzgen.systems import make_system
    from boltzgen.training import train_flow

    torch.set_num_threads(1)
    system_settings, step_size = SYSTEMS[args.system]
    job = {"seed": 2026, "temperature": 1.0, "system": system_settings,
           "base": {"kind": "normal", "scale": 1.0},
           "reference": {"ladder_size": 4, "hot_temperature_factor": 2.0, "n_chains": 256,
                         "n_steps": 6000, "burn_in": 2000, "thin": 20,
                         "step_size": step_size, "holdout_fraction": 0.3,
                         "max_holdout_samples": args.max_holdout}}
    system = make_system(job["system"])
    start = time.perf_counter()
    reference = run_reference(job)
    train_all = np.asarray(reference.target_train)
    test = np.asarray(reference.target_test)
    train = train_all[~held_back(system, train_all, args.restriction)]
    test_back = held_back(system, test, args.restriction)
    p_ref = float(test_back.mean())
    print(f"{args.system}, restriction {args.restriction}: {len(train_all)} training samples, "
          f"{len(train)} kept; {len(test)} held-out samples, P(held back) = {p_ref:.4f} "
          f"± {np.sqrt(p_ref * (1 - p_ref) / len(test)):.4f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    rows = []
    for label, settings in (FLOWS[name] for name in flow_names):
        torch.manual_seed(0)
        flow = build_flow(system.layout(), settings)
        t0 = time.perf_counter()
        data = torch.as_tensor(train)
        result = train_flow(flow, FlowMatching("ot", 0.0), args.steps, args.batch_size, 2e-3,
                            u_a=lambda x: x, u_b=lambda x: x, sample_a=None, data_b=data,
                            seed=1)
        t_train = time.perf_counter() - t0
        flow.eval()
        with flow.sampling_context():
            y, log_q = flow.sample_and_log_prob(args.samples,
                                                generator=torch.Generator().manual_seed(2))
            log_q_test = flow.log_prob(torch.as_tensor(test))
        with torch.no_grad():
            u = system.potential(y).numpy()
        log_w = -u - log_q.numpy()
        back = held_back(system, y.numpy(), args.restriction)
        value, error = reweighted_fraction(back, log_w)
        nll_in = float(-log_q_test[~torch.as_tensor(test_back)].mean())
        nll_back = float(-log_q_test[torch.as_tensor(test_back)].mean())
        row = {"system": args.system, "restriction": args.restriction, "flow": label,
               "train_seconds": t_train, "final_loss": result.losses[-1],
               "samples": args.samples, "p_held_back_drawn": float(back.mean()),
               "p_held_back_reweighted": value, "p_held_back_reweighted_err": error,
               "p_held_back_reference": p_ref, "ess": kish_ess_fraction(log_w),
               "ess_err": kish_ess_fraction_err(log_w), "nll_trained_region": nll_in,
               "nll_held_back_region": nll_back}
        rows.append(row)
        print(f"{label:24s} P(held back) drawn {row['p_held_back_drawn']:.4f}, reweighted "
              f"{value:.4f} ± {error:.4f} (reference {p_ref:.4f}); ESS {row['ess']:.4f} ± "
              f"{row['ess_err']:.4f}; NLL trained region {nll_in:.2f}, held-back region "
              f"{nll_back:.2f} nats; training {t_train:.0f} s", flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
