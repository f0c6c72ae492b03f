"""The cost of ΔF_φ: CPU-seconds the Boltzmann-generator route needs to reach the MD reference's
error bar, against the CPU-seconds of the MD alone, per peptide of a finished campaign.

Read from the campaign's own MLflow records (``campaign launch specs/peptides.yaml`` first), so
both routes are measured in the same run on the same machine:

- MD alone: the replica-exchange run's wall seconds (``md_seconds_all_rungs``; one OpenMM
  thread per MD actor, so CPU-seconds = wall seconds x the reference role's CPUs) gave
  ΔF_φ with error σ_MD (``delta_f_phi_md_err``). That is its cost for that error bar.
- BG route: the MD frames it trained on (the training fraction 1 − holdout_fraction of the
  run's cost), training (``time_train`` x the trainer's CPUs), and drawing N samples with
  their OpenMM energies (``time_sample`` x the sampler's CPUs + ``time_energy`` x the energy
  evaluators' CPUs in use), which gave σ_BG (``delta_f_phi_err``). Independent samples: the
  error falls as 1/sqrt(N), so reaching σ_MD takes (σ_BG / σ_MD)² times the drawing cost.

    ratio = [t_MD (1 − h) + t_train + t_draw (σ_BG / σ_MD)²] / t_MD

A ratio below 1 means the BG route reaches the MD's error bar for less CPU than the MD took
(it still needs the MD training frames); above 1, more. The last column, |ΔF_BG − ΔF_MD| over
the combined sigma, says whether the BG's number can be trusted at all: beyond 2 it cannot,
and its ratio means nothing. Where the MD error is not finite (one
state never visited, or too few blocks) there is no error bar to reach and the row says so.

    python bench/bench_peptide_cost.py specs/peptides.yaml [--tracking-uri URI]
        [--out bench/results/peptide_cost.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from campaign.plan import make_plan  # noqa: E402
from campaign.report import comparison_records  # noqa: E402
from campaign.spec import load_spec  # noqa: E402


def role_cpus(spec: object, role: str) -> tuple[float, int]:
    """(threads per actor, actor count) of ``role``: an actor runs ceil(cpus) threads, at
    least one (actors/roles.py), whatever fraction of a CPU Ray books for it."""
    resources = getattr(spec.resources, role)  # type: ignore[attr-defined]
    return float(max(1, math.ceil(resources.cpus))), int(resources.count)


def cost_row(record: dict, spec: object, pieces: int) -> dict:
    m = record["metrics"]
    md_cpus, _ = role_cpus(spec, "reference")
    train_cpus, _ = role_cpus(spec, "trainer")
    sample_cpus, _ = role_cpus(spec, "sampler")
    energy_cpus, energy_count = role_cpus(spec, "energy_evaluator")
    holdout = float(record["params"].get("reference.holdout_fraction", 0.5))
    t_md = m["md_seconds_all_rungs"] * md_cpus
    t_train = m["time_train"] * train_cpus
    t_draw = (m["time_sample"] * sample_cpus
              + m["time_energy"] * energy_cpus * min(energy_count, pieces))
    sigma_md, sigma_bg = m.get("delta_f_phi_md_err", math.nan), m.get("delta_f_phi_err",
                                                                           math.nan)
    row = {"system": record["params"].get("system.sequence", record["params"].get(
        "system.kind")), "cpu_s_md": t_md, "cpu_s_md_training_frames": t_md * (1 - holdout),
        "cpu_s_train": t_train, "cpu_s_draw": t_draw, "sigma_md_kt": sigma_md,
        "sigma_bg_kt": sigma_bg, "delta_f_phi_md": m.get("delta_f_phi_md"),
        "delta_f_phi": m.get("delta_f_phi")}
    gap = abs(m.get("delta_f_phi", math.nan) - m.get("delta_f_phi_md", math.nan))
    row["z"] = gap / math.hypot(sigma_md, sigma_bg) if sigma_md > 0 else math.nan
    if not (math.isfinite(sigma_md) and math.isfinite(sigma_bg) and sigma_md > 0):
        row["ratio"] = math.nan
        row["note"] = "no finite error bar to reach"
        return row
    scale = (sigma_bg / sigma_md) ** 2
    row["cpu_s_bg_route"] = t_md * (1 - holdout) + t_train + t_draw * scale
    row["ratio"] = row["cpu_s_bg_route"] / t_md
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/peptide_cost.json")
    args = parser.parse_args()
    plan = make_plan(load_spec(args.spec))
    records = [r for r in comparison_records(plan, args.tracking_uri)
               if r["status"] == "FINISHED"]
    if not records:
        sys.exit(f"no finished jobs of {args.spec} in the tracking store; launch it first")
    rows = []
    for record in records:
        job = next(j for j in plan.jobs if j.job_id == record["job_id"])
        sampling = job.config.sampling
        pieces = math.ceil(sampling.n_samples / sampling.energy_batch_size)
        rows.append(cost_row(record, plan.spec, pieces))
    print(f"{'peptide':<14} {'MD cpu-s':>9} {'sigma_MD':>9} {'BG cpu-s':>9} {'sigma_BG':>9} "
          f"{'ratio':>6} {'|BG-MD|/sigma':>13}")
    for row in rows:
        print(f"{row['system']!s:<14} {row['cpu_s_md']:9.0f} {row['sigma_md_kt']:9.3f} "
              f"{row.get('cpu_s_bg_route', math.nan):9.0f} {row['sigma_bg_kt']:9.3f} "
              f"{row['ratio']:6.2f} {row['z']:13.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"spec": str(args.spec), "rows": rows}, indent=2,
                                   default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
