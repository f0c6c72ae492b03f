"""pymbar, imported once without its import-time chatter.

pymbar 4 prints a "JAX NOT FOUND" banner and a timeseries warning on import (to stdout); in a
campaign that noise lands in every user's terminal. The modules are imported lazily (pymbar is
slow to import) with stdout and stderr silenced, and the notice warnings filtered.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from types import ModuleType


@contextlib.contextmanager
def _silenced():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def pymbar() -> ModuleType:
    # Solver fallbacks ("Failed to reach a solution ... trying next method") are logged as
    # warnings although the next method succeeds; a real failure raises.
    logging.getLogger("pymbar").setLevel(logging.ERROR)
    with _silenced():
        import pymbar as module
        import pymbar.other_estimators  # noqa: F401
        import pymbar.timeseries  # noqa: F401
        import pymbar.utils  # noqa: F401
    return module
