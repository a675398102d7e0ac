"""The endpoints of a run's peers: made before the workers start, removed after."""

from __future__ import annotations

import os
from collections.abc import Mapping


def remove_ipc(directory: Mapping[int, str]) -> None:
    """Remove the ipc socket files of ``directory`` and their folders (if empty)."""
    paths = [ep[len("ipc://"):] for ep in directory.values() if ep.startswith("ipc://")]
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
    for d in {os.path.dirname(p) for p in paths}:
        try:
            os.rmdir(d)
        except OSError:
            pass
