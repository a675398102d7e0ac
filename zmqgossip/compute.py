"""The compute thread of one process: its peers' scoring, training and snapshots run here.

Torch releases the GIL in its kernels, so the event loop keeps serving pulls while a
peer trains. A job hands its result back with one ``call_soon_threadsafe``: no
``concurrent.futures.Future`` and no chained asyncio future per job, which is what
``run_in_executor`` adds to each of the several jobs a peer-round sends here.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """One worker thread that runs jobs in the order they are given."""

    def __init__(self, name: str = "compute", initializer: Callable[[], None] | None = None) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future] | None] = (
            queue.SimpleQueue()
        )
        self._initializer = initializer
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[[], T]) -> tuple[T, float]:
        """``fn()`` run in the thread, and the seconds it took there (time spent queueing
        for the thread is not counted: that is not this job's compute)."""
        if self._closed:
            raise RuntimeError("the compute thread is shut down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._jobs.put((fn, loop, fut))
        return await fut

    def shutdown(self) -> None:
        """Cancel the jobs not started, let the running one finish, join the thread."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _hand_back(job[1], job[2], None, 0.0, asyncio.CancelledError())
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, loop, fut = job
            if fut.cancelled():  # its caller is gone (a read of a flag: safe from here)
                continue
            t = time.perf_counter()
            try:
                out, err = fn(), None
            except BaseException as e:  # handed to the awaiting task, raised there
                out, err = None, e
            _hand_back(loop, fut, out, time.perf_counter() - t, err)
            del job, fn, out, err  # the result belongs to the caller now


def _hand_back(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, out: Any, seconds: float,
               err: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_settle, fut, out, seconds, err)
    except RuntimeError:  # the loop is closed: nobody waits for this any more
        pass


def _settle(fut: asyncio.Future, out: Any, seconds: float, err: BaseException | None) -> None:
    if fut.done():  # cancelled while it ran
        return
    if isinstance(err, asyncio.CancelledError):
        fut.cancel()
    elif err is not None:
        fut.set_exception(err)
    else:
        fut.set_result((out, seconds))
