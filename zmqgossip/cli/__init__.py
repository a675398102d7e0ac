"""The command line, one module per command: run, worker, stress, keys, presets, report, compare."""

from . import compare, keys, presets, report, run, stress, worker  # noqa: F401  (registers the commands)
from .app import app

__all__ = ["app"]
