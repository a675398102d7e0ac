"""The compute thread: jobs run off the event loop, in order, and come back to their caller."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from zmqgossip.compute import ComputeThread


def test_jobs_run_in_the_compute_thread_in_order_and_return_their_result_and_time(run_async):
    ct = ComputeThread("compute-test")
    ran: list[tuple[int, str]] = []

    def job(i: int):
        def fn() -> int:
            time.sleep(0.01 if i == 0 else 0)  # the first is slowest: order must still hold
            ran.append((i, threading.current_thread().name))
            return i * i
        return fn

    async def main() -> list[tuple[int, float]]:
        return await asyncio.gather(*(ct.run(job(i)) for i in range(5)))

    try:
        out = run_async(main())
    finally:
        ct.shutdown()
    assert [r for r, _ in out] == [0, 1, 4, 9, 16]
    assert out[0][1] >= 0.009  # the time measured in the thread
    assert [i for i, _ in ran] == [0, 1, 2, 3, 4]
    assert {name for _, name in ran} == {"compute-test"}


def test_an_exception_in_a_job_is_raised_in_its_caller_and_the_thread_goes_on(run_async):
    ct = ComputeThread()

    def bad() -> None:
        raise ValueError("broken job")

    async def main() -> int:
        with pytest.raises(ValueError, match="broken job"):
            await ct.run(bad)
        out, _ = await ct.run(lambda: 7)
        return out

    try:
        assert run_async(main()) == 7
    finally:
        ct.shutdown()


def test_the_event_loop_keeps_running_while_a_job_computes(run_async):
    ct = ComputeThread()
    release = threading.Event()
    ticks = 0

    async def main() -> None:
        nonlocal ticks
        job = asyncio.ensure_future(ct.run(lambda: release.wait(5)))
        for _ in range(20):  # the loop is free: these run while the job blocks its thread
            await asyncio.sleep(0.001)
            ticks += 1
        assert not job.done()
        release.set()
        assert (await job)[0] is True

    try:
        run_async(main())
    finally:
        ct.shutdown()
    assert ticks == 20


def test_shutdown_cancels_jobs_not_started_and_refuses_new_ones(run_async):
    ct = ComputeThread()
    gate = threading.Event()
    started = threading.Event()

    def first() -> str:
        started.set()
        gate.wait(5)
        return "first"

    async def main() -> None:
        a = asyncio.ensure_future(ct.run(first))
        b = asyncio.ensure_future(ct.run(lambda: "never"))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        # Shut down from another thread while the first job runs: the queued one is
        # cancelled, the running one finishes and hands its result back.
        stopper = threading.Thread(target=ct.shutdown)
        stopper.start()
        await asyncio.sleep(0.05)
        gate.set()
        assert (await a)[0] == "first"
        with pytest.raises(asyncio.CancelledError):
            await b
        stopper.join(5)
        with pytest.raises(RuntimeError, match="shut down"):
            await ct.run(lambda: None)

    run_async(main())


def test_a_cancelled_caller_does_not_wait_for_its_job_and_a_queued_job_is_skipped(run_async):
    ct = ComputeThread()
    gate = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        a = asyncio.ensure_future(ct.run(lambda: gate.wait(5)))
        b = asyncio.ensure_future(ct.run(lambda: ran.append("b")))
        await asyncio.sleep(0.01)
        b.cancel()
        await asyncio.sleep(0.01)
        gate.set()
        await a
        out, _ = await ct.run(lambda: "after")
        assert out == "after"

    try:
        run_async(main())
    finally:
        ct.shutdown()
    assert ran == []  # cancelled before it started: skipped
