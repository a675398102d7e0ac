"""Memory settings for a process that moves models all day.

Every pull allocates and frees message buffers of the model's size (libzmq's receive
buffer, an inproc reply's copy, a snapshot). With glibc's defaults, a buffer of 128 KiB or
more is a fresh ``mmap`` that the kernel must fault in page by page and that ``free``
unmaps again: for 256 KiB pulls that churn was more than half the CPU of a pull. Keeping
such buffers in the heap (and not trimming it below a bound) reuses memory that is already
mapped. Large torch tensors go on transparent huge pages for the same reason (fewer TLB
misses when copying and checking big models).

Applied once when zmqgossip is imported (see ``__init__``); settings the user made through
the environment win. Only glibc is tuned; other C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 32 * 1024 * 1024  # buffers below this come from the heap (models up to 32 MB)
TRIM_THRESHOLD = 128 * 1024 * 1024  # free heap memory kept for reuse before returning it

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from <malloc.h>


def tune() -> dict[str, bool]:
    """Apply the settings to this process; say which took effect."""
    # torch reads this at its first allocation, so it only counts before torch is imported.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    done = {"torch_thp": os.environ["THP_MEM_ALLOC_ENABLE"] == "1", "malloc": False}
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return done  # the user tuned glibc already
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return done
    done["malloc"] = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return done
