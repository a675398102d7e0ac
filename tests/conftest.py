"""Shared fixtures: a reaper for stray child processes, a fresh asyncio ZeroMQ context,
and ``run_async`` (run a coroutine to completion under a hard timeout).

Tests in this project use real sockets and real processes; nothing here mocks ZeroMQ.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import zmq
import zmq.asyncio

T = TypeVar("T")

REAP_GRACE_S = 2.0


# ------------------------------------------------------------------ child processes


def _proc_children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``, from /proc (no psutil)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        rest = stat.rsplit(b")", 1)[-1].split()
        if len(rest) >= 2 and int(rest[1]) == pid:
            out.append(int(name))
    return out


def _helper_pids() -> set[int]:
    """multiprocessing's own long-lived helpers (resource tracker, forkserver): keep them."""
    keep = set()
    try:
        from multiprocessing import resource_tracker

        pid = getattr(resource_tracker._resource_tracker, "_pid", None)
        if pid:
            keep.add(pid)
    except Exception:
        pass
    try:
        from multiprocessing import forkserver

        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if pid:
            keep.add(pid)
    except Exception:
        pass
    return keep


def _alive(pid: int) -> bool:
    """True while ``pid`` (a child not managed by multiprocessing) runs; reaps it once exited."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child any more, or already reaped
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return done == 0


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def reap_children(grace_s: float = REAP_GRACE_S) -> list[int]:
    """Terminate every child process of this one (but multiprocessing's own helpers), then
    kill what is still alive after ``grace_s``. Returns the pids it had to stop.

    multiprocessing children are stopped through their ``Process`` objects (so that those
    learn the exit status); other children (subprocess, os.fork) by pid from /proc.
    """
    keep = _helper_pids()
    procs = [p for p in multiprocessing.active_children() if p.pid not in keep]  # also joins finished ones
    mp_pids = {p.pid for p in procs}
    others = [pid for pid in _proc_children(os.getpid()) if pid not in keep | mp_pids and _alive(pid)]
    if not procs and not others:
        return []
    for p in procs:
        p.terminate()
    for pid in others:
        _signal(pid, signal.SIGTERM)
    for sig in (signal.SIGKILL, None):
        deadline = time.monotonic() + grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(_alive(pid) for pid in others):
            time.sleep(0.02)
        if sig is None:
            break
        for p in procs:
            if p.is_alive():
                p.kill()
        for pid in others:
            if _alive(pid):
                _signal(pid, sig)
    return sorted(mp_pids | set(others))


@pytest.fixture(autouse=True)
def reap_stray_children():
    """Whatever a test leaves running (it failed before its own cleanup) is stopped here."""
    yield
    reap_children()


# ------------------------------------------------------------------ asyncio / zmq


def run_async(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """Run ``coro`` in a fresh event loop; fail the test (not hang) after ``timeout`` s."""

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"test coroutine did not finish within {timeout}s")

    return asyncio.run(bounded())


@pytest.fixture(name="run_async")
def run_async_fixture() -> Callable[..., Any]:
    """``run_async(coro, timeout=30)`` as a fixture, so test modules need no imports from here."""
    return run_async


@pytest.fixture
def actx():
    """A fresh ``zmq.asyncio.Context`` per test, destroyed (sockets closed, LINGER 0) after."""
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
def sctx():
    """A fresh synchronous ``zmq.Context`` per test, destroyed after."""
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Small tensors on a shared machine with few cores: extra torch threads only contend.
    (Runs set their own threads per process; this keeps in-process tests comparable.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
