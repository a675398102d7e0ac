"""`zmqgossip stress` against the raw pyzmq limit, the link emulator's own cost, and scale.

(a) stress vs raw: the same topology (peers, processes, transport, fan-out, payload, neighbours)
    measured twice in the same run, interleaved: once by the stress engine (Transport pulls,
    ModelPayload replies, decoding and validation of every reply, asyncio) and once by a raw
    pyzmq engine (one blocking ``zmq.Poller`` loop per process over plain ROUTER inboxes and
    DEALER sockets, request/reply of the same frames as pre-built ZeroMQ messages
    (``prepared_frames``, as the Transport sends them), no decoding).
    Ratio = stress pulls/s / raw pulls/s: a stricter comparison than the target's (the
    raw engine has the same concurrency as stress and never reads what it receives).
    The target, >= 0.8 for 0.25 MB payloads, is against the foundation benchmark's
    raw limit (bench_transport: raw pyzmq request/reply, ipc between two processes, measured
    here in the same run): stress over the same link with the same bytes and zero-delay
    links, as a user runs it (the emulator steps aside) and with the emulator consulted on
    every message (``emulator="on"``).
(b) the emulator's own cost: the same stress run with an ideal ``Links`` (every message
    asks the emulator, which says "now, once") vs ``links=None``; plus ``Links.plan`` alone.
(c) 10,000 stress peers with small payloads (worker processes over ipc): pulls/s, latency,
    file descriptors, RSS per process.
(d) 1,000 DAC learning peers in one process (digits MLP, tiny data, 3 rounds): peer-rounds/s
    and the fraction of wall time the compute thread is busy.

Prints tables and ONE JSON line. Timing is never asserted. ``--quick``: a small variant.

Usage: python benchmarks/bench_stress.py [--quick] [--seconds S] [--skip a,b,c,d]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import zmq

from _common import between, environment, json_line, table

from zmqgossip import wire
from zmqgossip.links import Latency, LinkProfile, Links, NetworkEmulation
from zmqgossip.stress import StressConfig, fd_count, make_payloads, peak_rss_mb, run_stress
from zmqgossip.net import make_directory, preflight, prepared_frames, routing_id

# ---------------------------------------------------------------------- (a) the raw engine


def raw_share(cfg: StressConfig, ids: list[int], directory: dict[int, str], barrier=None) -> dict:
    """The stress topology in plain blocking pyzmq: what the hardware and libzmq allow."""
    ctx = zmq.Context()
    preflight(ctx, len(ids), cfg.pool_size, cfg.transport)
    payloads = make_payloads(cfg, ids)
    # pre-built messages, as the Transport sends them (the fastest way pyzmq has)
    replies = {pid: [wire.reply_head(pid, 1), *prepared_frames(payloads[pid].frames)] for pid in ids}
    poller = zmq.Poller()
    routers: dict[zmq.Socket, int] = {}
    for pid in ids:
        s = ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(directory[pid])
        routers[s] = pid
        poller.register(s, zmq.POLLIN)
    requests = {pid: wire.encode_request(pid, 1) for pid in ids}
    rngs = {pid: random.Random(cfg.seed * 1_000_003 + pid) for pid in ids}
    others = {pid: ([q + (q >= pid) for q in rngs[pid].sample(range(cfg.peers - 1), cfg.neighbours)]
                    if cfg.neighbours else None) for pid in ids}
    left = {pid: cfg.pulls for pid in ids}
    pools: dict[int, OrderedDict[int, zmq.Socket]] = {pid: OrderedDict() for pid in ids}
    owner: dict[zmq.Socket, tuple[int, int]] = {}
    sent_at: dict[zmq.Socket, float] = {}
    waiting = {pid: 0 for pid in ids}
    lat: list[float] = []
    ok = 0
    nbytes = 0
    try:
        if barrier is not None:
            barrier.wait(600)
        start = time.perf_counter()
        cpu0 = time.process_time()
        deadline = None if cfg.duration_s is None else start + cfg.duration_s

        def dealer(pid: int, target: int) -> zmq.Socket:
            pool = pools[pid]
            d = pool.get(target)
            if d is not None:
                pool.move_to_end(target)
                return d
            while len(pool) >= cfg.pool_size:
                victim = next((t for t, s in pool.items() if s not in sent_at), None)
                if victim is None:
                    break
                s = pool.pop(victim)
                poller.unregister(s)
                owner.pop(s)
                s.close(0)
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.setsockopt(zmq.ROUTING_ID, routing_id(pid))
            d.connect(directory[target])
            pool[target] = d
            owner[d] = (pid, target)
            poller.register(d, zmq.POLLIN)
            return d

        def round_of(pid: int) -> None:
            if (left[pid] is not None and left[pid] <= 0) or (deadline is not None and time.perf_counter() >= deadline):
                return
            k = cfg.fanout if left[pid] is None else min(cfg.fanout, left[pid])
            rng = rngs[pid]
            if others[pid] is None:
                targets = [q + (q >= pid) for q in rng.sample(range(cfg.peers - 1), k)]
            else:
                targets = rng.sample(others[pid], k)
            now = time.perf_counter()
            for t in targets:
                d = dealer(pid, t)
                d.send_multipart(requests[pid])
                sent_at[d] = now
            waiting[pid] = k
            if left[pid] is not None:
                left[pid] -= k

        for pid in ids:
            round_of(pid)
        while any(waiting.values()):
            for s, _ in poller.poll(100):
                if s in routers:
                    frames = replies[routers[s]]
                    while True:
                        try:
                            rid, _req = s.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        s.send_multipart([rid, *frames], copy=False)
                else:
                    reply = s.recv_multipart(copy=False)
                    pid, _ = owner[s]
                    lat.append(time.perf_counter() - sent_at.pop(s))
                    ok += 1
                    nbytes += sum(len(f) for f in reply)
                    waiting[pid] -= 1
                    if waiting[pid] == 0:
                        round_of(pid)
        end = time.perf_counter()
        cpu = time.process_time() - cpu0
        if barrier is not None:  # serve until every process is done pulling
            done = threading.Event()
            th = threading.Thread(target=lambda: (barrier.wait(600), done.set()), daemon=True)
            th.start()
            while not done.is_set():
                for s, _ in poller.poll(20):
                    if s in routers:
                        while True:
                            try:
                                rid, _req = s.recv_multipart(zmq.NOBLOCK, copy=False)
                            except zmq.Again:
                                break
                            s.send_multipart([rid, *replies[routers[s]]], copy=False)
                    else:
                        s.recv_multipart(copy=False)
            th.join()
        return {"ok": ok, "bytes": nbytes, "wall_s": end - start, "cpu_s": cpu, "latencies": lat}
    finally:
        ctx.destroy(0)


def _raw_worker(cfg_data: dict, ids: list[int], directory: dict[int, str], barrier, queue) -> None:
    torch.set_num_threads(1)
    try:
        queue.put(raw_share(StressConfig.model_validate(cfg_data), ids, directory, barrier))
    except BaseException as e:  # noqa: BLE001
        barrier.abort()
        queue.put({"error": repr(e)})


def run_raw(cfg: StressConfig) -> dict:
    """The raw engine over ``cfg``'s topology; same figures as the stress engine's."""
    shares = cfg.shares()
    directory = make_directory(cfg.transport, range(cfg.peers))
    try:
        if cfg.mode == "asyncio":
            parts = [raw_share(cfg, shares[0], directory)]
        else:
            ctx = mp.get_context("spawn")
            barrier, queue = ctx.Barrier(len(shares)), ctx.Queue()
            procs = [ctx.Process(target=_raw_worker, args=(cfg.model_dump(), s, dict(directory), barrier, queue), daemon=True)
                     for s in shares]
            for p in procs:
                p.start()
            parts = [queue.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(30)
            errors = [p["error"] for p in parts if "error" in p]
            if errors:
                raise RuntimeError(f"raw worker failed: {errors}")
    finally:
        for ep in directory.values():
            if ep.startswith("ipc://"):
                shutil.rmtree(os.path.dirname(ep[len("ipc://"):]), ignore_errors=True)
                break
    wall = max(p["wall_s"] for p in parts)
    ok = sum(p["ok"] for p in parts)
    lat = np.asarray([x for p in parts for x in p["latencies"]]) * 1e3
    return {"ok": ok, "failed": 0, "pulls_per_s": ok / wall, "gb_per_s": sum(p["bytes"] for p in parts) / wall / 1e9,
            "latency_ms": {q: float(np.percentile(lat, int(q[1:]))) if lat.size else None for q in ("p50", "p90", "p99")},
            "cpu_us_per_pull": sum(p["cpu_s"] for p in parts) / ok * 1e6 if ok else None, "wall_s": wall}


TOPOLOGIES = [  # name, StressConfig fields (payload and duration added per run)
    ("inproc 1 proc, 4 peers", dict(peers=4, fanout=2, mode="asyncio", network={"transport": "inproc"})),
    ("ipc 2 procs, 4 peers", dict(peers=4, fanout=2, mode="processes", processes=2, network={"transport": "ipc"})),
    ("tcp 2 procs, 4 peers", dict(peers=4, fanout=2, mode="processes", processes=2, network={"transport": "tcp"})),
    ("ipc 2 procs, 32 peers", dict(peers=32, fanout=2, neighbours=4, mode="processes", processes=2, network={"transport": "ipc"})),
]


def bench_vs_raw(seconds: float, rounds: int, payloads_kb: list[float], quick: bool) -> list[dict]:
    rows = []
    topologies = TOPOLOGIES[:2] if quick else TOPOLOGIES
    for name, fields in topologies:
        for kb in payloads_kb:
            cfg = StressConfig(payload_kb=kb, duration_s=seconds, **{**fields, "network": {**fields.get("network", {}), "timeout_s": 30}})
            raw, st = [], []
            for _ in range(rounds):
                raw.append(run_raw(cfg))
                st.append(run_stress(cfg))
            r_raw = statistics.median(x["pulls_per_s"] for x in raw)
            r_st = statistics.median(x["pulls_per_s"] for x in st)
            best = max(st, key=lambda x: x["pulls_per_s"])
            rows.append({
                "topology": name, "payload_kb": kb, "raw_pulls_per_s": r_raw, "stress_pulls_per_s": r_st,
                "ratio": r_st / r_raw, "ratios": [s["pulls_per_s"] / r["pulls_per_s"] for s, r in zip(st, raw)],
                "raw_gb_per_s": statistics.median(x["gb_per_s"] for x in raw),
                "stress_gb_per_s": statistics.median(x["gb_per_s"] for x in st),
                "raw_p50_ms": statistics.median(x["latency_ms"]["p50"] for x in raw),
                "stress_p50_ms": statistics.median(x["latency_ms"]["p50"] for x in st),
                "raw_cpu_us": statistics.median(x["cpu_us_per_pull"] for x in raw),
                "stress_cpu_us": statistics.median(x["cpu_us_per_pull"] for x in st),
                "stress_failed": sum(x["failed"] for x in st), "stress_fds_per_peer": best["fds_per_peer"],
            })
            r = rows[-1]
            print(f"  (a) {name}, {kb:g} KiB: raw {r_raw:,.0f}/s, stress {r_st:,.0f}/s, ratio {r['ratio']:.2f}", flush=True)
    return rows


def bench_foundation(seconds: float, rounds: int) -> dict:
    """The foundation benchmark's figure (bench_transport: one client, one server process,
    ipc, the 0.25 MB LeNet, one request at a time, raw and Transport) next to stress over
    ipc between 2 processes with the same bytes (62,006 float32 in 10 tensors).

    The raw limit is measured again after every stress round against the same server, and
    each stress run is compared with the mean of the raw figures on either side of it: this
    host's speed can halve between one minute and the next."""
    import bench_transport as bt

    from zmqgossip.net import ipc_dir

    base = ipc_dir("zgbs")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=bt.child_main, args=(child, ["ipc"], ["0.25MB"], base), daemon=True)
    proc.start()
    child.close()
    zctx = zmq.Context()
    try:
        if not parent.poll(120):
            raise RuntimeError("bench_transport server did not start")
        remote = parent.recv()
        found = bt.run_config("ipc", "0.25MB", "2proc", seconds, base, remote)
        client = bt.raw_client(zctx, remote["raw"][("ipc", "0.25MB")])
        req = wire.encode_request(bt.CLIENT, 1)

        def raw_rate() -> float:
            ts = bt.time_raw(client, req, None, None, seconds / 2)
            return len(ts) / sum(ts)

        # Zero-delay links as a user gets them (the emulator steps aside for ideal links),
        # and with the emulator asked about every message all the same.
        raws = [raw_rate()]
        st: list[float] = []
        st_on: list[float] = []
        for _ in range(rounds):
            for emulator, acc in (("auto", st), ("on", st_on)):
                cfg = StressConfig(peers=4, fanout=2, mode="processes", processes=2,
                                   network={"transport": "ipc", "timeout_s": 30},
                                   payload_kb=62006 * 4 / 1024, tensors=10, duration_s=seconds, emulator=emulator)
                acc.append(run_stress(cfg)["pulls_per_s"])
            raws.append(raw_rate())
        client.close(0)
        parent.send("stop")
        parent.poll(10)
    finally:
        zctx.destroy(0)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)
    around = between(raws)
    ratios = [x / r for x, r in zip(st, around)]
    ratios_on = [x / r for x, r in zip(st_on, around)]
    out = {"foundation_raw_per_s": statistics.median(raws), "foundation_raw_rounds": raws,
           "foundation_pull_per_s": found["pull"]["per_s"], "foundation_ratio": found["ratio"],
           "stress_per_s": statistics.median(st), "stress_vs_foundation_raw": statistics.median(ratios),
           "stress_links_on_per_s": statistics.median(st_on),
           "stress_links_on_vs_foundation_raw": statistics.median(ratios_on),
           "ratio_rounds": ratios, "ratio_rounds_links_on": ratios_on}
    print(f"  (a) foundation (ipc, 2 procs, 0.25 MB, sequential): raw {out['foundation_raw_per_s']:,.0f}/s "
          f"({', '.join(f'{r:,.0f}' for r in raws)}), Transport {out['foundation_pull_per_s']:,.0f}/s; "
          f"stress 4 peers: {out['stress_per_s']:,.0f}/s = {out['stress_vs_foundation_raw']:.2f} x raw, "
          f"with the emulator on {out['stress_links_on_vs_foundation_raw']:.2f} x raw", flush=True)
    return out


