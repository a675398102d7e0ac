"""Worker processes that start warm: forked from a server that imported the hosting code once.

A spawned worker starts a fresh interpreter and imports torch, ZeroMQ and the package
again (about a second on a 2-core machine, for every worker, after the parent has paid
the same). Workers here come from multiprocessing's forkserver instead: a process that
imports :mod:`zmqgossip.hosting` once and forks a worker per request. The server is
single-threaded and holds no ZeroMQ context or torch thread pool, so the rule "never
fork after ZeroMQ or torch threads exist" holds. A command that will start workers calls
:func:`prestart` first, so the server's imports run while the command does its own.

This module imports only the standard library: calling :func:`prestart` costs nothing.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

#: What the server imports before it forks anyone.
PRELOAD = ["zmqgossip.hosting"]


def context() -> BaseContext:
    """The multiprocessing context workers start from (the forkserver, preloaded)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts; a running one keeps its own
    return ctx


def prestart() -> None:
    """Start the server now (it imports in the background) if it is not running yet."""
    context()
    forkserver.ensure_running()


__all__ = ["PRELOAD", "context", "prestart"]
