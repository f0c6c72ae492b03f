"""``campaign slurm``: an sbatch script that starts a Ray cluster in a Slurm allocation and runs
the campaign's driver on its head.

It follows Ray's documented multi-node pattern: ``ray start --head --block`` in one Slurm task,
``ray start --address ... --block`` in the others (both through srun), then the driver in the
batch script itself, on the head's host. The traps it avoids (docs/architecture.md, Traps worked
around):

- ports derived from the job id (two campaigns on one node do not collide) and from the Ray
  node's index on its host (several Ray nodes on one host do not collide either);
- a short ``--temp-dir`` per Ray node (UNIX socket paths are limited to 107 bytes);
- ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (a token the script generates, readable by
  the user alone, on a file system every node sees) exported to head, workers and driver;
- ``RAY_ADDRESS`` exported for the driver; ``--num-cpus``/``--num-gpus`` from the allocation;
- ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0``: no 30 s stall when Slurm ends the steps.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from campaign.errors import SpecError

TIME_FORMAT = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")
MAX_RAY_NODES_PER_HOST = 9  # ports: 10 per Ray node and 90 worker ports each in a 1000 block


@dataclass(frozen=True)
class SlurmOptions:
    nodes: int = 2  # Ray nodes (one Slurm task each)
    cpus_per_node: int = 4
    gpus_per_node: int = 0
    ray_nodes_per_host: int = 1  # >1 puts several Ray nodes on one Slurm node (tests, fat nodes)
    partition: str | None = None
    time: str = "01:00:00"
    account: str | None = None
    job_name: str | None = None

    def check(self) -> None:
        """Refuse values Slurm or the port layout cannot take (SpecError naming the option)."""
        for name in ("nodes", "cpus_per_node", "ray_nodes_per_host"):
            if getattr(self, name) < 1:
                raise SpecError(f"--{name.replace('_', '-')}", getattr(self, name),
                                "give a positive whole number")
        if self.gpus_per_node < 0:
            raise SpecError("--gpus-per-node", self.gpus_per_node, "give 0 or more")
        if self.ray_nodes_per_host > MAX_RAY_NODES_PER_HOST:
            raise SpecError("--ray-nodes-per-host", self.ray_nodes_per_host,
                            f"at most {MAX_RAY_NODES_PER_HOST} Ray nodes share one host")
        if not TIME_FORMAT.match(self.time):
            raise SpecError("--time", self.time, "use Slurm's format: minutes, HH:MM:SS or "
                            "D-HH:MM:SS")
        for name in ("partition", "account", "job_name"):
            value = getattr(self, name)
            if value is not None and not re.fullmatch(r"[A-Za-z0-9_.,-]+", value):
                raise SpecError(f"--{name.replace('_', '-')}", value,
                                "letters, digits, _ . , - only")

    @property
    def slurm_nodes(self) -> int:
        return math.ceil(self.nodes / self.ray_nodes_per_host)


def render_script(spec_path: Path, campaign_name: str, options: SlurmOptions,
                  launch_dir: Path, bin_dir: Path | None = None) -> str:
    """The sbatch script, as text. ``bin_dir``: the environment whose ``campaign`` and ``ray``
    the job runs (default: the one running this command)."""
    options.check()
    bin_dir = bin_dir or Path(sys.executable).parent
    name = options.job_name or f"campaign-{campaign_name}"
    per_host = options.ray_nodes_per_host
    sbatch = [
        f"--job-name={name}",
        f"--nodes={options.slurm_nodes}",
        f"--ntasks={options.nodes}",
        f"--ntasks-per-node={per_host}",
        f"--cpus-per-task={options.cpus_per_node}",
        f"--time={options.time}",
        f"--output={name}-%j.out",
    ]
    if options.gpus_per_node:
        sbatch.append(f"--gpus-per-task={options.gpus_per_node}")
    if options.partition:
        sbatch.append(f"--partition={options.partition}")
    if options.account:
        sbatch.append(f"--account={options.account}")
    header = "\n".join(f"#SBATCH {line}" for line in sbatch)
    gpus, cpus = options.gpus_per_node, options.cpus_per_node
    q = shlex.quote
    return f"""#!/bin/bash
# Ray cluster + campaign driver for `{spec_path.name}` ({campaign_name}), written by
# `campaign slurm`. Edit freely: the sections below say what each part is for.
#
# {options.nodes} Ray node(s), one Slurm task each, with {cpus} CPU(s) and {gpus} GPU(s);
# {per_host} Ray node(s) per host. Submit with `sbatch <this file>`.
{header}

set -euo pipefail

# --- Environment -------------------------------------------------------------------------
# The Python environment that has `campaign` and `ray` (the same version on every node).
export PATH={q(str(bin_dir))}:"$PATH"
# The campaign runs where it was prepared: the spec, the MLflow store (mlflow.db) and the work
# directory (MD cache, checkpoints) are here, on a file system every node sees.
cd {q(str(launch_dir))}
SPEC={q(str(spec_path))}

