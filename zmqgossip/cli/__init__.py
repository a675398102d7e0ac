"""The command line, one module per command: run, sweep, worker, stress, keys, presets, report, compare."""

from . import compare, keys, presets, report, run, stress, sweep, worker  # noqa: F401  (registers the commands)
from .app import app

__all__ = ["app"]
