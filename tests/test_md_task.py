"""An actor that runs MD starts without PyTorch: the MD task's module imports none of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from boltzgen.pipeline import job_graph
from campaign.plan import make_plan
from campaign.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent


def test_md_task_module_does_not_import_torch(tmp_path: Path) -> None:
    """The function string of an ice job's MD tasks, resolved as an actor resolves it at its
    first task, in a fresh interpreter: torch is not among the imported modules after it."""
    spec = yaml.safe_load((ROOT / "specs" / "ice.yaml").read_text())
    job = make_plan(parse_spec(spec)).jobs[0]
    graph = job_graph(job.config_dict, job.job_id, str(tmp_path))
    functions = {task.function for task in graph.tasks if task.description == "MD run"}
    assert len(functions) == 1, functions
    (function,) = functions
    assert {task.role for task in graph.tasks if task.function == function} == {"reference"}
    code = ("import sys; from boltzgen.pipeline.graph import resolve; "
            f"resolve({function!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]
