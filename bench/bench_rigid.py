"""Forward throughput of the rigid-body flow versus a parameter-matched affine coupling flow.

What is measured: one call ``flow(x)`` -> (y, log|det J|), forward direction only, float64,
under ``torch.no_grad()`` with the flows in eval mode (as when sampling), on a batch of
``--batch`` samples (default 4096). Flows, per body count N (``--sizes``, default 16 and 128):

- ``RigidBodyFlow(layout, rotation_layer=R, position_layer="circle_mobius", n_blocks=4)`` for
  R = ``double_mobius`` and R = ``convex_gradient`` (default conditioner sizes), with
  ``layout = RigidLayout(N, box=PeriodicBox(ice-XI-like edges), pinned_positions=(0,))``. The
  box is (0.89846, 0.77808, 0.73358) nm for N = 16 and twice each edge for N = 128 (other N:
  edges scaled by (N / 16)^(1/3)). Input: positions uniform in the box with body 0 at the
  origin, Haar-uniform unit quaternions, joined by ``layout.join``.
- for each rigid flow, the baseline ``AffineCouplingFlow(dim=layout.dim, n_layers=8,
  hidden=h, n_hidden_layers=2)`` (``--affine-layers`` sets n_layers) on the same flat input,
  with the integer ``h`` whose parameter count is nearest the rigid flow's (the count the rigid
  measurement itself reports, so the match holds even while the flow code is being edited).

The flows are freshly initialised (the conditioner heads start at zero); their forward passes
have no data-dependent loops, so training would not change the cost of a call.

Each measurement runs in a fresh Python process (this script with a hidden ``--worker``
argument), so allocator state, caches and memory peaks of one flow do not leak into another:
``--threads`` torch threads (default: all CPUs), one warm-up call, then ``--repeats`` timed
calls (default 3); reported is the median samples/s. Peak memory is the largest increase, over
the calls, of the peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) above its value
just before the call. On Linux the high-water mark is reset before every call
(``/proc/self/clear_refs``) so every call is measured on its own; the parent never imports
torch, because a child's ru_maxrss starts at the parent's peak. The warm-up call usually sets
the maximum: the allocator keeps much of what it freed, so later calls add less resident memory
(every call's figure is in the JSON). With ``--device cuda`` it is
``torch.cuda.max_memory_allocated`` above the memory allocated before the call.
``--max-batch-per-call`` splits a batch into chunks (one timed "call" is then all chunks), for
machines where the whole batch does not fit. Every measurement records a hash of the boltzgen
sources it imported; a warning names the files that differ between rows of one run.

Why ratios: the benchmark machines are shared and noisy, so absolute samples/s move from run
to run; the ratio rigid / affine baseline, both measured in the same run, is the number to
compare across runs and machines. A ratio < 1 means the rigid flow is slower than the baseline.

Results are printed as a table and written to ``bench/results/bench_rigid.json``. Run:

    .venv/bin/python bench/bench_rigid.py [--sizes 16 128] [--batch 4096] [--repeats 3]
        [--threads N] [--device cpu|cuda] [--max-batch-per-call M] [--affine-layers 8]
        [--out PATH]

With the defaults on a 2-core CPU this takes about half an hour (N = 128 dominates).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from boltzgen.rigid.bodies import RigidLayout

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ICE_XI_BOX_16 = (0.89846, 0.77808, 0.73358)
"""Ice-XI-like orthorhombic box (nm) holding 16 water molecules."""
ROTATION_LAYERS = ("double_mobius", "convex_gradient")
N_BLOCKS = 4
AFFINE_HIDDEN_LAYERS = 2
SEED = 0
# ru_maxrss is in KiB on Linux and in bytes on macOS.
_MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024
_MIB = 1024.0 * 1024.0


def box_edges(n_bodies: int) -> tuple[float, float, float]:
    """Ice-XI-like box for ``n_bodies`` bodies: the 16-body box with edges x (N / 16)^(1/3)."""
    scale = (n_bodies / 16) ** (1.0 / 3.0)  # exactly 2.0 for N = 128
    x, y, z = (scale * edge for edge in ICE_XI_BOX_16)
    return (x, y, z)


# --- worker side (imports torch) --------------------------------------------------------------


def make_layout(n_bodies: int) -> RigidLayout:
    from boltzgen.rigid.bodies import PeriodicBox, RigidLayout

    return RigidLayout(n_bodies=n_bodies, box=PeriodicBox(box_edges(n_bodies)),
                       pinned_positions=(0,))


def make_rigid(n_bodies: int, rotation_layer: str) -> nn.Module:
    from boltzgen.flows.rigid import RigidBodyFlow

    return RigidBodyFlow(make_layout(n_bodies), rotation_layer=rotation_layer,
                         position_layer="circle_mobius", n_blocks=N_BLOCKS)


def make_affine(n_bodies: int, n_layers: int, hidden: int) -> nn.Module:
    from boltzgen.flows.coupling import AffineCouplingFlow

    return AffineCouplingFlow(dim=make_layout(n_bodies).dim, n_layers=n_layers, hidden=hidden,
                              n_hidden_layers=AFFINE_HIDDEN_LAYERS)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_hidden(n_bodies: int, n_layers: int, target: int) -> tuple[int, int]:
    """(hidden, parameter count) of the affine flow whose count is nearest ``target``.

    The count grows strictly with ``hidden``: double until it reaches the target, bisect for the
    smallest ``hidden`` at or above it, then take the nearer of it and its predecessor.
    """
    def count(hidden: int) -> int:
        return count_parameters(make_affine(n_bodies, n_layers, hidden))

    hi = 1
    while count(hi) < target:
        hi *= 2
    lo = hi // 2  # count(lo) < target, or lo == 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) < target:
            lo = mid
        else:
            hi = mid
    if lo >= 1 and target - count(lo) <= count(hi) - target:
        return lo, count(lo)
    return hi, count(hi)


def make_input(n_bodies: int, batch: int, device: str) -> torch.Tensor:
    """Flat (batch, 7 N) float64: uniform positions (body 0 at the origin), unit quaternions."""
    import torch

    from boltzgen.rigid.quaternions import random_unit_quaternions

    layout = make_layout(n_bodies)
    generator = torch.Generator().manual_seed(SEED)
    edges = torch.tensor(layout.box.edges, dtype=torch.float64)
    positions = torch.rand((batch, n_bodies, 3), generator=generator, dtype=torch.float64) * edges
    positions[:, 0] = 0.0
    quaternions = random_unit_quaternions((batch, n_bodies), generator)
    return layout.join(positions, quaternions).to(device)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_BYTES


def sources_sha256() -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of every boltzgen source file this process has imported."""
    files = sorted(Path(module.__file__) for name, module in list(sys.modules.items())
                   if name.split(".")[0] == "boltzgen" and getattr(module, "__file__", None))
    return {str(file.relative_to(ROOT)): hashlib.sha256(file.read_bytes()).hexdigest()[:16]
            for file in files}


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(task: dict[str, Any]) -> dict[str, Any]:
    """Warm-up call plus ``repeats`` timed calls of one flow, in this (fresh) process."""
    import torch

    device = task["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    torch.set_num_threads(task["threads"])
    torch.manual_seed(SEED)
    n_bodies = task["n_bodies"]
    hidden = None
    if task["flow"] == "rigid":
        flow = make_rigid(n_bodies, task["rotation_layer"])
    else:
        hidden, _ = matched_hidden(n_bodies, task["affine_layers"], task["target_parameters"])
        flow = make_affine(n_bodies, task["affine_layers"], hidden)
    flow = flow.to(device).eval()
    x = make_input(n_bodies, task["batch"], device)
    chunk = task["max_batch_per_call"] or task["batch"]
    cuda = device == "cuda"

    def call() -> tuple[float, float, bool]:
        """One forward pass with log-det: (seconds, peak memory increase in bytes, reset ok)."""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before, reset = torch.cuda.memory_allocated(), True
        else:
            reset = _reset_peak_rss()
            before = _max_rss_bytes()
        start = time.perf_counter()
        with torch.no_grad():
            outputs = [flow(part) for part in x.split(chunk)]
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else _max_rss_bytes()
        if not all(bool(torch.isfinite(log_det).all()) for _, log_det in outputs):
            raise SystemExit(f"{task['flow']} N={n_bodies}: non-finite log-det")
        del outputs
        return seconds, float(peak - before), reset

    calls = [call() for _ in range(1 + task["repeats"])]  # the first call is the warm-up
    seconds = [s for s, _, _ in calls[1:]]
    rates = [task["batch"] / s for s in seconds]
    peaks = [p / _MIB for _, p, _ in calls]
    if cuda:
        method = "torch.cuda.max_memory_allocated above the allocation before each call"
    elif all(reset for _, _, reset in calls):
        method = "ru_maxrss increase per call, high-water mark reset before each call"
    else:
        method = "ru_maxrss increase (high-water mark not resettable: effectively the warm-up)"
    return {
        "parameters": count_parameters(flow),
        "affine_hidden": hidden,
        "warmup_s": calls[0][0],
        "seconds": seconds,
        "samples_per_s": rates,
        "median_samples_per_s": statistics.median(rates),
        "peak_mib_per_call": peaks,
        "peak_mib": max(peaks),
        "memory_method": method,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sources_sha256": sources_sha256(),
    }


def worker(task: dict[str, Any]) -> None:
    print(json.dumps(measure(task)))


# --- parent side (no torch, so the workers' ru_maxrss does not inherit a large peak) ----------


def run_worker(task: dict[str, Any]) -> dict[str, Any]:
    """Run ``task`` in a fresh interpreter; its last stdout line is the JSON result."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                           json.dumps(task)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"worker failed (exit {done.returncode}) on {task}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(name: str, result: dict[str, Any]) -> None:
    print(f"  {name}: {result['parameters']:,} parameters, "
          f"{result['median_samples_per_s']:,.1f} samples/s, peak {result['peak_mib']:,.1f} MiB, "
          f"warm-up {result['warmup_s']:.1f} s", flush=True)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("N", "flow", "parameters", "samples/s (median)", "ratio to affine", "peak MiB")
    cells = [header] + [
        (str(r["n_bodies"]), r["label"], f"{r['parameters']:,}",
         f"{r['median_samples_per_s']:,.1f}", f"{r['ratio_to_affine']:.3f}",
         f"{r['peak_mib']:,.1f}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 1 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 128],
                        help="numbers of bodies N")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch.set_num_threads in every measurement")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-batch-per-call", type=int, default=None,
                        help="split each batch into forward calls of at most this many samples")
    parser.add_argument("--affine-layers", type=int, default=8,
                        help="n_layers of the affine baseline (its hidden width is matched)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_rigid.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker))
        return
    for name in ("batch", "repeats", "threads", "affine_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_batch_per_call is not None and args.max_batch_per_call < 1:
        parser.error("--max-batch-per-call must be >= 1")
    if any(n < 2 for n in args.sizes):
        parser.error("--sizes: every N must be >= 2 (body 0 is pinned)")

    common = {"batch": args.batch, "repeats": args.repeats, "threads": args.threads,
              "device": args.device, "max_batch_per_call": args.max_batch_per_call,
              "affine_layers": args.affine_layers}
    rows: list[dict[str, Any]] = []
    for n_bodies in args.sizes:
        for rotation_layer in ROTATION_LAYERS:
            case = {**common, "n_bodies": n_bodies, "rotation_layer": rotation_layer}
            rigid = run_worker({**case, "flow": "rigid"})
            report(f"N={n_bodies} rigid {rotation_layer}", rigid)
            affine = run_worker({**case, "flow": "affine",
                                 "target_parameters": rigid["parameters"]})
            report(f"N={n_bodies} affine {args.affine_layers}x{affine['affine_hidden']}", affine)
            labels = (f"affine {args.affine_layers}x{affine['affine_hidden']} "
                      f"(matched to {rotation_layer})", f"rigid {rotation_layer}")
            for flow, label, result in zip(("affine", "rigid"), labels, (affine, rigid),
                                           strict=True):
                rows.append({"n_bodies": n_bodies, "flow": flow, "rotation_layer": rotation_layer,
                             "label": label, **result,
                             "ratio_to_affine": result["median_samples_per_s"]
                             / affine["median_samples_per_s"]})
    changed = sorted({file for row in rows for file, digest in row["sources_sha256"].items()
                      if any(other["sources_sha256"].get(file, digest) != digest
                             for other in rows)})

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": rows[0]["torch"]},
        "settings": {"sizes": args.sizes, "batch": args.batch, "repeats": args.repeats,
                     "threads": args.threads, "device": args.device,
                     "max_batch_per_call": args.max_batch_per_call,
                     "affine_layers": args.affine_layers,
                     "affine_hidden_layers": AFFINE_HIDDEN_LAYERS, "rigid_n_blocks": N_BLOCKS,
                     "box_nm": {str(n): box_edges(n) for n in args.sizes}},
        "sources_changed_during_run": changed,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print()
    print(f"batch {args.batch}, {args.threads} threads on {os.cpu_count()} CPUs, "
          f"device {args.device}, median of {args.repeats} calls after 1 warm-up; float64, "
          "forward with log-det, no_grad")
    print(format_table(rows))
    print("ratio = samples/s / samples/s of the affine baseline on the line above it "
          "(< 1: slower than the baseline)")
    if changed:
        print(f"WARNING: boltzgen sources changed during the run: {', '.join(changed)} "
              "(see sources_sha256 per row in the JSON); rerun if that code is measured")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