# ---------------------------------------------------------------------- (b) emulator cost


def bench_emulator(seconds: float, rounds: int) -> tuple[list[dict], dict]:
    rows = []
    for peers, kb in ((8, 1.0), (8, 256.0)):
        on, off = [], []
        for _ in range(rounds):
            for em, acc in (("off", off), ("on", on)):
                acc.append(run_stress(StressConfig(peers=peers, payload_kb=kb, duration_s=seconds, fanout=2, emulator=em)))
        p_off = statistics.median(x["pulls_per_s"] for x in off)
        p_on = statistics.median(x["pulls_per_s"] for x in on)
        c_off = statistics.median(x["cpu_us_per_pull"] for x in off)
        c_on = statistics.median(x["cpu_us_per_pull"] for x in on)
        rows.append({"peers": peers, "payload_kb": kb, "off_pulls_per_s": p_off, "on_pulls_per_s": p_on,
                     "ratio": p_on / p_off, "off_cpu_us": c_off, "on_cpu_us": c_on, "cpu_extra_us": c_on - c_off,
                     "messages": statistics.median(x["links"]["messages"] for x in on)})
        print(f"  (b) {peers} peers x {kb:g} KiB: links=None {p_off:,.0f}/s, ideal Links {p_on:,.0f}/s "
              f"(ratio {p_on / p_off:.3f}; CPU per pull {c_off:.0f} -> {c_on:.0f} us)", flush=True)
    # The emulator alone: one decision per message.
    n = 200_000
    plan_us = {}
    for name, prof in (("ideal", LinkProfile()),
                       ("lognormal+loss+bandwidth", LinkProfile(latency=Latency(dist="lognormal", mean_ms=20, std_ms=10),
                                                                loss=0.1, bandwidth_mbps=100))):
        links = Links(NetworkEmulation(default=prof), 100, seed=0)
        t0 = time.perf_counter()
        for i in range(n):
            links.plan(i % 100, (i * 7 + 1) % 100, 1000)
        plan_us[name] = (time.perf_counter() - t0) / n * 1e6

    return rows, plan_us


