"""Progress reports of a running task, written where the driver reads them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from boltzgen._files import write_atomically

WRITE_EVERY_S = 2.0  # a report is written at most this often (and always the last step)


class ProgressFile:
    """A task's progress callback: the latest report as JSON in ``path`` (atomically), with
    the time the task started, so that a reader can tell it from an earlier launch's file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.started = time.time()
        self.written = 0.0

    def __call__(self, report: dict[str, Any]) -> None:
        now = time.time()
        last = report.get("step") is not None and report.get("step") == report.get("steps")
        if now - self.written < WRITE_EVERY_S and not last:
            return
        self.written = now
        text = json.dumps({**report, "started": self.started, "time": now})
        write_atomically(self.path, lambda staging: staging.write_text(text))