# --- Ports -------------------------------------------------------------------------------
# Every Ray process gets a port of its own: a block of 1000 ports chosen by the job id (two
# campaigns on one node do not collide) and, inside it, 10 ports (7 used) and 90 worker ports per
# Ray node on a host (several Ray nodes on one host do not collide either).
PORT_BASE=$(( 20000 + (SLURM_JOB_ID % 40) * 1000 ))
HEAD_PORT=$PORT_BASE
ray_node_ports() {{  # $1: index of this Ray node on its host (0: the head)
  local b=$(( PORT_BASE + 10 * $1 )) w=$(( PORT_BASE + 100 + 90 * $1 ))
  echo "--object-manager-port=$((b + 1)) --node-manager-port=$((b + 2))" \\
       "--metrics-export-port=$((b + 3)) --runtime-env-agent-port=$((b + 4))" \\
       "--dashboard-agent-grpc-port=$((b + 5)) --dashboard-agent-listen-port=$((b + 6))" \\
       "--min-worker-port=$w --max-worker-port=$((w + 89))"
}}
export -f ray_node_ports
export PORT_BASE

# --- Authentication ----------------------------------------------------------------------
# Ray >= 2.59 uses token authentication; head, workers and driver must agree on the mode and
# read the same token. The token is made here, readable by you alone, in a directory every
# node sees (override with CAMPAIGN_RAY_TOKEN_DIR), and removed when the job ends.
export RAY_AUTH_MODE=token
TOKEN_DIR=${{CAMPAIGN_RAY_TOKEN_DIR:-$HOME/.ray}}
mkdir -p "$TOKEN_DIR"
export RAY_AUTH_TOKEN_PATH="$TOKEN_DIR/campaign-$SLURM_JOB_ID.token"
(umask 077 && python -c "import secrets; print(secrets.token_hex(32))" > "$RAY_AUTH_TOKEN_PATH")
# No 30 s drain when Slurm signals the Ray processes at the end of the job.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
export RAY_USAGE_STATS_ENABLED=0

HEAD_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_IP=$(srun --nodes=1 --ntasks=1 --overlap -w "$HEAD_HOST" hostname -i | awk '{{print $1}}')
export RAY_ADDRESS="$HEAD_IP:$HEAD_PORT"

cleanup() {{
  # Ray nodes end with their Slurm steps; the token goes with the job.
  kill $(jobs -p) 2>/dev/null || true
  rm -f "$RAY_AUTH_TOKEN_PATH"
}}
trap cleanup EXIT

# --- Head ---------------------------------------------------------------------------------
# One task on the first node; CPU and GPU counts from the allocation; a short temp dir.
# ray_start retries a start that failed: on a busy node the raylet can give up waiting for its
# dashboard agent (a fixed 15 s in Ray); the leftovers of the failed attempt are stopped first.
ray_start() {{  # $1: index of this Ray node on its host; the rest: arguments of `ray start`
  local i=$1 dir=/tmp/rc$SLURM_JOB_ID-$1; shift
  for attempt in 1 2 3; do
    ray start --block $(ray_node_ports "$i") --temp-dir="$dir" --disable-usage-stats \\
      --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus={gpus} "$@" && return 0
    echo "ray start (Ray node $i) failed, attempt $attempt of 3" >&2
    pkill -f -- "$dir/" || true
    sleep 2
  done
  return 1
}}
export -f ray_start
srun --nodes=1 --ntasks=1 --exact -w "$HEAD_HOST" \\
  bash -c 'ray_start 0 --head --node-ip-address='"$HEAD_IP"' --port='"$HEAD_PORT"' \\
    --include-dashboard=false' &
HEAD_STEP=$!

# Wait until the head answers (at most 120 s); stop at once if it died.
for _ in $(seq 120); do
  kill -0 "$HEAD_STEP" 2>/dev/null || {{ echo "the Ray head failed to start" >&2; exit 1; }}
  ray status --address "$RAY_ADDRESS" >/dev/null 2>&1 && break
  sleep 1
done

# --- Workers ------------------------------------------------------------------------------
# The other tasks; each joins the head. On the head's own host a worker takes the next index.
WORKERS=$(( SLURM_NTASKS - 1 ))
if [ "$WORKERS" -gt 0 ]; then
  srun --ntasks="$WORKERS" --exact \\
    bash -c 'ray_start $(( SLURM_LOCALID + 1 )) --address='"$RAY_ADDRESS"' \\
      --node-ip-address=$(hostname -i | awk "{{print \\$1}}")' &
fi

# Wait until every Ray node has joined (at most 300 s).
for _ in $(seq 300); do
  kill -0 "$HEAD_STEP" 2>/dev/null || {{ echo "the Ray head died" >&2; exit 1; }}
  python - <<'EOF' && break
import os, sys
import ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
alive = sum(1 for node in ray.nodes() if node["Alive"])
sys.exit(0 if alive >= int(os.environ["SLURM_NTASKS"]) else 1)
EOF
  sleep 1
done

# --- Driver -------------------------------------------------------------------------------
# On the head's host; the only MLflow writer. Relaunching the same spec later resumes.
campaign launch "$SPEC" --address "$RAY_ADDRESS"
"""


def submit(script: Path) -> str:
    """Hand ``script`` to sbatch; return the job id (``sbatch --parsable``)."""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                             text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise SpecError("--submit", str(script), "sbatch is not on PATH; submit the script "
                        "from a Slurm login node") from None
    if out.returncode != 0:
        raise RuntimeError(f"sbatch refused the script: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]