# ---------------------------------------------------------------------- (c) 10,000 stress peers


def bench_many(quick: bool, seconds: float) -> list[dict]:
    peers, procs = (2000, 2) if quick else (10_000, 6)
    runs = [
        (f"{peers:,} peers, fixed 2 neighbours, {seconds * 3:g} s after 1 warm-up round",
         StressConfig(peers=peers, payload_kb=1, duration_s=seconds * 3, fanout=2, neighbours=2, warmup_rounds=1,
                      mode="processes", processes=procs, network={"transport": "ipc", "pool_size": 2, "timeout_s": 60})),
        (f"{peers:,} peers, uniform targets, 2 pulls each",
         StressConfig(peers=peers, payload_kb=1, pulls=2, fanout=2, mode="processes", processes=procs,
                      network={"transport": "ipc", "pool_size": 2, "timeout_s": 120})),
    ]
    rows = []
    for name, cfg in runs:
        t0 = time.perf_counter()
        r = run_stress(cfg)
        rows.append({"run": name, "peers": cfg.peers, "processes": procs, "total_s": time.perf_counter() - t0, **{
            k: r[k] for k in ("ok", "failed", "timeouts", "pulls_per_s", "latency_ms", "sockets_peak", "sockets_per_peer",
                              "fds_used", "fds_per_peer", "rss_mb", "rss_mb_max", "wall_s", "setup_s", "cpu_us_per_pull")}})
        print(f"  (c) {name}: {r['pulls_per_s']:,.0f} pulls/s, {r['failed']} failed, fds {r['fds_used']:,} "
              f"({r['fds_per_peer']:.1f}/peer), RSS max {r['rss_mb_max']:.0f} MB", flush=True)
    return rows


