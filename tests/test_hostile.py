"""Hostile input, live: a real peer (training and serving) under a flood of bad messages.

Four peers of a tiny digits experiment run in this process over tcp (random gossip, so
every peer keeps pulling the victim).  Once the victim has trained a few rounds, another
process floods its inbox from raw DEALER sockets with tens of thousands of messages
(random bytes, random frame counts, valid requests mutated byte by byte, huge declared
sizes, wrong schema versions) and valid requests from sockets that never read a reply,
faster than the victim can answer.  Meanwhile an honest client pulls the victim every
50 ms and checks each model against the victim's own published snapshot.

Asserted: every pull of the honest client succeeds with the right model and versions
that never go back; the other peers' pulls of the victim succeed; the victim's training
loop keeps stepping through the flood; its refusal counters equal, reason by reason, what
the flooder's own decode of each message predicts (every bad message refused and counted,
none accepted); memory stays bounded; afterwards the peer is alive and finishes.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time

import pytest
import torch

from zmqgossip import config, fuzz, hosting, wire
from zmqgossip.net import Transport, make_directory

VICTIM = 0
PROBE = 99
FLOOD_S = 7.0
RSS_BOUND_MB = 80  # growth of this process's RSS while flooded (all four peers live here)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tiny_cfg(flood_share: float | None = None) -> config.ExperimentConfig:
    network = {"transport": "tcp", "timeout_s": 5.0}
    if flood_share is not None:
        network["flood_share"] = flood_share
    return config.validate({
        "name": "hostile", "method": "random", "schedule": "async", "peers": 4, "rounds": 100_000, "seed": 0,
        "data": {"dataset": "digits", "n_train": 30, "n_val": 10, "test_per_class": 10},
        "train": {"model": "mlp", "epochs": 1, "test_every": 0, "checkpoint_every": 0},
        "policy": {"n": 2},
        "network": network,
    })


def test_corpus_covers_every_category_and_its_refusals_are_deterministic():
    """The messages the flood sends: every category, nearly all refused, for many reasons."""
    rng = random.Random(1)
    reasons: dict[str, set] = {c: set() for c in fuzz.CATEGORIES}
    valid = 0
    for i in range(5000):
        cat = fuzz.CATEGORIES[i % len(fuzz.CATEGORIES)]
        frames = fuzz.hostile_message(rng, cat)
        r = fuzz.expected_reason(frames)
        assert r == fuzz.expected_reason([bytes(f) for f in frames])  # same answer twice
        if r is None:
            valid += 1
            assert cat == "mutated"  # only a mutation can leave a request valid
        else:
            reasons[cat].add(r)
    assert valid < 0.2 * 1000
    assert reasons["bad_version"] == {"version"}
    assert {"garbage", "frames"} <= reasons["random_frames"]
    assert {"garbage", "field", "too_large", "kind"} <= reasons["huge_sizes"]
    assert len(reasons["mutated"]) >= 4


@pytest.mark.parametrize("flood_share", [1.0, None], ids=["answering-all", "shedding"])
def test_flooded_peer_keeps_training_serving_and_counts_every_refusal(tmp_path, run_async, flood_share):
    """With ``flood_share`` 1 the victim answers every message, and its refusals match the
    flooder's predictions exactly; with the default it answers strangers within its budget
    and drops the rest unread (``shed``), never an honest puller's request."""
    cfg = tiny_cfg(flood_share)
    exact = flood_share == 1.0
    torch.set_num_threads(1)
    part = hosting.build_partition(cfg)
    rd = hosting.prepare_run(cfg, tmp_path / "run", part)
    directory = make_directory("tcp", range(cfg.peers))
    flooder = fuzz.Flooder(directory[VICTIM], seconds=FLOOD_S, seed=7)
    victim_events: list[tuple[float, int]] = []
    stop = asyncio.Event()
    report: dict = {}

    def on_event(e: dict) -> None:
        if e.peer == VICTIM:
            victim_events.append((time.monotonic(), e.step))

    async def probe(victim, probe_t: Transport, until: float) -> list:
        """Pull the victim every 50 ms; check each model against what it published."""
        seen = []
        failures = report.setdefault("probe_failures", [])
        while time.monotonic() < until:
            r = await probe_t.pull(VICTIM, timeout=5.0)
            if not r.ok:
                failures.append((time.monotonic(), r.reason, r.detail, r.latency_s))
                continue
            m = r.message
            assert m.sender == VICTIM and m.kind is wire.Kind.MODEL_REPLY
            pub = victim.transport.published
            if pub.version == m.version:  # the same snapshot: the same bytes
                want = wire.decode(pub.reply(VICTIM, 0), expect=probe_t.expect)
                for k, t in want.tensors.items():
                    assert torch.equal(m.tensors[k], t), k
            assert all(torch.isfinite(t).all() for t in m.tensors.values())
            seen.append((time.monotonic(), m.version, r.latency_s))
            await asyncio.sleep(0.05)
        return seen

    async def main() -> None:
        hosted = hosting.build_peers(cfg, part, list(range(cfg.peers)), directory, rd, time.time())
        peers = hosted.peers
        victim = peers[VICTIM]
        counters = lambda: victim.transport.counters
        tasks: dict[int, asyncio.Task] = {}
        try:
            for p in peers.values():
                await p.transport.start()
            for p in peers.values():
                await p.warmup()
            tasks = {pid: asyncio.create_task(p.run(on_event, stop)) for pid, p in peers.items()}
            while len(victim_events) < 3:  # warmed up and training
                await asyncio.sleep(0.05)
            gc.collect()
            report["rss0"] = rss_mb()
            report["msgs0"] = counters().msgs_in
            report["flood_start"] = time.monotonic()
            flooder.go()
            schema = wire.schema_of(victim.model.state_dict())
            probe_t = Transport(hosted.ctx, PROBE, directory, expect=schema, bind="tcp://127.0.0.1:0")
            try:
                report["seen"] = await probe(victim, probe_t, time.monotonic() + FLOOD_S + 2.0)
            finally:
                await probe_t.close()
            # The flooder keeps its sockets open until released, so every message it sent
            # reaches the victim: wait until the victim's counters catch up.
            flood_res = await asyncio.get_running_loop().run_in_executor(None, flooder.result)
            report["flood"] = flood_res
            assert "error" not in flood_res, flood_res
            # (Honest traffic is never refused nor shed, so the refusals tell when the flood is
            # all read: they reach what the flooder predicts, and, with valid requests shed
            # too, stop growing.)
            bad = sum(v for k, v in flood_res["expected"].items() if k != "valid")
            refused = lambda: sum(counters().refusals.get(k, 0) for k in (*wire.WireError.REASONS, "shed"))
            deadline = time.monotonic() + 15
            last, still = -1, 0
            while (refused() < bad or still < 10) and time.monotonic() < deadline:
                now = refused()
                still, last = (still + 1 if now == last else 0), now
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # and the valid requests queued behind the last bad one
            flooder.release()
            gc.collect()
            report["rss1"] = rss_mb()
            steps_after = len(victim_events)
            while len(victim_events) < steps_after + 2:  # alive: it still trains after the flood
                assert not tasks[VICTIM].done()
                await asyncio.sleep(0.05)
            report["counters"] = counters()
            stop.set()
            await asyncio.gather(*tasks.values())
            report["results"] = {pid: await p.finish() for pid, p in peers.items()}
        finally:
            for t in tasks.values():
                t.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await hosted.close()

    try:
        run_async(main(), timeout=38)
    finally:
        flooder.release()

    flood = report["flood"]
    c = report["counters"]
    seen = report["seen"]
    print(f"\nflood: {flood['sent']:,} messages in {flood['seconds']:.1f}s ({flood['rate']:,.0f}/s), "
          f"categories {flood['categories']}")
    print(f"victim msgs_in +{c.msgs_in - report['msgs0']:,}, refusals {dict(c.refusals)}, served {c.served}")
    lat = sorted(x[2] for x in seen)
    print(f"honest probe: {len(seen)} pulls, p50 {lat[len(lat) // 2] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms; "
          f"RSS {report['rss0']:.0f} -> {report['rss1']:.0f} MB")

    # Tens of thousands of messages, every category, all read by the victim.
    assert flood["sent"] >= 20_000
    assert set(flood["categories"]) == {*fuzz.CATEGORIES, "greedy"}
    assert c.msgs_in - report["msgs0"] >= flood["sent"]
    expected = {k: v for k, v in flood["expected"].items() if k != "valid"}
    counted = {k: c.refusals.get(k, 0) for k in wire.WireError.REASONS if c.refusals.get(k, 0)}
    shed = c.refusals.get("shed", 0)
    assert sum(expected.values()) > 0.6 * flood["sent"]
    if exact:
        # Every bad message refused with the reason its own decode predicts: counted exactly.
        assert shed == 0
        assert counted == expected, {k: (counted.get(k), expected.get(k)) for k in {*counted, *expected}}
    else:
        # Beyond its budget the victim dropped strangers' messages unread; every one it
        # read was refused for the reason its decode predicts, and none was accepted.
        assert shed > 0
        assert all(counted[k] <= expected.get(k, 0) for k in counted), (counted, expected)
        assert sum(counted.values()) + shed >= sum(expected.values())
    # The replies the flooder read back name the same reasons (a subset: it reads some).
    assert set(flood["replies"]) - {"model_reply", "pong"} <= set(expected)
    # Requests faster than it answers: the excess replies were dropped and counted, not queued.
    assert c.refusals.get("dropped_hwm", 0) > 0
    # An honest client was served throughout, right models, versions never going back.
    assert not report["probe_failures"], report["probe_failures"]
    flood_start = report["flood_start"]
    during = [s[0] for s in seen if flood_start <= s[0] <= flood_start + FLOOD_S]
    assert len(during) >= FLOOD_S
    assert max(b - a for a, b in zip([flood_start, *during], [*during, flood_start + FLOOD_S])) < 3.0
    versions = [v for _, v, _ in seen]
    assert versions == sorted(versions) and versions[-1] > versions[0]
    # The training loop kept stepping through the flood.
    steps = [t for t, _ in victim_events if flood_start <= t <= flood_start + FLOOD_S]
    assert len(steps) >= 3, victim_events
    gaps = [b - a for a, b in zip([flood_start, *steps], [*steps, flood_start + FLOOD_S])]
    assert max(gaps) < 4.0, gaps
    # The other peers' pulls of the victim succeeded.
    results = report["results"]
    assert sorted(results) == [0, 1, 2, 3] and all(r["status"] == "done" for r in results.values())
    for pid in (1, 2, 3):
        fails = results[pid]["counters"]["pull_failures"]
        assert not fails, (pid, fails)
        assert any(VICTIM in e.ok for e in rd.events(pid))
    # Memory bounded.
    assert report["rss1"] - report["rss0"] < RSS_BOUND_MB


def test_a_flooder_runs_on_the_cpus_it_is_given():
    """``Flooder(cpus=...)`` keeps the flooding process (and the threads it starts) off the
    other cores, as an attacker on another machine would be."""
    cpu = min(os.sched_getaffinity(0))
    flooder = fuzz.Flooder(make_directory("tcp", [0])[0], seconds=0.2, seed=1, cpus=[cpu])
    try:
        deadline = time.monotonic() + 60
        while os.sched_getaffinity(flooder.process.pid) != {cpu}:
            assert time.monotonic() < deadline, os.sched_getaffinity(flooder.process.pid)
            time.sleep(0.05)
        flooder.go()
        assert flooder.result()["seconds"] < 30  # it flooded (nobody listening) and stopped
    finally:
        flooder.release()
    assert flooder.process.exitcode == 0
