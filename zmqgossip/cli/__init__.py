"""The command line, one module per command: run, worker, presets, report, compare."""

from . import compare, presets, report, run, worker  # noqa: F401  (registers the commands)
from .app import app

__all__ = ["app"]