# ---------------------------------------------------------------------- (d) 1,000 DAC peers


def bench_dac(quick: bool) -> dict:
    from zmqgossip import config, hosting
    from zmqgossip.metrics import RunDir

    peers, rounds = (200, 3) if quick else (1000, 3)
    # LabelShift never reuses a sample; 1,000 digits peers need shared images: rotation
    # clusters with allow_overlap draw independently (250 peers x 6 images <= 1,597).
    cfg = config.validate({
        "name": f"bench-{peers}", "method": "dac", "peers": peers, "rounds": rounds, "schedule": "async", "seed": 0,
        "data": {"dataset": "digits", "shift": "rotation", "angles": [0, 90, 180, 270], "fractions": [0.25] * 4,
                 "allow_overlap": True, "n_train": 4, "n_val": 2, "test_per_class": 20},
        "train": {"model": "mlp", "epochs": 1, "batch_size": 8, "lr": 3e-3, "test_every": 0},
        "policy": {"n": 3}, "network": {"timeout_s": 60.0},
    })
    out = Path(tempfile.mkdtemp(prefix="zgbench-dac"))
    fds0 = fd_count()
    peak = {"fds": 0, "n": 0}

    def on_event(_: dict) -> None:
        peak["n"] += 1
        if peak["n"] % 50 == 0:
            peak["fds"] = max(peak["fds"], fd_count())

    try:
        t0 = time.perf_counter()
        s = hosting.run_experiment(cfg, out, on_event=on_event)
        wall = time.perf_counter() - t0
        results = RunDir(out).results()
        compute = sum(r["compute_s"] for r in results.values())
        events = [e for i in range(peers) for e in RunDir(out).events(i)]
        rounds_wall = max(e.t for e in events) - min(e.t - e.dt for e in events)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    r = {"peers": peers, "rounds": rounds, "wall_s": wall, "rounds_wall_s": rounds_wall, "peer_rounds": s["peer_rounds"],
         "peer_rounds_per_s": s["peer_rounds"] / wall, "peer_rounds_per_s_in_rounds": s["peer_rounds"] / rounds_wall,
         "compute_s": compute, "compute_fraction": compute / wall, "compute_ms_per_peer_round": compute / s["peer_rounds"] * 1e3,
         "pulls_ok": s["pulls_ok"], "pulls_failed": s["pulls_failed"], "failed_peers": len(s["failed_peers"]),
         "fds_used": peak["fds"] - fds0, "rss_mb": peak_rss_mb()}
    print(f"  (d) {peers} DAC peers x {rounds} rounds: {r['peer_rounds_per_s']:.1f} peer-rounds/s, compute "
          f"{r['compute_fraction']:.0%} of wall", flush=True)
    return r


