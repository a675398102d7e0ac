"""The cyclic garbage collector while peers run.

A process that hosts peers holds a large, long-lived heap (torch and numpy, the data
set, models, sockets). Python's collector now and then runs a full collection over all
of it, and the pause grows with the heap: while it lasts no peer of the process serves a
pull or trains. While the peers run, what exists at their start is
frozen out of the collector (``gc.freeze``: none of it becomes garbage before the run
ends), so a full collection only looks at what the rounds made. Undone at the end.

The peer loop makes no reference cycles per round (``tests/test_peer_loop.py`` checks),
so its garbage is freed by reference counting as it goes, frames and tensors included.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def long_lived_heap() -> Iterator[None]:
    """Freeze the heap as it is until exit (garbage now is collected first, not frozen)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
