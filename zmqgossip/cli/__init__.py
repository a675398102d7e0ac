"""The command line, one module per command: run, sweep, worker, stress, keys, presets, report, compare."""

from __future__ import annotations

import logging
import os
import sys

from . import compare, keys, presets, report, run, stress, sweep, worker  # noqa: F401  (registers the commands)
from .app import app


def main() -> None:
    """The ``zmqgossip`` console script: the app, then an exit without the interpreter's
    teardown. Unloading torch and the rest takes about half a second after a run, and
    every file a command writes is closed by then; only stdio and logging are flushed."""
    try:
        app()
        code: int = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["app", "main"]