# ---------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small variant (about a minute)")
    ap.add_argument("--seconds", type=float, default=None, help="pull phase per measurement")
    ap.add_argument("--skip", default="", help="parts to skip, e.g. c,d")
    args = ap.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    rounds = 1 if args.quick else 2
    skip = set(args.skip.split(","))
    torch.set_num_threads(1)
    figures: dict = {"env": environment(), "quick": args.quick, "seconds": seconds}

    if "a" not in skip:
        vs_raw = bench_vs_raw(seconds, rounds, [256.0] if args.quick else [4.0, 256.0], args.quick)
        figures["vs_raw"] = vs_raw
        figures["foundation"] = bench_foundation(seconds, rounds)
    if "b" not in skip:
        emu, plan_us = bench_emulator(seconds, 2 if args.quick else 5)
        figures["emulator"] = emu
        figures["plan_us"] = plan_us
    if "c" not in skip:
        figures["many"] = bench_many(args.quick, seconds)
    if "d" not in skip:
        figures["dac"] = bench_dac(args.quick)

    if "vs_raw" in figures:
        print("\n(a) stress (Transport + ModelPayload + decode, asyncio) vs raw pyzmq, same topology; "
              f"{seconds:g} s per run, median of {rounds}, fan-out 2")
        print(table(["topology", "KiB", "raw /s", "stress /s", "ratio", "raw GB/s", "stress GB/s", "raw p50 ms",
                     "stress p50 ms", "raw CPU us", "stress CPU us", "failed"],
                    [[r["topology"], r["payload_kb"], r["raw_pulls_per_s"], r["stress_pulls_per_s"], r["ratio"],
                      r["raw_gb_per_s"], r["stress_gb_per_s"], r["raw_p50_ms"], r["stress_p50_ms"], r["raw_cpu_us"],
                      r["stress_cpu_us"], r["stress_failed"]] for r in figures["vs_raw"]]))
        for r in figures["vs_raw"]:
            if r["payload_kb"] == 256.0:
                print(f"  {r['topology']}, 0.25 MB: stress/raw (same topology) = {r['ratio']:.2f}")
        f = figures["foundation"]
        verdict = "meets" if min(f["stress_vs_foundation_raw"], f["stress_links_on_vs_foundation_raw"]) >= 0.8 else "MISSES"
        print(f"  the foundation benchmark's raw limit (ipc, 2 procs, 0.25 MB, one request at a time): "
              f"{f['foundation_raw_per_s']:,.0f}/s (its Transport pulls: {f['foundation_pull_per_s']:,.0f}/s, "
              f"ratio {f['foundation_ratio']:.2f});\n  stress over ipc, 2 procs, 4 peers, fan-out 2, same bytes, "
              f"zero-delay links: {f['stress_per_s']:,.0f}/s = {f['stress_vs_foundation_raw']:.2f} x that raw limit, "
              f"with the emulator asked about every message {f['stress_links_on_vs_foundation_raw']:.2f} x "
              f"(target >= 0.8: {verdict})")
    if "emulator" in figures:
        print("\n(b) the link emulator's own cost: ideal Links vs links=None, same stress run (asyncio, inproc)")
        print(table(["peers", "KiB", "None /s", "ideal /s", "ratio", "None CPU us", "ideal CPU us", "extra us"],
                    [[r["peers"], r["payload_kb"], r["off_pulls_per_s"], r["on_pulls_per_s"], r["ratio"], r["off_cpu_us"],
                      r["on_cpu_us"], r["cpu_extra_us"]] for r in figures["emulator"]]))
        print("  Links.plan per message: " + ", ".join(f"{k} {v:.2f} us" for k, v in figures["plan_us"].items()))
    if "many" in figures:
        print("\n(c) many stress peers, 1 KiB payloads, worker processes over ipc, pool_size 2")
        print(table(["run", "ok", "failed", "pulls/s", "p50 ms", "p99 ms", "sockets/peer", "fds", "fds/peer",
                     "RSS MB max", "CPU us/pull"],
                    [[r["run"], r["ok"], r["failed"], r["pulls_per_s"], r["latency_ms"]["p50"], r["latency_ms"]["p99"],
                      r["sockets_per_peer"], r["fds_used"], r["fds_per_peer"], r["rss_mb_max"], r["cpu_us_per_pull"]]
                     for r in figures["many"]]))
    if "dac" in figures:
        d = figures["dac"]
        print(f"\n(d) {d['peers']} DAC peers (digits MLP, 4+2 samples each, {d['rounds']} rounds, n = 3), one process")
        print(table(["peers", "peer-rounds", "wall s", "peer-rounds/s", "compute s", "compute share", "ms/peer-round",
                     "pulls ok", "failed", "fds", "RSS MB"],
                    [[d["peers"], d["peer_rounds"], d["wall_s"], d["peer_rounds_per_s"], d["compute_s"],
                      d["compute_fraction"], d["compute_ms_per_peer_round"], d["pulls_ok"], d["pulls_failed"],
                      d["fds_used"], d["rss_mb"]]]))
    json_line("stress", figures)


if __name__ == "__main__":
    main()
