"""Fuzz throughput of a live peer, and honest pull latency and training with and without a flood.

Four peers of a tiny digits experiment (random gossip, async) train and serve in this
process over loopback tcp; peer 0 is the victim.  In the same run, three phases of equal
length:

  before  an honest peer in another process pulls the victim every 20 ms
  flood   the same, while ``--flooders`` other processes flood the victim's inbox from raw
          DEALER sockets (``zmqgossip.fuzz.flood``: random bytes, random frame counts,
          mutated requests, huge declared sizes, wrong schema versions, and valid requests
          from sockets that never read a reply)
  after   the flood has stopped; the honest pulls go on

Two variants, one after the other: ``plain`` (no security) and ``curve`` (every peer and
the honest puller are CURVE peers of one roster; the flooders are CURVE clients with keys
of their own, which the gatekeeper refuses at the handshake: nothing they send should
reach Python).  With ``--neighbour`` the flood goes to peer 1 instead while the honest
peer still pulls peer 0: what the flood costs a peer that is not flooded itself, but
shares its process and the machine's cores (the floor the victim's own figures can reach
on this machine).  With ``--floor`` each variant runs both ways in the same run, the
victim first, and the neighbour's ratios are printed beside the victim's as its floor.
With ``--apart`` the flooders run on the first CPU only and everything else (the victim's
process, the honest puller) on the others, as if the attackers were other machines: what
is left is the flood's cost to the victim's own process (with fewer than 2 CPUs
everything shares the one there is, and the JSON line says ``"apart": false``).

Reported per variant and phase: the honest pulls (ok / failed) and their latency p50 /
p99 / max, the messages per second the victim read, refused and shed, and the victim's
training rounds per second; per variant: what the flooders sent, the victim's RSS growth
over the flood, peers that crashed, and the two ratios the flood is judged by (honest
p99 during / before, victim rounds/s during / before).  Timing is never asserted.

Usage: python benchmarks/bench_fuzz.py [--quick] [--seconds S] [--flooders N]
                                       [--variants plain,curve] [--neighbour | --floor] [--apart]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, json_line, pct, table

from zmqgossip import config, fuzz, hosting, wire
from zmqgossip.metrics import Event
from zmqgossip.net import Transport, make_directory
from zmqgossip.security import CurveKeys, generate_keys, load_keyring

VICTIM = 0
NEIGHBOUR = 1
HONEST_ID = 90
PULL_EVERY_S = 0.02
VARIANTS = ("plain", "curve")


def experiment() -> config.ExperimentConfig:
    return config.validate({
        "name": "bench-fuzz", "method": "random", "schedule": "async", "peers": 4, "rounds": 10**6, "seed": 0,
        "data": {"dataset": "digits", "n_train": 30, "n_val": 10, "test_per_class": 10},
        "train": {"model": "mlp", "epochs": 1, "test_every": 0, "checkpoint_every": 0},
        "policy": {"n": 2},
        "network": {"transport": "tcp", "timeout_s": 5.0},
    })


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def honest_puller(directory: dict, schema: dict, keys: CurveKeys | None, seconds: float, ready, go, out) -> None:
    """Another process: once started (its imports done), say ``ready``; then pull the victim
    every 20 ms from the start time (wall clock) it is sent on ``go``, for ``seconds``."""
    import zmq.asyncio

    ready.set()
    start = go.get(timeout=600)

    async def main() -> list:
        ctx = zmq.asyncio.Context()
        t = Transport(ctx, HONEST_ID, directory, expect=schema, bind="tcp://127.0.0.1:0", security=keys)
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


def run_variant(variant: str, flooders: int, phase: float, target: int,
                flood_cpus: list[int] | None = None) -> dict[str, Any]:
    """One run of the three phases; the figures of :func:`summarise` come from it."""
    cfg = experiment()
    part = hosting.build_partition(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="bench-fuzz-")
    rd = hosting.prepare_run(cfg, Path(tmp.name) / "run", part)
    directory = make_directory("tcp", range(cfg.peers))
    keyring, honest_keys, server_key = None, None, None
    if variant == "curve":
        folder = Path(tmp.name) / "keys"
        roster = [*range(cfg.peers), HONEST_ID]
        generate_keys(folder, roster)
        keyring = load_keyring(folder, roster, [*range(cfg.peers), HONEST_ID])
        honest_keys = keyring.for_peer(HONEST_ID)
        server_key = keyring.public[target]
    floods = [fuzz.Flooder(directory[target], seconds=phase, seed=1 + k, server_key=server_key, cpus=flood_cpus)
              for k in range(flooders)]
    spawn = mp.get_context("spawn")
    out, go, ready = spawn.Queue(), spawn.Queue(), spawn.Event()
    steps: list[float] = []
    figures: dict[str, Any] = {}

    def on_event(e: Event) -> None:
        if e.peer == VICTIM:
            steps.append(time.time())

    async def run() -> None:
        hosted = hosting.build_peers(cfg, part, list(range(cfg.peers)), directory, rd, time.time(), keyring=keyring)
        peers = hosted.peers
        victim = peers[VICTIM]
        stop = asyncio.Event()
        tasks: list[asyncio.Task] = []
        loop = asyncio.get_running_loop()
        try:
            for p in peers.values():
                await p.transport.start()
            for p in peers.values():
                await p.warmup()
            tasks = [asyncio.create_task(p.run(on_event, stop)) for p in peers.values()]
            schema = wire.schema_of(victim.model.state_dict())
            puller = spawn.Process(target=honest_puller,
                                   args=(dict(directory), schema, honest_keys, 3 * phase, ready, go, out))
            puller.start()
            # The phases start once the puller's interpreter is up (its start-up time depends on
            # the machine and its load): a phase without honest pulls would measure nothing.
            if not await loop.run_in_executor(None, ready.wait, 600):
                raise RuntimeError("the honest puller did not start within 600 s")
            start = time.time() + 0.5
            go.put(start)
            await asyncio.sleep(max(0.0, start - time.time()))
            c = peers[target].transport.counters
            mark = lambda: (time.time(), c.msgs_in, sum(c.refusals.values()), c.refusals.get("shed", 0))  # noqa: E731
            # Each phase is (start, end) marks. The collections before each RSS reading stall
            # this process's event loop for a while; they fall between phases, in no phase.
            marks = {"before": (mark(),)}
            await asyncio.sleep(phase)
            marks["before"] += (mark(),)
            gc.collect()
            figures["rss0"] = rss_mb()
            marks["flood"] = (mark(),)
            for f in floods:
                f.go()
            figures["floods"] = [await loop.run_in_executor(None, f.result) for f in floods]
            marks["flood"] += (mark(),)
            gc.collect()
            figures["rss1"] = rss_mb()
            marks["after"] = (mark(),)
            # Off the event loop: a flooder closes with a 10 s LINGER, and what it still has
            # queued goes out only while the victim reads. Joining it on this loop would stall
            # the victim (every peer of this process) until the linger ran out: no pull and no
            # round in the "after" phase.
            releasing = [loop.run_in_executor(None, f.release) for f in floods]
            await asyncio.sleep(max(0.0, start + 3 * phase - time.time()))
            marks["after"] += (mark(),)
            await asyncio.gather(*releasing)
            figures["marks"] = marks
            figures["honest"] = await loop.run_in_executor(None, lambda: out.get(timeout=60))
            puller.join(10)
            figures["refusals"] = dict(c.refusals)
            stop.set()
            ended = await asyncio.gather(*tasks, return_exceptions=True)
            figures["crashes"] = sum(1 for e in ended if isinstance(e, BaseException))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await hosted.close()

    try:
        asyncio.run(run())
    finally:
        for f in floods:
            f.release()
        tmp.cleanup()
    figures["steps"] = steps
    return figures


# What a --floor run keeps of the neighbour's figures.
FLOOR_KEYS = ("p99_ms_no_flood", "p99_ms_flood", "p99_ratio_flood_vs_no_flood", "rounds_ratio_flood_vs_no_flood",
              "fuzz_msgs_per_s", "crashes", "rss_growth_mb")


def summarise(variant: str, figures: dict[str, Any]) -> dict[str, Any]:
    marks = figures["marks"]
    per_phase = {}
    for name in ("before", "flood", "after"):
        (t0, m0, r0, s0), (t1, m1, r1, s1) = marks[name]
        # A pull belongs to the phase it started and ended in: one that waited out the gap
        # between two phases (a collection before reading the RSS) would time that gap.
        pulls = [x for x in figures["honest"] if t0 <= x[0] and x[0] + x[1] < t1]
        lat = [x[1] * 1e3 for x in pulls if x[2]]
        per_phase[name] = {
            "seconds": t1 - t0, "pulls_ok": len(lat), "pulls_failed": sum(1 for x in pulls if not x[2]),
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat, default=float("nan")),
            "msgs_per_s": (m1 - m0) / (t1 - t0), "refused_per_s": (r1 - r0 - (s1 - s0)) / (t1 - t0),
            "shed_per_s": (s1 - s0) / (t1 - t0),
            "rounds_per_s": sum(1 for s in figures["steps"] if t0 <= s < t1) / (t1 - t0),
        }
    floods = figures["floods"]
    for f in floods:
        if "error" in f:
            raise RuntimeError(f"a flooder failed: {f['error']}")
    sent = sum(f["sent"] for f in floods)
    seconds = max(f["seconds"] for f in floods)
    before, flood = per_phase["before"], per_phase["flood"]
    return {
        "variant": variant, "phases": per_phase, "flooders": len(floods), "flooder_sent": sent,
        "flooder_rate": sent / seconds if seconds else 0.0,
        "flooder_blocked": sum(f["blocked"] for f in floods),
        "connections": sum(f["connections"] for f in floods),
        "categories": {k: sum(f["categories"].get(k, 0) for f in floods) for k in floods[0]["categories"]},
        "refusals": figures["refusals"], "crashes": figures["crashes"],
        "rss_growth_mb": figures["rss1"] - figures["rss0"],
        "fuzz_msgs_per_s": flood["msgs_per_s"],
        "p99_ms_no_flood": before["p99_ms"], "p99_ms_flood": flood["p99_ms"],
        "p99_ms_after": per_phase["after"]["p99_ms"],
        "p99_ratio_flood_vs_no_flood": flood["p99_ms"] / before["p99_ms"],
        "rounds_ratio_flood_vs_no_flood": flood["rounds_per_s"] / before["rounds_per_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s phases instead of 10 s")
    ap.add_argument("--seconds", type=float, default=None, help="length of each phase")
    ap.add_argument("--flooders", type=int, default=2, help="flooding processes")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="plain, curve or both")
    ap.add_argument("--neighbour", action="store_true",
                    help="flood peer 1 while the honest peer pulls peer 0 (the machine's floor)")
    ap.add_argument("--floor", action="store_true",
                    help="after each variant, the same flood against peer 1 (the --neighbour run): the victim's floor")
    ap.add_argument("--apart", action="store_true",
                    help="flooders on the first CPU, the victim and the honest puller on the others")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.floor and args.neighbour:
        ap.error("--floor already runs the --neighbour flood after each variant")
    flood_cpus = None
    if args.apart:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print(f"--apart needs 2 CPUs, this process may use {len(cpus)}: the flooders share it", flush=True)
            args.apart = False
        else:
            flood_cpus = cpus[:1]
            # This thread only, before any other exists: every later thread and child inherits it.
            os.sched_setaffinity(0, cpus[1:])
    phase = args.seconds or (3.0 if args.quick else 10.0)
    torch.set_num_threads(1)
    target = NEIGHBOUR if args.neighbour else VICTIM
    results = {}
    for v in variants:
        results[v] = summarise(v, run_variant(v, args.flooders, phase, target, flood_cpus))
        if args.floor:
            beside = summarise(v, run_variant(v, args.flooders, phase, NEIGHBOUR, flood_cpus))
            results[v]["floor"] = {k: beside[k] for k in FLOOR_KEYS}

    where = "peer 1, beside the victim in its process" if args.neighbour else "the victim"
    print(f"fuzz: live peer (digits MLP, 4 peers training in one process, tcp); honest pulls of the victim "
          f"every {PULL_EVERY_S * 1e3:.0f} ms from another process; {args.flooders} flooding processes "
          f"against {where}" + (f"; flooders on CPU {flood_cpus}, the rest on the others" if flood_cpus else ""))
    for v, r in results.items():
        rows = [[v, name, d["seconds"], d["pulls_ok"], d["pulls_failed"], d["p50_ms"], d["p99_ms"], d["max_ms"],
                 d["msgs_per_s"], d["refused_per_s"], d["shed_per_s"], d["rounds_per_s"]]
                for name, d in r["phases"].items()]
        print(table(["variant", "phase", "s", "honest ok", "failed", "p50 ms", "p99 ms", "max ms", "msgs/s",
                     "refused/s", "shed/s", "victim rounds/s"], rows))
        print(f"{v}: flooders sent {r['flooder_sent']:,} messages ({r['flooder_rate']:,.0f}/s; found no room "
              f"{r['flooder_blocked']:,} times) over {r['connections']:,} connections; "
              f"refusals {r['refusals']}")
    print(table(["variant", "flood msgs sent", "handled msgs/s", "honest p99 before ms", "during ms", "ratio",
                 "victim rounds ratio", "RSS growth MB", "crashes"],
                [[v, r["flooder_sent"], r["fuzz_msgs_per_s"], r["p99_ms_no_flood"], r["p99_ms_flood"],
                  r["p99_ratio_flood_vs_no_flood"], r["rounds_ratio_flood_vs_no_flood"], r["rss_growth_mb"],
                  r["crashes"]] for v, r in results.items()]))
    floors = [[v, r["floor"]["p99_ms_no_flood"], r["floor"]["p99_ms_flood"], r["floor"]["p99_ratio_flood_vs_no_flood"],
               r["p99_ratio_flood_vs_no_flood"], r["floor"]["rounds_ratio_flood_vs_no_flood"],
               r["rounds_ratio_flood_vs_no_flood"]] for v, r in results.items() if "floor" in r]
    if floors:
        print("floor: the same flood against peer 1 while the honest peer pulls peer 0, which nobody floods (same "
              "process, same cores): what sharing a process with a flooded inbox costs")
        print(table(["variant", "floor p99 before ms", "during ms", "floor ratio", "victim ratio",
                     "floor rounds ratio", "victim rounds ratio"], floors))
    first = results[variants[0]]
    json_line("fuzz", {
        "env": environment(), "quick": args.quick, "phase_s": phase, "flooders": args.flooders,
        "neighbour": args.neighbour, "apart": args.apart, "floor": args.floor,
        **{k: v for k, v in first.items() if k not in ("phases", "floor")},
        "phases": first["phases"], "variants": results,
    })


if __name__ == "__main__":
    main()
