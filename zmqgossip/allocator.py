"""Memory settings for a process that hosts peers (they move models all day).

Every pull allocates and frees message buffers of the model's size (libzmq's receive
buffer, an inproc reply's copy, a snapshot). With glibc's defaults, a buffer of 128 KiB or
more is a fresh ``mmap`` that the kernel must fault in page by page and that ``free``
unmaps again, so a pull's CPU goes to page faults. Keeping such buffers in the heap (and
not trimming it below a bound) reuses memory that is already mapped. Large torch tensors
go on transparent huge pages for the same reason (fewer TLB misses when copying and
checking big models).

Importing zmqgossip changes nothing: a program that only reads configs, runs the CLI's
help or uses the wire codec keeps its allocator as it was. :func:`tune_for_hosting` is
called where peers are hosted (``hosting.host_peers``, ``stress.host_share``) and by the
commands that host them, before torch allocates anything. Settings the user made through
the environment win. Only glibc is tuned; other C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 32 * 1024 * 1024  # buffers below this come from the heap (models up to 32 MB)
TRIM_THRESHOLD = 128 * 1024 * 1024  # free heap memory kept for reuse before returning it

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from <malloc.h>


def tune_for_hosting() -> dict[str, bool]:
    """Apply the settings to this process; say which are in force. Idempotent.

    ``torch_thp``: huge pages for large tensors. torch reads the variable at its first
    allocation, so it counts in this process only if torch has allocated nothing yet, and
    in every worker process started after this call (they inherit the environment).
    ``malloc``: glibc keeps message-sized buffers in the heap from now on.
    """
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
