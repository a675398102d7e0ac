"""Fuzz throughput of a live peer, and honest pull latency with and without the flood.

Four peers of a tiny digits experiment (random gossip, async) train and serve in this
process over loopback tcp; peer 0 is the victim.  In the same run, three phases of equal
length:

  before  an honest peer in another process pulls the victim every 20 ms
  flood   the same, while a third process floods the victim's inbox from raw DEALER
          sockets (``zmqgossip.fuzz.flood``: random bytes, random frame counts, mutated
          requests, huge declared sizes, wrong schema versions, and valid requests from
          sockets that never read a reply)
  after   the flood has stopped; the honest pulls go on

Reported per phase: the honest pulls (ok / failed) and their latency p50 / p99 / max, the
messages per second the victim read and refused, and the victim's training rounds per
second.  Fuzz throughput is the messages per second the victim handled during the flood.
Timing is never asserted.

Usage: python benchmarks/bench_fuzz.py [--quick] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch
from _common import environment, json_line, pct, table

from zmqgossip import config, fuzz, hosting, wire
from zmqgossip.metrics import Event
from zmqgossip.net import Transport, make_directory

VICTIM = 0
HONEST_ID = 90
PULL_EVERY_S = 0.02


def experiment() -> config.ExperimentConfig:
    return config.validate({
        "name": "bench-fuzz", "method": "random", "schedule": "async", "peers": 4, "rounds": 10**6, "seed": 0,
        "data": {"dataset": "digits", "n_train": 30, "n_val": 10, "test_per_class": 10},
        "train": {"model": "mlp", "epochs": 1, "test_every": 0, "checkpoint_every": 0},
        "policy": {"n": 2},
        "network": {"transport": "tcp", "timeout_s": 5.0},
    })


def honest_puller(directory: dict, schema: dict, seconds: float, ready, go, out) -> None:
    """Another process: once started (its imports done), say ``ready``; then pull the victim
    every 20 ms from the start time (wall clock) it is sent on ``go``, for ``seconds``."""
    import zmq.asyncio

    ready.set()
    start = go.get(timeout=600)

    async def main() -> list:
        ctx = zmq.asyncio.Context()
        t = Transport(ctx, HONEST_ID, directory, expect=schema, bind="tcp://127.0.0.1:0")
        rows = []
        await asyncio.sleep(max(0.0, start - time.time()))
        end = start + seconds
        try:
            while time.time() < end:
                t0 = time.time()
                r = await t.pull(VICTIM, timeout=5.0)
                rows.append((t0, r.latency_s, r.ok, r.reason))
                await asyncio.sleep(max(0.0, PULL_EVERY_S - (time.time() - t0)))
        finally:
            await t.close()
            ctx.destroy(0)
        return rows

    out.put(asyncio.run(main()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s phases instead of 10 s")
    ap.add_argument("--seconds", type=float, default=None, help="length of each phase")
    args = ap.parse_args()
    phase = args.seconds or (3.0 if args.quick else 10.0)
    torch.set_num_threads(1)
    cfg = experiment()
    part = hosting.build_partition(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="bench-fuzz-")
    rd = hosting.prepare_run(cfg, Path(tmp.name) / "run", part)
    directory = make_directory("tcp", range(cfg.peers))
    flooder = fuzz.Flooder(directory[VICTIM], seconds=phase, seed=1)
    spawn = mp.get_context("spawn")
    out, go, ready = spawn.Queue(), spawn.Queue(), spawn.Event()
    steps: list[float] = []
    figures: dict = {}

    def on_event(e: Event) -> None:
        if e.peer == VICTIM:
            steps.append(time.time())

    async def run() -> None:
        hosted = hosting.build_peers(cfg, part, list(range(cfg.peers)), directory, rd, time.time())
        peers = hosted.peers
        victim = peers[VICTIM]
        stop = asyncio.Event()
        tasks = []
        loop = asyncio.get_running_loop()
        try:
            for p in peers.values():
                await p.transport.start()
            for p in peers.values():
                await p.warmup()
            tasks = [asyncio.create_task(p.run(on_event, stop)) for p in peers.values()]
            schema = wire.schema_of(victim.model.state_dict())
            puller = spawn.Process(target=honest_puller, args=(dict(directory), schema, 3 * phase, ready, go, out))
            puller.start()
            # The phases start once the puller's interpreter is up (its start-up time depends on
            # the machine and its load): a phase without honest pulls would measure nothing.
            if not await loop.run_in_executor(None, ready.wait, 600):
                raise RuntimeError("the honest puller did not start within 600 s")
            start = time.time() + 0.5
            go.put(start)
            await asyncio.sleep(max(0.0, start - time.time()))
            c = victim.transport.counters
            marks = {"before": (time.time(), c.msgs_in, sum(c.refusals.values()))}
            await asyncio.sleep(phase)
            marks["flood"] = (time.time(), c.msgs_in, sum(c.refusals.values()))
            flooder.go()
            figures["flood"] = await loop.run_in_executor(None, flooder.result)
            marks["after"] = (time.time(), c.msgs_in, sum(c.refusals.values()))
            # Off the event loop: the flooder closes with a 10 s LINGER, and what it still has
            # queued goes out only while the victim reads. Joining it on this loop would stall
            # the victim (every peer of this process) until the linger ran out: no pull and no
            # round in the "after" phase.
            releasing = loop.run_in_executor(None, flooder.release)
            await asyncio.sleep(max(0.0, start + 3 * phase - time.time()))
            marks["end"] = (time.time(), c.msgs_in, sum(c.refusals.values()))
            await releasing
            figures["marks"] = marks
            figures["honest"] = await loop.run_in_executor(None, lambda: out.get(timeout=60))
            puller.join(10)
            figures["refusals"] = dict(c.refusals)
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await hosted.close()

    try:
        asyncio.run(run())
    finally:
        flooder.release()
        tmp.cleanup()

    marks = figures["marks"]
    names = ["before", "flood", "after"]
    bounds = [marks["before"], marks["flood"], marks["after"], marks["end"]]
    rows, per_phase = [], {}
    for k, name in enumerate(names):
        (t0, m0, r0), (t1, m1, r1) = bounds[k], bounds[k + 1]
        pulls = [x for x in figures["honest"] if t0 <= x[0] < t1]
        lat = [x[1] * 1e3 for x in pulls if x[2]]
        failed = sum(1 for x in pulls if not x[2])
        n_steps = sum(1 for s in steps if t0 <= s < t1)
        d = {
            "seconds": t1 - t0, "pulls_ok": len(lat), "pulls_failed": failed,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat, default=float("nan")),
            "msgs_per_s": (m1 - m0) / (t1 - t0), "refused_per_s": (r1 - r0) / (t1 - t0),
            "rounds_per_s": n_steps / (t1 - t0),
        }
        per_phase[name] = d
        rows.append([name, d["seconds"], d["pulls_ok"], d["pulls_failed"], d["p50_ms"], d["p99_ms"], d["max_ms"],
                     d["msgs_per_s"], d["refused_per_s"], d["rounds_per_s"]])
    flood = figures["flood"]
    print(f"fuzz: live peer (digits MLP, 4 peers training in one process, tcp); honest pulls every "
          f"{PULL_EVERY_S * 1e3:.0f} ms from another process; flood from a third")
    print(table(["phase", "s", "honest ok", "failed", "p50 ms", "p99 ms", "max ms", "victim msgs/s",
                 "refused/s", "victim rounds/s"], rows))
    print(f"flooder sent {flood['sent']:,} messages in {flood['seconds']:.1f} s ({flood['rate']:,.0f}/s; "
          f"waited for room {flood['blocked']:,} times); by category {flood['categories']}")
    print(f"victim refusals by reason: {figures['refusals']}")
    p99_ratio = per_phase["flood"]["p99_ms"] / per_phase["before"]["p99_ms"]
    print(f"fuzz throughput {per_phase['flood']['msgs_per_s']:,.0f} msgs/s handled; honest p99 "
          f"{per_phase['before']['p99_ms']:.1f} ms -> {per_phase['flood']['p99_ms']:.1f} ms during the flood "
          f"(x{p99_ratio:.1f})")
    json_line("fuzz", {
        "env": environment(), "quick": args.quick, "phase_s": phase,
        "fuzz_msgs_per_s": per_phase["flood"]["msgs_per_s"], "flooder_sent": flood["sent"],
        "flooder_rate": flood["rate"], "p99_ms_no_flood": per_phase["before"]["p99_ms"],
        "p99_ms_flood": per_phase["flood"]["p99_ms"], "p99_ms_after": per_phase["after"]["p99_ms"],
        "p99_ratio_flood_vs_no_flood": p99_ratio, "phases": per_phase, "refusals": figures["refusals"],
    })


if __name__ == "__main__":
    main()
