"""The cost of exact likelihoods in equivariant CNFs, and what couplings and hollow fields buy.

Three benches, each a ratio measured in one run on this machine:

(a) ``divergence``: samples with their exact log-likelihood per CPU-second at DW4, LJ13 and
    LJ55, for one EGNN vector field (hidden 32, 3 layers, weights moved from the zero start),
    the ODE solved by RK4 with 20 steps (a fixed NFE, as HollowFlow times it), with the exact
    divergence computed three ways: one backward pass per dimension (``exact_per_dimension``,
    the published approach: the baseline), the same vector-Jacobian products batched over one
    forward graph (``exact_vectorized``), and, for comparison, the hollow field's closed form
    (a different, cheaper network: ``hollow_cnf``, same width and depth). CPU-seconds are the
    process's CPU time (``time.process_time``), torch on ``--threads`` threads.
(b) ``campaign``: effective samples per CPU-second (ESS x N / seconds = ESS / seconds per
    sample) of the hollow field against the full EGNN, both trained by flow matching with
    equivariant OT on LJ13 in the same finished campaign (``campaign launch
    specs/particles.yaml`` first; the sampler actors run one thread, so wall seconds are
    CPU-seconds). Goal >= 3x.
(c) ``campaign``: NFE and path length at the same solver tolerance of equivariant OT against
    independent coupling, per system and vector field, from the same campaign. Goal <= 0.6x.
    The campaign's NFE is that of the likelihood solve, whose adaptive steps also control the
    error of the divergence integral; ``--state-tolerances 1e-3,1e-5`` adds the NFE of the
    sampling ODE dz/dt = v(t, z) alone (dopri5, atol = rtol = each tolerance, the trained
    flows' checkpoints read back from MLflow, ``--state-samples`` prior draws, the same for
    both couplings): what the straightness of the learnt paths buys a sampler that needs no
    likelihood.

    python bench/bench_cnf.py divergence [--threads 1] [--out bench/results/cnf_divergence.json]
    python bench/bench_cnf.py campaign specs/particles.yaml [--tracking-uri URI]
        [--state-tolerances 1e-3,1e-5] [--state-samples 256]
        [--out bench/results/cnf_campaign.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYSTEMS = {"DW4": ({"kind": "dw4"}, 256), "LJ13": ({"kind": "lj", "n_particles": 13}, 32),
           "LJ55": ({"kind": "lj", "n_particles": 55}, 2)}
METHODS = (("egnn_cnf", "exact_per_dimension"), ("egnn_cnf", "exact_vectorized"),
           ("hollow_cnf", "analytic"))


def divergence_bench(threads: int, repeats: int) -> list[dict]:
    import torch

    from boltzgen.flows import build_flow
    from boltzgen.systems import make_system

    torch.set_num_threads(threads)
    rows = []
    for name, (config, n) in SYSTEMS.items():
        layout = make_system(config).layout()
        baseline = None
        for kind, divergence in METHODS:
            torch.manual_seed(0)
            flow = build_flow(layout, {"kind": kind, "hidden": 32, "n_layers": 3,
                                       "solver": "rk4", "n_steps": 20,
                                       "divergence": divergence}).eval()
            with torch.no_grad():  # away from the zero field the flow starts with
                for parameter in flow.parameters():
                    parameter.add_(0.1 * torch.randn_like(parameter))
            best_cpu = best_wall = float("inf")
            for _ in range(repeats):
                flow.reset_statistics()
                cpu, wall = time.process_time(), time.perf_counter()
                with flow.sampling_context():
                    flow.sample_and_log_prob(n, generator=torch.Generator().manual_seed(1))
                best_cpu = min(best_cpu, time.process_time() - cpu)
                best_wall = min(best_wall, time.perf_counter() - wall)
            rate = n / best_cpu
            baseline = rate if baseline is None else baseline
            row = {"system": name, "dim": layout.dim, "flow": kind, "divergence": divergence,
                   "samples": n, "nfe": flow.solve_statistics()["nfe"],
                   "cpu_seconds": best_cpu, "wall_seconds": best_wall,
                   "samples_per_cpu_second": rate, "ratio_to_per_dimension": rate / baseline}
            rows.append(row)
            print(f"{name:5s} dim {layout.dim:3d} {kind:10s} {divergence:20s} N {n:4d} "
                  f"NFE {row['nfe']:4.0f} CPU {best_cpu:8.2f} s  {rate:9.3f} samples/CPU-s  "
                  f"ratio {rate / baseline:6.2f}", flush=True)
    return rows


def state_nfe(flow, tolerance: float, n: int) -> float:
    """Vector-field evaluations of one dopri5 solve of dz/dt = v(t, z) from t = 0 to 1 for
    ``n`` prior draws (seed 0) of a trained CNF, at atol = rtol = ``tolerance``; no
    divergence."""
    import torch
    from torchdiffeq import odeint

    z0 = flow.prior.sample(n, generator=torch.Generator().manual_seed(0))
    calls = 0

    def velocity(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return flow.velocity(t, z)

    with torch.no_grad():
        odeint(velocity, z0, torch.tensor([0.0, 1.0], dtype=z0.dtype), method="dopri5",
               atol=tolerance, rtol=tolerance)
    return float(calls)


def campaign_bench(spec_path: str, tracking_uri: str | None,
                   state_tolerances: list[float] | None = None, state_samples: int = 256
                   ) -> dict:
    import mlflow
    import torch

    from boltzgen.pipeline.flow_training import load_flow
    from campaign.plan import make_plan
    from campaign.report import comparison_records
    from campaign.spec import load_spec
    from campaign.tracking import resolve_tracking_uri

    torch.set_num_threads(1)  # the NFE does not depend on it; the machine may be busy

    plan = make_plan(load_spec(spec_path))
    records = [r for r in comparison_records(plan, tracking_uri)
               if str(r["status"]).lower() == "finished"]
    uri = resolve_tracking_uri(tracking_uri, plan.spec.tracking.uri)

    def key(record: dict) -> tuple[str, str, str]:
        params = record["params"]
        system = params.get("system.kind", "")
        if system == "lj":
            system = f"lj{params.get('system.n_particles', '')}"
        return (system, params.get("flow.kind", ""), params.get("training.coupling", ""))

    by_key = {key(r): r["metrics"] for r in records}
    run_ids = {key(r): r["run_id"] for r in records}
    out: dict = {"hollow_vs_egnn": [], "coupling": []}
    print("(b) effective samples per CPU-second, equivariant OT (ESS / seconds per sample)")
    for system in sorted({k[0] for k in by_key}):
        full, hollow = by_key.get((system, "egnn_cnf", "equivariant_ot")), by_key.get(
            (system, "hollow_cnf", "equivariant_ot"))
        if full is None or hollow is None:
            continue
        rates = {name: m["ess"] / m["seconds_per_sample"] for name, m in
                 (("egnn", full), ("hollow", hollow))}
        row = {"system": system, **{f"{name}_{k}": m[k] for name, m in
                                    (("egnn", full), ("hollow", hollow))
                                    for k in ("ess", "ess_err", "seconds_per_sample", "nll")},
               "egnn_effective_per_cpu_second": rates["egnn"],
               "hollow_effective_per_cpu_second": rates["hollow"],
               "ratio": rates["hollow"] / rates["egnn"]}
        out["hollow_vs_egnn"].append(row)
        print(f"  {system}: EGNN ESS {full['ess']:.4f} ± {full['ess_err']:.4f}, "
              f"{full['seconds_per_sample']:.3f} s/sample -> {rates['egnn']:.4f} eff/s; "
              f"hollow ESS {hollow['ess']:.4f} ± {hollow['ess_err']:.4f}, "
              f"{hollow['seconds_per_sample']:.3f} s/sample -> {rates['hollow']:.4f} eff/s; "
              f"ratio {row['ratio']:.2f} (goal >= 3)")
    print("(c) equivariant OT against independent coupling, same tolerance")
    for system, flow, _ in sorted(k for k in by_key if k[2] == "independent"):
        base, eot = by_key[(system, flow, "independent")], by_key.get(
            (system, flow, "equivariant_ot"))
        if eot is None:
            continue
        row = {"system": system, "flow": flow}
        for metric in ("nfe", "path_length"):
            row.update({f"{metric}_independent": base[metric],
                        f"{metric}_equivariant_ot": eot[metric],
                        f"{metric}_ratio": eot[metric] / base[metric]})
        out["coupling"].append(row)
        print(f"  {system:5s} {flow:9s} NFE {base['nfe']:5.1f} -> {eot['nfe']:5.1f} "
              f"(ratio {row['nfe_ratio']:.2f}, goal <= 0.6); path length "
              f"{base['path_length']:.3f} -> {eot['path_length']:.3f} "
              f"(ratio {row['path_length_ratio']:.2f})")
        trained = {coupling: load_flow(Path(mlflow.artifacts.download_artifacts(
            run_id=run_ids[(system, flow, coupling)], artifact_path="checkpoint/flow.pt",
            tracking_uri=uri)).read_bytes()) for coupling in ("independent", "equivariant_ot")
        } if state_tolerances else {}
        for tolerance in state_tolerances or ():
            nfe = {coupling: state_nfe(model, tolerance, state_samples)
                   for coupling, model in trained.items()}
            ratio = nfe["equivariant_ot"] / nfe["independent"]
            row[f"state_nfe_{tolerance:g}"] = {**nfe, "ratio": ratio}
            print(f"        sampling ODE alone, tolerance {tolerance:g}: NFE "
                  f"{nfe['independent']:.0f} -> {nfe['equivariant_ot']:.0f} (ratio {ratio:.2f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    div = sub.add_parser("divergence")
    div.add_argument("--threads", type=int, default=1)
    div.add_argument("--repeats", type=int, default=2)
    div.add_argument("--out", default=str(ROOT / "bench" / "results" / "cnf_divergence.json"))
    camp = sub.add_parser("campaign")
    camp.add_argument("spec")
    camp.add_argument("--tracking-uri", default=None)
    camp.add_argument("--state-tolerances", default="",
                      help="comma-separated dopri5 tolerances for the sampling ODE alone")
    camp.add_argument("--state-samples", type=int, default=256)
    camp.add_argument("--out", default=str(ROOT / "bench" / "results" / "cnf_campaign.json"))
    args = parser.parse_args()
    if args.bench == "divergence":
        result: object = divergence_bench(args.threads, args.repeats)
    else:
        tolerances = [float(t) for t in args.state_tolerances.split(",") if t.strip()]
        result = campaign_bench(args.spec, args.tracking_uri, tolerances, args.state_samples)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
