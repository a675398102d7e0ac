"""The transport over real ZeroMQ sockets and real processes (no mocks)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import resource
import shutil
import tempfile
import time
from collections import Counter

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from zmqgossip import net as tp
from zmqgossip import wire
from zmqgossip.net import Transport, TransportConfig, TransportError, make_directory
from zmqgossip.net.admission import Admission
from zmqgossip.wire import Kind, ModelPayload, SnapshotMemory, schema_of

from _helpers import close_all, started

KINDS = ["inproc", "ipc", "tcp"]
SLACK_S = 0.5  # what a timeout may overrun by on a loaded 2-core machine


# --------------------------------------------------------------------------- helpers


def reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small model with every kind of entry a state dict has; the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(6, 3, 5, 5, generator=g),
        "conv1.bias": torch.randn(6, generator=g),
        "fc.weight": torch.randn(10, 84, generator=g),
        "bn.running_var": torch.rand(6, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(123),
        "half": torch.randn(7, generator=g).half(),
        "brain": torch.randn(7, generator=g).bfloat16(),
        "mask": torch.rand(9, generator=g) > 0.5,
        "empty": torch.zeros(0, 4),
    }


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def payload(state, version=1, step=0, n=400, scores=None) -> ModelPayload:
    return ModelPayload.build(state, step=step, version=version, n_samples=n, scores=scores)


@pytest.fixture
def directory_of():
    """``directory_of(kind, peers)``: endpoints for ``kind``; ipc directories removed after."""
    made = []

    def make(kind: str, peers) -> dict[int, str]:
        if kind == "ipc":
            base = tp.ipc_dir()
            made.append(base)
            return make_directory("ipc", peers, base=base)
        return make_directory(kind, peers)

    yield make
    for base in made:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("kind", KINDS)
def test_pull_returns_the_exact_published_tensors(kind, actx, directory_of, run_async):
    state = reference_state()

    async def body():
        ts = await started(actx, directory_of(kind, [0, 1]), [0, 1], expect=schema_of(state))
        try:
            ts[1].publish(payload(state, version=4, step=9, n=400, scores={0: 0.25, 7: 1.5}))
            r = await ts[0].pull(1, timeout=5)
            assert r.ok, r
            m = r.message
            assert (m.sender, m.version, m.step, m.n_samples, m.scores) == (1, 4, 9, 400, {0: 0.25, 7: 1.5})
            assert_same_state(m.tensors, state)
            assert r.nbytes == m.nbytes > sum(t.nbytes for t in state.values())
            assert ts[0].counters.pulls_ok == 1 and ts[1].counters.served == 1
            assert ts[1].counters.bytes_out == r.nbytes
        finally:
            await close_all(ts)

    run_async(body(), 30)


def test_a_pull_can_leave_the_value_check_to_the_caller_who_hands_a_refusal_back(actx, directory_of, run_async):
    """A peer checks pulled values in its compute thread (check_values=False): the pull
    delivers the model unchecked, and a model the caller refuses counts as a failed pull."""
    state = reference_state()
    poisoned = {k: v.clone() for k, v in state.items()}
    next(iter(poisoned.values())).view(-1)[5] = float("nan")

    async def body():
        ts = await started(actx, directory_of("inproc", [0, 1]), [0, 1], expect=schema_of(state))
        try:
            ts[1].publish(payload(poisoned))
            r = await ts[0].pull(1, timeout=5)
            assert not r.ok and r.reason == "nonfinite", r
            [r] = await ts[0].start_pulls([1], 5, check_values=False).wait()
            assert r.ok and not r.message.checked
            assert ts[0].counters.pulls_ok == 1 and ts[0].counters.pulls_failed == 1
            with pytest.raises(wire.WireError) as ei:
                wire.check_values(r.message, ts[0].config.limits)
            ts[0].refuse(r, ei.value)
            assert not r.ok and r.message is None and r.reason == "nonfinite"
            ts[0].refuse(r, ei.value)  # a failed pull is not counted twice
            c = ts[0].counters
            assert (c.pulls_ok, c.pulls_failed, dict(c.pull_failures)) == (0, 2, {"nonfinite": 2})
            ts[1].publish(payload(state, version=2))
            [r] = await ts[0].start_pulls([1], 5, check_values=False).wait()
            wire.check_values(r.message, ts[0].config.limits)
            assert r.message.checked
            assert_same_state(r.message.tensors, state)
        finally:
            await close_all(ts)

    run_async(body(), 30)


def test_pull_from_an_unknown_peer_fails_with_unknown_peer(actx, run_async):
    async def body():
        ts = await started(actx, make_directory("inproc", [0, 1]), [0, 1])
        try:
            for peer in (42, 0):  # not in the directory; myself
                r = await ts[0].pull(peer, timeout=1)
                assert not r.ok and r.reason == "unknown_peer"
            assert ts[0].counters.pull_failures == Counter(unknown_peer=2)
        finally:
            await close_all(ts)

    run_async(body(), 10)


@pytest.mark.parametrize("kind", ["inproc", "ipc"])
def test_pull_before_publishing_is_refused_not_ready(kind, actx, directory_of, run_async):
    async def body():
        ts = await started(actx, directory_of(kind, [0, 1]), [0, 1])
        try:
            r = await ts[0].pull(1, timeout=5)
            assert not r.ok and r.reason == "refused:not_ready"
            assert ts[1].counters.refusals == Counter(not_ready=1)
            ts[1].publish(payload(reference_state()))
            assert (await ts[0].pull(1, timeout=5)).ok
            ts[1].status["step"] = 3
            assert await ts[0].ping(1) == {"step": 3}
        finally:
            await close_all(ts)

    run_async(body(), 15)


@pytest.mark.parametrize("kind", ["inproc", "ipc"])
def test_changing_a_pulled_model_in_place_does_not_change_what_the_server_serves(kind, actx, directory_of, run_async):
    state = {"w": torch.ones(100_000)}  # above the zero-copy threshold

    async def body():
        ts = await started(actx, directory_of(kind, [0, 1]), [0, 1])
        try:
            ts[1].publish(payload(state))
            first = await ts[0].pull(1, timeout=5)
            first.message.tensors["w"].mul_(-7)  # e.g. aggregation in place
            second = await ts[0].pull(1, timeout=5)
            assert torch.equal(second.message.tensors["w"], state["w"])
        finally:
            await close_all(ts)

    run_async(body(), 15)


def test_two_inproc_directories_in_one_process_do_not_collide(actx, run_async):
    async def body():
        a = await started(actx, make_directory("inproc", [0, 1]), [0, 1])
        b = await started(actx, make_directory("inproc", [0, 1]), [0, 1])
        await close_all(a)
        await close_all(b)

    run_async(body(), 10)


def test_server_that_lies_about_its_sender_id_is_refused_as_sender(actx, run_async):
    state = reference_state()

    async def body():
        d = make_directory("inproc", [0, 1])
        router = actx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(d[1])
        served = []

        async def liar():
            while True:
                rid, head = await router.recv_multipart()
                req = wire.decode([head])
                served.append(req.request_id)
                await router.send_multipart([rid, *wire.encode_model(state, sender=999, request_id=req.request_id)])

        task = asyncio.create_task(liar())
        t = Transport(actx, 0, d)
        await t.start()
        try:
            r = await t.pull(1, timeout=5)
            assert not r.ok and r.reason == "sender", r
            assert "999" in r.detail and served
            assert t.counters.pull_failures == Counter(sender=1)
            # with the check off, the same reply is taken
            t2 = Transport(actx, 5, d, config=TransportConfig(check_sender=False), bind="inproc://zg-unused-5")
            await t2.start()
            r2 = await t2.pull(1, timeout=5)
            await t2.close()
            assert r2.ok and r2.message.sender == 999
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await t.close()
            router.close(0)

    run_async(body(), 15)


def test_silent_peer_times_out_within_its_timeout(actx, run_async):
    async def body():
        d = make_directory("inproc", [0, 1])
        router = actx.socket(zmq.ROUTER)  # bound, connected, never answers
        router.setsockopt(zmq.LINGER, 0)
        router.bind(d[1])
        t = Transport(actx, 0, d)
        await t.start()
        try:
            t0 = time.perf_counter()
            r = await t.pull(1, timeout=0.3)
            elapsed = time.perf_counter() - t0
            assert not r.ok and r.reason == "timeout"
            assert 0.3 <= elapsed < 0.3 + SLACK_S
            assert 1 not in t.pool.sockets  # the socket with the unanswered request is gone
            assert await t.ping(1, timeout=0.2) is None
        finally:
            await t.close()
            router.close(0)

    run_async(body(), 10)


@pytest.mark.parametrize("kind", ["inproc", "ipc"])
def test_concurrent_pulls_of_one_peer_take_turns_on_its_socket_and_each_gets_the_model(kind, actx, directory_of, run_async):
    state = reference_state(3)

    async def body():
        d = directory_of(kind, [0, 1])
        ts = await started(actx, d, [0, 1])
        ts[1].publish(payload(state))
        try:
            # one socket per peer, one request in flight on it: the other pulls queue behind
            many = await ts[0].pull_many([1] * 6, timeout=5)
            single = await asyncio.gather(*(ts[0].pull(1, timeout=5) for _ in range(4)))
            for r in [*many, *single]:
                assert r.ok, r
                assert_same_state(r.message.tensors, state)
            assert ts[0].sockets_open == 2  # the inbox and one DEALER
            assert ts[0].counters.pulls_ok == 10 and ts[1].counters.served == 10
        finally:
            await close_all(ts)

    run_async(body(), 20)


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_a_peer_that_is_down_fails_fast_and_is_pulled_again_once_it_is_up(kind, actx, directory_of, run_async):
    async def body():
        d = directory_of(kind, [0, 1])
        me = Transport(actx, 0, d)
        await me.start()
        up: Transport | None = None
        try:
            t0 = time.perf_counter()  # nobody listens at peer 1's endpoint yet
            r = await me.pull(1, timeout=0.3)
            assert not r.ok and r.reason == "unreachable", r
            assert 0.3 <= time.perf_counter() - t0 < 0.3 + SLACK_S
            t0 = time.perf_counter()
            r = await me.pull(1, timeout=10)
            assert r.reason == "unreachable" and time.perf_counter() - t0 < 0.1  # known down: at once
            up = Transport(actx, 1, d)
            await up.start()
            up.publish(payload({"w": torch.full((4,), 7.0)}, version=2))
            for _ in range(100):  # the kept socket reconnects by itself
                r = await me.pull(1, timeout=5)
                if r.ok:
                    break
                await asyncio.sleep(0.05)
            assert r.ok and r.message.version == 2 and torch.equal(r.message.tensors["w"], torch.full((4,), 7.0))
            assert me.counters.pull_failures["unreachable"] >= 2 and me.counters.pull_failures["timeout"] == 0
        finally:
            await me.close()
            if up is not None:
                await up.close()

    run_async(body(), 30)


def test_an_inproc_peer_that_stopped_serving_fails_at_once_and_is_pulled_again_when_back(actx, run_async):
    async def body():
        d = make_directory("inproc", [0, 1])
        serving: set[str] = set()  # what the runner shares between the transports of a process
        me = Transport(actx, 0, d, serving=serving)
        peer = Transport(actx, 1, d, serving=serving)
        await me.start()
        r = await me.pull(1, timeout=5)  # not started yet
        assert r.reason == "unreachable" and r.latency_s < 0.1, r
        await peer.start()
        peer.publish(payload({"w": torch.ones(3)}, version=1))
        assert (await me.pull(1, timeout=5)).ok
        await peer.close()
        t0 = time.perf_counter()
        r = await me.pull(1, timeout=5)
        assert r.reason == "unreachable" and time.perf_counter() - t0 < 0.1, r  # not after 5 s
        back = peer.reopen()  # a rejoining peer: same endpoint, same snapshot
        await back.start()
        try:
            r = await me.pull(1, timeout=5)
            assert r.ok and r.message.version == 1
        finally:
            await back.close()
            await me.close()

    run_async(body(), 20)


def test_an_inproc_peer_can_serve_again_at_its_name_right_after_closing(actx, run_async):
    """ZeroMQ frees a closed inproc name only when its reaper gets to the socket; a peer that
    rejoins at once must still bind it (without the retry, about a third of these fail)."""
    async def body():
        d = make_directory("inproc", [0, 1])
        me = Transport(actx, 0, d)
        await me.start()
        try:
            for i in range(100):
                t = Transport(actx, 1, d)
                await t.start()
                t.publish(payload({"w": torch.full((2,), float(i))}, version=i + 1))
                r = await me.pull(1, timeout=5)
                assert r.ok and r.message.version == i + 1
                await t.close()
                me.pool.evict(1)  # an inproc socket to a closed peer never reconnects
        finally:
            await me.close()

    run_async(body(), 60)


def test_a_cancelled_pull_counts_nothing_and_leaves_the_transport_usable(actx, run_async):
    state = reference_state(4)

    async def body():
        d = make_directory("inproc", [0, 1, 2])
        router = actx.socket(zmq.ROUTER)  # peer 1: bound, never answers
        router.setsockopt(zmq.LINGER, 0)
        router.bind(d[1])
        ts = await started(actx, d, [0, 2])
        ts[2].publish(payload(state))
        try:
            task = asyncio.create_task(ts[0].pull_many([1, 1, 2], timeout=30))
            await asyncio.sleep(0.2)
            assert not task.done()  # waiting on the silent peer (one pull queued behind)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            c = ts[0].counters
            assert c.pulls_failed == 0 and c.pull_failures == Counter()
            assert 1 not in ts[0].pool.sockets  # its socket may still get the reply: dropped
            assert not ts[0].pool.open - set(ts[0].pool.sockets.values())  # nothing left open on the side
            r = await ts[0].pull(2, timeout=5)
            assert r.ok and ts[0].counters.pulls_ok == 2  # the pull of 2 finished before the cancel
        finally:
            await close_all(ts)
            router.close(0)

    run_async(body(), 15)


def test_closing_a_transport_fails_its_pulls_in_flight_and_queued_at_once(actx, run_async):
    async def body():
        d = make_directory("inproc", [0, 1])
        router = actx.socket(zmq.ROUTER)  # never answers
        router.setsockopt(zmq.LINGER, 0)
        router.bind(d[1])
        t = Transport(actx, 0, d)
        await t.start()
        try:
            task = asyncio.create_task(t.pull_many([1, 1, 1], timeout=30))
            await asyncio.sleep(0.2)
            await t.close()
            results = await asyncio.wait_for(task, 5)  # now, not after the 30 s timeout
            assert [r.reason for r in results] == ["socket"] * 3
            assert not t.pool.open and t.sockets_open == 0
        finally:
            await t.close()
            router.close(0)

    run_async(body(), 15)


@pytest.mark.parametrize("kind", ["inproc", "ipc"])
def test_every_model_pulled_while_the_server_republishes_is_self_consistent(kind, actx, directory_of, run_async):
    live = {
        "a": torch.zeros(20_000),  # above the zero-copy threshold
        "b": torch.zeros(10, 10, dtype=torch.float64),
        "c": torch.zeros(3, dtype=torch.bfloat16),
        "n": torch.zeros((), dtype=torch.int64),
    }

    async def body():
        ts = await started(actx, directory_of(kind, range(5)), range(5))
        server = ts[0]
        stop = asyncio.Event()
        published = []
        memory = SnapshotMemory(keep=2)  # as a peer publishes: snapshots reuse free buffers
        kept: list = []  # every pulled model stays referenced until the end

        async def publisher():
            k = 0
            while not stop.is_set():
                k += 1
                for t in live.values():
                    t.fill_(k % 256)  # training changes the live model in place
                server.publish(ModelPayload.build(live, step=k, version=k, n_samples=1, memory=memory))
                published.append(k)
                await asyncio.sleep(0)

        async def puller(t: Transport, n: int) -> list[int]:
            seen = []
            for _ in range(n):
                r = await t.pull(0, timeout=5)
                assert r.ok, r
                v = r.message.version
                assert r.message.step == v
                for name, x in r.message.tensors.items():
                    assert bool((x == v % 256).all()), f"torn model: {name} != version {v}"
                seen.append(v)
                kept.append(r.message)
            return seen

        pub = asyncio.create_task(publisher())
        try:
            await asyncio.sleep(0)
            seen = await asyncio.gather(*(puller(ts[p], 60) for p in range(1, 5)))
        finally:
            stop.set()
            await pub
            await close_all(ts)
        for s in seen:
            assert s == sorted(s)  # one puller never goes back in time
        assert len(set(v for s in seen for v in s)) > 10  # versions really changed under the pulls
        assert len(published) > 10
        # A snapshot buffer is reused only once nothing refers to it: the models pulled
        # long ago (same process: inproc shares the publisher's memory) are unchanged.
        for m in kept:
            for name, x in m.tensors.items():
                assert bool((x == m.version % 256).all()), f"model {m.version} overwritten later: {name}"
        assert memory.reused > 0  # and buffers nobody held were reused

    run_async(body(), 60)


@pytest.mark.parametrize("kind", ["inproc", "ipc"])
def test_malformed_requests_are_counted_by_reason_and_honest_peers_still_served(kind, actx, directory_of, run_async):
    state = reference_state()
    head = lambda *h: msgpack.packb(list(h))  # noqa: E731
    bad = [
        ([b"\xc1garbage"], "garbage"),
        ([b""], "garbage"),
        ([head(wire.SCHEMA_VERSION + 1, 1, 5, 1)], "version"),
        ([head(wire.SCHEMA_VERSION, 99, 5, 2)], "kind"),
        ([bytes(f) for f in wire.encode_model({"w": torch.zeros(3)}, sender=5)], "kind"),  # a reply is no request
        ([head(wire.SCHEMA_VERSION, 1, 5, 3), b"\x80", b"extra"], "frames"),
        ([head(wire.SCHEMA_VERSION, 1, -5, 4)], "field"),
    ]

    async def body():
        d = directory_of(kind, [0, 1])
        ts = await started(actx, d, [0, 1], expect=schema_of(state))
        ts[1].publish(payload(state))
        raw = actx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(d[1])
        try:
            for frames, reason in bad:
                await raw.send_multipart(frames)
                reply = await asyncio.wait_for(raw.recv_multipart(), 5)
                err = wire.decode(reply)
                assert err.kind is Kind.ERROR_REPLY and err.reason == reason, (frames, err)
                r = await ts[0].pull(1, timeout=5)  # an honest peer in between: still served
                assert r.ok, r
                assert_same_state(r.message.tensors, state)
            want = Counter(reason for _, reason in bad)
            if kind == "inproc":  # inproc bypasses MAXMSGSIZE: the head bound refuses it
                await raw.send_multipart([b"\x00" * 100_000])
                assert wire.decode(await asyncio.wait_for(raw.recv_multipart(), 5)).reason == "too_large"
                want["too_large"] += 1
            else:  # over the inbox's MAXMSGSIZE: ZeroMQ drops the connection, nothing reaches us
                await raw.send_multipart([b"\x00" * 100_000])
            assert (await ts[0].pull(1, timeout=5)).ok
            assert ts[1].counters.refusals == want
            assert ts[1].counters.served == len(bad) + 1
        finally:
            raw.close(0)
            await close_all(ts)

    run_async(body(), 20)


def test_admission_trusts_answered_senders_and_budgets_the_others():
    with pytest.raises(ValueError):
        Admission(share=0.0)
    a = Admission(share=0.1, burst_s=0.01, max_trusted=3)
    t0 = time.perf_counter()
    a.refill(t0)
    assert a.may_answer
    a.charge(0.02)  # a stranger's message took longer than the saved budget
    assert not a.may_answer
    a.refill(t0 + 0.05)  # 50 ms earn 5 ms: not yet back
    assert not a.may_answer
    a.refill(t0 + 1.0)  # refilled, but never past the burst
    a.charge(0.0099)
    assert a.may_answer
    a.charge(0.0002)
    assert not a.may_answer
    for rid in (b"p1", b"p2", b"p3", b"p4"):
        a.trust(rid)
    assert not a.is_trusted(b"p1") and all(a.is_trusted(r) for r in (b"p2", b"p3", b"p4"))  # bounded
    a.distrust(b"p3")
    assert not a.is_trusted(b"p3")


def test_a_flooded_inbox_sheds_strangers_beyond_its_budget_and_answers_trusted_peers(actx, directory_of, run_async):
    """Thousands of garbage messages from stranger sockets while a peer that was served
    before keeps pulling: every pull is answered, every garbage message is read and either
    refused or (beyond the budget) dropped unread, and the strangers get no model."""
    state = reference_state()
    n_garbage, n_strangers = 20_000, 4

    async def body():
        d = directory_of("ipc", [0, 1])
        ts = await started(actx, d, [0, 1], expect=schema_of(state), config=TransportConfig(flood_share=0.01))
        ts[1].publish(payload(state))
        assert (await ts[0].pull(1, timeout=5)).ok  # answered once: trusted from now on
        strangers = [actx.socket(zmq.DEALER) for _ in range(n_strangers)]
        for s in strangers:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d[1])

        async def flood():
            for i in range(n_garbage):
                await strangers[i % n_strangers].send_multipart([b"\xc1garbage"])

        async def honest():
            out = []
            while not flooding.done():
                out.append(await ts[0].pull(1, timeout=5))
            return out

        try:
            flooding = asyncio.ensure_future(flood())
            pulls = await honest()
            await flooding
            c = ts[1].counters
            deadline = time.monotonic() + 10
            while c.refusals["garbage"] + c.refusals["shed"] < n_garbage and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert c.refusals["garbage"] + c.refusals["shed"] == n_garbage
            assert c.refusals["shed"] > 0 and c.refusals["garbage"] > 0
            assert pulls and all(r.ok for r in pulls), [r.reason for r in pulls if not r.ok]
            assert c.served == 1 + len(pulls)
            assert set(c.refusals) <= {"garbage", "shed", "dropped_hwm"}  # strangers never read their error replies
        finally:
            for s in strangers:
                s.close(0)
            await close_all(ts)

    run_async(body(), 60)


def test_lru_pool_stays_within_pool_size_when_pulling_many_peers(actx, run_async):
    pool = 3
    n = 3 * pool

    async def body():
        ts = await started(actx, make_directory("inproc", range(n + 1)), range(n + 1), config=TransportConfig(pool_size=pool))
        try:
            for p in range(1, n + 1):
                ts[p].publish(payload({"w": torch.full((4,), float(p))}, version=p))
            me = ts[0]
            rng = random.Random(0)
            for _ in range(3):
                order = list(range(1, n + 1))
                rng.shuffle(order)
                for p in order:
                    r = await me.pull(p, timeout=5)
                    assert r.ok and r.message.version == p and float(r.message.tensors["w"][0]) == p
                    assert len(me.pool.sockets) <= pool
                    assert me.sockets_open <= pool + 1
            # more concurrent pulls than the pool holds: busy sockets stay open meanwhile,
            # and no pull may find its socket closed under it by the LRU
            results = await me.pull_many(range(1, n + 1), timeout=5)
            assert [r.ok for r in results] == [True] * n, [r.reason for r in results]
            assert (await me.pull(1, timeout=5)).ok
            assert len(me.pool.sockets) <= pool
            assert me.counters.pulls_failed == 0
        finally:
            await close_all(ts)

    run_async(body(), 30)


def test_a_batch_that_cannot_open_a_socket_raises_and_leaves_no_pull_behind(directory_of, run_async):
    """Opening a DEALER fails (the context's socket limit) for the third of four pulls: the
    call raises, the two pulls already sent are dropped without a count or a timer left
    behind, and the transport pulls normally within its limit afterwards."""
    server_ctx = zmq.asyncio.Context()
    ctx = zmq.asyncio.Context()
    ctx.set(zmq.MAX_SOCKETS, 2)  # two DEALERs, no more

    async def body():
        directory = directory_of("ipc", range(5))
        servers = await started(server_ctx, directory, range(1, 5))
        me = Transport(ctx, 0, directory, config=TransportConfig(pool_size=4))  # pulls only
        try:
            for p, t in servers.items():
                t.publish(payload({"w": torch.full((3,), float(p))}, version=p))
            with pytest.raises(zmq.ZMQError):
                await me.pull_many([1, 2, 3, 4], timeout=5)
            assert me.counters.pulls_ok == me.counters.pulls_failed == 0
            assert all(d.users == 0 and d.op is None for d in me.pool.open)
            pending = [h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()]
            assert not [h for h in pending if type(getattr(h._callback, "__self__", None)).__name__ in ("PullBatch", "Pull")]
            # The sockets of the dropped pulls are closed (a late reply may still come);
            # ZeroMQ frees their slots a moment later, and two pulls fit again.
            for _ in range(100):
                try:
                    results = await me.pull_many([1, 2], timeout=5)
                    break
                except zmq.ZMQError:
                    await asyncio.sleep(0.02)
            assert [r.ok for r in results] == [True, True], [r.reason for r in results]
            assert [float(r.message.tensors["w"][0]) for r in results] == [1.0, 2.0]
        finally:
            await me.close()
            await close_all(servers)

    try:
        run_async(body(), 30)
    finally:
        ctx.destroy(linger=0)
        server_ctx.destroy(linger=0)


def test_thousand_peers_in_one_process_pull_without_failure_and_bounded_sockets(run_async):
    n, pool, fanout = 1000, 2, 3
    ctx = zmq.asyncio.Context()
    soft_before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        budget = tp.preflight(ctx, n, pool, "inproc")  # before the first socket
        fds_before = len(os.listdir("/proc/self/fd"))

        async def body():
            d = make_directory("inproc", range(n))
            ts = await started(ctx, d, range(n), config=TransportConfig(pool_size=pool, timeout_s=20))
            try:
                for p, t in ts.items():
                    t.publish(payload({"w": torch.full((16,), float(p))}, version=p))
                most_sockets = 0

                async def peer_loop(p: int) -> list[wire.Message]:
                    nonlocal most_sockets
                    rng = random.Random(p)
                    out = []
                    for q in rng.sample([x for x in range(n) if x != p], fanout):
                        r = await ts[p].pull(q, timeout=20)
                        assert r.ok, r
                        assert r.message.sender == q and float(r.message.tensors["w"][0]) == q
                        out.append(r.message)
                        most_sockets = max(most_sockets, sum(t.sockets_open for t in ts.values()) if q % 50 == 0 else 0)
                    return out

                got = await asyncio.gather(*(peer_loop(p) for p in range(n)))
                assert sum(len(x) for x in got) == n * fanout
                open_now = sum(t.sockets_open for t in ts.values())
                assert open_now <= budget.sockets and most_sockets <= budget.sockets
                assert all(len(t.pool.sockets) <= pool for t in ts.values())
                assert len(os.listdir("/proc/self/fd")) - fds_before <= budget.fds
                assert sum(t.counters.pulls_failed for t in ts.values()) == 0
            finally:
                await close_all(ts)

        t0 = time.perf_counter()
        run_async(body(), 60)
        assert time.perf_counter() - t0 < 60
    finally:
        ctx.destroy(linger=0)
        resource.setrlimit(resource.RLIMIT_NOFILE, soft_before)


# --------------------------------------------------------------------------- preflight, endpoints


def test_preflight_for_an_impossible_number_of_peers_says_which_limit_to_raise(sctx):
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with pytest.raises(TransportError) as ei:
            tp.preflight(sctx, 10**7, 8, "tcp")
        msg = str(ei.value)
        assert "file descriptors" in msg and "ulimit -n" in msg
        assert str(tp.socket_budget(10**7, 8, "tcp").fds) in msg
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_preflight_for_a_possible_number_of_peers_raises_max_sockets(sctx):
    b = tp.preflight(sctx, 1500, 2, "inproc")
    assert b == tp.socket_budget(1500, 2, "inproc") and b.sockets >= 1500 * 3  # inbox + pool per peer, at least
    assert sctx.get(zmq.MAX_SOCKETS) >= b.sockets


def test_ipc_paths_fit_sun_path_even_under_a_very_long_tmpdir(tmp_path, monkeypatch):
    long_dir = tmp_path / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    assert len(str(long_dir)) > tp.IPC_PATH_MAX
    monkeypatch.setenv("TMPDIR", str(long_dir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # make tempfile read TMPDIR again
    assert tempfile.gettempdir() == str(long_dir)
    peers = [0, 7, 999_999, 10**12]
    d = make_directory("ipc", peers)
    base = os.path.dirname(d[0][len("ipc://") :])
    try:
        for e in d.values():
            assert len(e[len("ipc://") :].encode()) <= tp.IPC_PATH_MAX, e
        ctx = zmq.Context()
        try:
            s = ctx.socket(zmq.ROUTER)
            s.bind(d[10**12])  # the longest one really binds
            s.close(0)
        finally:
            ctx.destroy(linger=0)
        with pytest.raises(TransportError, match="107"):
            make_directory("ipc", peers, base=str(long_dir))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unknown_transport_kind_is_refused():
    with pytest.raises(TransportError):
        make_directory("udp", [0])


# --------------------------------------------------------------------------- two processes


def _serve_in_child(conn, ipc_endpoint: str, seed: int) -> None:
    """Child process: peers 1 (ipc) and 2 (tcp) serve ``reference_state(seed)``."""
    torch.set_num_threads(1)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        d = {1: ipc_endpoint, 2: "tcp://127.0.0.1:0"}
        ts = {p: Transport(ctx, p, d) for p in d}
        state = reference_state(seed)
        for t in ts.values():
            await t.start()
            t.publish(ModelPayload.build(state, step=5, version=3, n_samples=400))
        conn.send({p: t.endpoint for p, t in ts.items()})
        while not conn.poll():
            await asyncio.sleep(0.02)
        conn.recv()
        conn.send({p: t.counters.as_dict() for p, t in ts.items()})
        for t in ts.values():
            await t.close()
        ctx.term()

    asyncio.run(main())


@pytest.fixture
def child_server(directory_of):
    """A server process (spawned) with peer 1 on ipc and peer 2 on tcp; always stopped."""
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    ipc = directory_of("ipc", [1])[1]
    proc = mp.Process(target=_serve_in_child, args=(child, ipc, 0), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(60):
            pytest.fail("server process did not start within 60s")
        endpoints = parent.recv()
        yield proc, parent, endpoints
    finally:
        if proc.is_alive():
            try:
                parent.send("stop")
            except OSError:
                pass
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()


def test_pull_across_processes_over_ipc_and_tcp_returns_the_exact_tensors(child_server, actx, run_async):
    proc, conn, endpoints = child_server
    state = reference_state(0)

    async def body():
        d = {0: make_directory("inproc", [0])[0], **endpoints}
        me = Transport(actx, 0, d, expect=schema_of(state))
        await me.start()
        try:
            for peer in (1, 2):
                for _ in range(3):
                    r = await me.pull(peer, timeout=10)
                    assert r.ok, r
                    assert (r.message.sender, r.message.version, r.message.step, r.message.n_samples) == (peer, 3, 5, 400)
                    assert_same_state(r.message.tensors, state)
        finally:
            await me.close()

    run_async(body(), 40)
    conn.send("stop")
    assert conn.poll(10)
    counters = conn.recv()
    assert counters[1]["served"] == 3 and counters[2]["served"] == 3
    proc.join(10)
    assert proc.exitcode == 0


def test_pull_from_killed_peer_fails_within_timeout_and_pool_stays_usable(child_server, actx, run_async):
    proc, conn, endpoints = child_server
    timeout = 1.0

    async def body():
        d = {**make_directory("inproc", [0, 3]), **endpoints}
        ts = await started(actx, d, [0, 3])
        me, neighbour = ts[0], ts[3]
        neighbour.publish(payload({"w": torch.ones(8)}, version=1))
        try:
            for peer in (1, 2, 3):  # all alive: sockets to them are now pooled and connected
                assert (await me.pull(peer, timeout=10)).ok
            os.kill(proc.pid, 9)
            proc.join(5)
            assert proc.exitcode == -9
            # A request sent before the socket saw the peer go times out (and that socket is
            # evicted: it may hold the request); a socket that never connects fails the
            # pull as unreachable and stays, reconnecting.
            for peer in (1, 2, 1, 2):
                t0 = time.perf_counter()
                r = await me.pull(peer, timeout=timeout)
                elapsed = time.perf_counter() - t0
                assert not r.ok and r.reason in ("timeout", "unreachable"), r
                assert elapsed < timeout + SLACK_S, elapsed
            assert r.reason == "unreachable" and 2 in me.pool.sockets
            r = await me.pull(3, timeout=5)  # the pool still works for everyone else
            assert r.ok and torch.equal(r.message.tensors["w"], torch.ones(8))
            t0 = time.perf_counter()  # known unreachable: fails at once, not after its timeout
            results = await me.pull_many([3, 1, 3, 2], timeout=timeout)
            assert [x.reason for x in results] == [None, "unreachable", None, "unreachable"]
            assert time.perf_counter() - t0 < timeout / 2
            assert sum(me.counters.pull_failures.values()) == 6
            assert set(me.counters.pull_failures) <= {"timeout", "unreachable"}
        finally:
            await close_all(ts)

    run_async(body(), 30)
