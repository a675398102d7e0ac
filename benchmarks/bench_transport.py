"""End-to-end model pulls through ``Transport.pull`` vs the raw pyzmq limit.

For each topology (inproc / ipc / tcp in one process; ipc / tcp between two processes)
and model size (0.25 MB LeNet, 10 MB), measured in the same run and interleaved:

  pull  ``Transport.start_pulls`` as a peer pulls: request, reply from the cached
        ``ModelPayload``, decode with the receiver's schema (asyncio, as the peers run it);
        the values are left to the peer's compute thread, which reads them anyway
  pull+v  the same, then ``wire.check_values`` in the same thread (what the pull costs if
        the finiteness pass stays on the event loop)
  raw   a plain DEALER/ROUTER multipart request/reply of the same frames (blocking pyzmq;
        the server replies with pre-built ZeroMQ messages, ``prepared_frames`` as the
        Transport sends them; no decoding)

Between two processes, two more sides split the gap between pull and raw, against the
same Transport server as the pulls:

  floor   the least an asyncio client does: send the request on a bare DEALER, wait for
          its descriptor on the event loop, receive the frames; no decoding
  floor+  the same, then ``decode`` with the receiver's schema as a pull decodes (headers,
          tensor table, offsets; the values are the compute thread's)

  await+  the same as floor+ written the usual asyncio way: ``await recv_multipart()`` on a
          pyzmq asyncio socket (what a descriptor callback saves: see docs/NETWORK.md)

so raw -> floor is the price of waiting on an event loop instead of blocking in ZeroMQ,
floor -> floor+ the price of validating into tensors, and floor+ -> pull what the
Transport itself adds (request ids, timeouts, the socket pool, counters): printed as
pull / floor+, the median over rounds of the pull slice's rate over the floor+ slice's.

Reported: pulls/s, GB/s of model bytes, p50/p99 latency over all rounds, and the ratio
to raw of pulls per second: each side runs in 20 short slices, each slice between two
raw slices (raw | pull pull+v floor floor+ await+ | raw | ...) and compared with their mean rate, and
the figure is the median over the slices (this host's speed moves by tens of percent
within a second; fewer, longer slices read that as a result). Target for pull >= 0.8
for 0.25 MB and >= 0.85 for 10 MB on ipc between two processes. Timing is never asserted.

Usage: python benchmarks/bench_transport.py [--quick] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import multiprocessing
import shutil
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch
import zmq
import zmq.asyncio

from _common import MB, MODELS, between, environment, json_line, median, pct, state_bytes, table

from zmqgossip import wire
from zmqgossip.net import Transport, TransportConfig, ipc_dir, prepared_frames
from zmqgossip.wire import ModelPayload

SERVER, CLIENT, FLOOR = 1, 0, 2
ROUNDS = 20  # slices per side and configuration; raw slices bracket each round of the others
RAW_TIMEOUT_MS = 30_000


def endpoint_for(kind: str, base: str, tag: str) -> str:
    if kind == "inproc":
        return f"inproc://bench-{tag}"
    if kind == "ipc":
        return f"ipc://{base}/{tag}"
    return "tcp://127.0.0.1:0"


def build_payload(size: str) -> ModelPayload:
    return ModelPayload.build(MODELS[size](0), step=1, version=1, n_samples=400)


# ------------------------------------------------------------------ raw pyzmq


def raw_frames(payload: ModelPayload) -> list:
    """The reply's frames as ZeroMQ messages built once, as the Transport sends them (the
    fastest way pyzmq has to send the same bytes again and again)."""
    return [wire.reply_head(SERVER, 1), *prepared_frames(payload.frames)]


def raw_server_socket(ctx: zmq.Context, kind: str, base: str, tag: str) -> tuple[zmq.Socket, str]:
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(endpoint_for(kind, base, tag))
    return s, s.getsockopt_string(zmq.LAST_ENDPOINT)


def raw_serve_forever(socks: dict[zmq.Socket, list], stop: threading.Event) -> None:
    """Answer every request on any of ``socks`` with that socket's pre-built frames."""
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    while not stop.is_set():
        for s, _ in poller.poll(100):
            try:
                msg = s.recv_multipart(copy=False, flags=zmq.DONTWAIT)
                s.send_multipart([msg[0], *socks[s]], copy=False)
            except zmq.Again:
                continue
            except Exception as e:  # keep serving; a silent dead thread would hang the client
                print(f"raw server: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def raw_client(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    c = ctx.socket(zmq.DEALER)
    c.setsockopt(zmq.LINGER, 0)
    c.setsockopt(zmq.RCVTIMEO, RAW_TIMEOUT_MS)  # a lost reply fails the run instead of hanging it
    c.connect(endpoint)
    return c


def raw_once(client: zmq.Socket, req: list, server: zmq.Socket | None, frames: list | None) -> int:
    """One request/reply; with ``server`` given, serve it inline (same thread)."""
    client.send_multipart(req)
    if server is not None:
        rid, _ = server.recv_multipart(copy=False)
        server.send_multipart([rid, *frames], copy=False)
    reply = client.recv_multipart(copy=False)
    return sum(len(f) for f in reply)


def time_raw(client, req, server, frames, seconds: float, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        raw_once(client, req, server, frames)
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < 5:
        t0 = time.perf_counter()
        raw_once(client, req, server, frames)
        lat.append(time.perf_counter() - t0)
    return lat


# ------------------------------------------------------------------ the asyncio floor


class Floor:
    """A bare asyncio request/reply client: a DEALER whose descriptor the event loop
    watches, one request in flight. What any event-loop client pays, with no Transport."""

    def __init__(self, ctx: zmq.Context, endpoint: str, schema: wire.Schema | None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, b"floor-%d" % id(self))  # unique: the server hands an id over
        self.sock.connect(endpoint)
        self.schema = schema
        self.req = wire.encode_request(FLOOR, 1)
        self.loop = asyncio.get_running_loop()
        self.fd = self.sock.getsockopt(zmq.FD)
        self.future: asyncio.Future | None = None
        self.loop.add_reader(self.fd, self._ready)

    def _ready(self) -> None:
        # ZeroMQ's descriptor is edge-triggered: reading EVENTS re-arms it.
        if self.future is not None and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.sock.recv_multipart(copy=False)
            fut, self.future = self.future, None
            try:
                fut.set_result(wire.decode(frames, expect=self.schema, check_values=False) if self.schema is not None else frames)
            except wire.WireError as e:  # fail the benchmark at once, not after a timeout
                fut.set_exception(e)

    async def once(self) -> Any:
        fut = self.future = self.loop.create_future()
        self.sock.send_multipart(self.req)
        self._ready()
        return await asyncio.wait_for(fut, 30)

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        self.sock.close(0)


class Awaited:
    """The same client written the usual asyncio way: ``await recv_multipart()`` on a
    pyzmq asyncio socket, then ``decode``. Against floor+ it shows what waiting through
    pyzmq's asyncio layer (a Future, a task wake-up and its poller per message) costs
    next to a readiness callback on ZeroMQ's descriptor, as the inbox and pulls use."""

    def __init__(self, actx: zmq.asyncio.Context, endpoint: str, schema: wire.Schema) -> None:
        self.sock = actx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, b"await-%d" % id(self))
        self.sock.connect(endpoint)
        self.schema = schema
        self.req = wire.encode_request(FLOOR, 1)

    async def once(self) -> Any:
        await self.sock.send_multipart(self.req)
        frames = await asyncio.wait_for(self.sock.recv_multipart(copy=False), 30)
        return wire.decode(frames, expect=self.schema, check_values=False)

    def close(self) -> None:
        self.sock.close(0)


# ------------------------------------------------------------------ pulls


async def pull_once(t: Transport, check: bool = False) -> Any:
    [r] = await t.start_pulls((SERVER,), 30, check_values=False).wait()
    if not r.ok:
        raise RuntimeError(f"pull failed: {r.reason} {r.detail}")
    if check:
        wire.check_values(r.message, t.config.limits)
    return r


async def time_async(call: Callable[[], Awaitable[Any]], seconds: float, warmup: int = 3) -> list[float]:
    """Latencies of ``await call()`` one after another for ``seconds`` (at least 5)."""
    for _ in range(warmup):
        await call()
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < 5:
        t0 = time.perf_counter()
        got = await call()
        # Released inside the timed span, before the next request, as raw_once drops its
        # reply and as a peer drops the models it pulled before it pulls again.
        del got
        lat.append(time.perf_counter() - t0)
    return lat


# ------------------------------------------------------------------ server process


def child_main(conn, kinds: list[str], sizes: list[str], base: str) -> None:
    """Server process: one Transport (asyncio, main thread) and one raw ROUTER (a thread)
    per (transport kind, model size); reports its endpoints, serves until told to stop."""
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` shows where a stuck server is
    torch.set_num_threads(1)
    payloads = {s: build_payload(s) for s in sizes}
    sctx = zmq.Context()
    raw_socks, raw_eps = {}, {}
    for k in kinds:
        for s in sizes:
            sock, ep = raw_server_socket(sctx, k, base, f"raw-{k}-{s}")
            raw_socks[sock] = raw_frames(payloads[s])
            raw_eps[(k, s)] = ep
    stop = threading.Event()
    th = threading.Thread(target=raw_serve_forever, args=(raw_socks, stop), daemon=True)
    th.start()

    async def main() -> None:
        actx = zmq.asyncio.Context()
        ts = {}
        for k in kinds:
            for s in sizes:
                ep = endpoint_for(k, base, f"pull-{k}-{s}")
                t = Transport(actx, SERVER, {SERVER: ep})
                await t.start()
                t.publish(payloads[s])
                ts[(k, s)] = t
        conn.send({"raw": raw_eps, "pull": {key: t.endpoint for key, t in ts.items()}})
        while not conn.poll():
            await asyncio.sleep(0.05)
        conn.recv()
        for t in ts.values():
            await t.close()
        actx.term()

    asyncio.run(main())
    stop.set()
    th.join(2)
    sctx.destroy(0)
    conn.send("bye")


# ------------------------------------------------------------------ one configuration


def summarize(lat: list[float], nbytes: int) -> dict[str, float]:
    total = sum(lat)
    return {
        "n": len(lat),
        "per_s": len(lat) / total,
        "GBps": len(lat) * nbytes / total / 1e9,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
    }


def run_config(kind: str, size: str, where: str, seconds: float, base: str, remote: dict | None) -> dict:
    """Interleave pulls and raw round trips for one (kind, size, where)."""
    state = MODELS[size](0)
    schema = wire.schema_of(state)
    nbytes = state_bytes(state)
    sctx = zmq.Context()
    actx = zmq.asyncio.Context()
    sides = ("raw", "pull", "pull+v", "floor", "floor+", "await+") if where == "2proc" else ("raw", "pull")
    lat: dict[str, list[float]] = {k: [] for k in sides}
    rates: dict[str, list[float]] = {k: [] for k in sides}  # pulls/s per slice
    tag = f"{kind}-{size}"
    try:
        # raw side
        if where == "1proc":
            payload = build_payload(size)
            frames = raw_frames(payload)
            server, ep = raw_server_socket(sctx, kind, base, f"raw1-{tag}")
            client = raw_client(sctx, ep)
        else:
            frames, server = None, None
            client = raw_client(sctx, remote["raw"][(kind, size)])
        req = wire.encode_request(CLIENT, 1)

        async def pulls_main() -> None:
            if where == "1proc":
                d = {SERVER: endpoint_for(kind, base, f"pull1-{tag}"), CLIENT: endpoint_for(kind, base, f"c1-{tag}")}
                srv = Transport(actx, SERVER, d)
                await srv.start()
                srv.publish(build_payload(size))
                d[SERVER] = srv.endpoint
            else:
                srv = None
                d = {SERVER: remote["pull"][(kind, size)], CLIENT: endpoint_for(kind, base, f"c2-{tag}")}
            me = Transport(actx, CLIENT, d, config=TransportConfig(timeout_s=30), expect=schema)
            await me.start()
            floors: dict[str, Any] = {}
            if "floor" in sides:
                floors = {"floor": Floor(sctx, d[SERVER], None), "floor+": Floor(sctx, d[SERVER], schema),
                          "await+": Awaited(actx, d[SERVER], schema)}
            try:
                # raw | pull pull+v floor floor+ await+ | raw | pull ... | raw: every slice of the other
                # sides sits between two raw slices and is compared with their mean rate.
                slice_s = seconds / ROUNDS
                for i in range(ROUNDS + 1):
                    ts = time_raw(client, req, server, frames, slice_s)
                    lat["raw"].extend(ts)
                    rates["raw"].append(len(ts) / sum(ts))
                    if i == ROUNDS:
                        break
                    got = {"pull": await time_async(lambda: pull_once(me), slice_s)}
                    if "pull+v" in sides:
                        got["pull+v"] = await time_async(lambda: pull_once(me, check=True), slice_s)
                    for k, f in floors.items():
                        got[k] = await time_async(f.once, slice_s)
                    for k, ts in got.items():
                        lat[k].extend(ts)
                        rates[k].append(len(ts) / sum(ts))
                r = await me.pull(SERVER)
                assert r.ok and all(torch.equal(r.message.tensors[k], state[k]) for k in state)
            finally:
                for f in floors.values():
                    f.close()
                await me.close()
                if srv is not None:
                    await srv.close()

        asyncio.run(pulls_main())
        client.close(0)
        if server is not None:
            server.close(0)
    finally:
        actx.destroy(0)
        sctx.destroy(0)
    # each slice's rate over the mean of the raw slices on either side of it; median over slices
    ratios = {k: [r / raw for r, raw in zip(v, between(rates["raw"]))] for k, v in rates.items() if k != "raw"}
    out = {"kind": kind, "size": size, "where": where, "bytes": nbytes, "sides": sides,
           **{k: summarize(v, nbytes) for k, v in lat.items()},
           "ratio": median(ratios["pull"]), "ratio_rounds": ratios["pull"]}
    for k in sides[2:]:
        out[f"{k}_ratio"] = median(ratios[k])
    if "floor+" in sides:
        # What the Transport costs beyond the least a validating event-loop client does:
        # each round's pull slice over the floor+ slice of the same round.
        out["pull_vs_floor+"] = median([p / f for p, f in zip(rates["pull"], rates["floor+"])])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny run (seconds)")
    ap.add_argument("--seconds", type=float, default=None, help="time per configuration and side")
    args = ap.parse_args()
    seconds = args.seconds or (0.15 if args.quick else 2.0)
    # a watchdog: print every thread's stack and exit rather than hang forever
    faulthandler.dump_traceback_later(60 + 200 * seconds, exit=True)
    torch.set_num_threads(1)
    sizes = list(MODELS)
    base = ipc_dir("zgb")

    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    proc = mp.Process(target=child_main, args=(child, ["ipc", "tcp"], sizes, base), daemon=True)
    proc.start()
    child.close()
    results = []
    try:
        if not parent.poll(120):
            raise RuntimeError("server process did not start")
        remote = parent.recv()
        plan = [(k, s, "1proc") for k in ("inproc", "ipc", "tcp") for s in sizes]
        plan += [(k, s, "2proc") for k in ("ipc", "tcp") for s in sizes]
        for kind, size, where in plan:
            results.append(run_config(kind, size, where, seconds, base, remote if where == "2proc" else None))
            r = results[-1]
            print(f"  measured {kind:6s} {size:6s} {where}: pull {r['pull']['per_s']:.0f}/s, raw {r['raw']['per_s']:.0f}/s",
                  flush=True)
        parent.send("stop")
        parent.poll(10)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        shutil.rmtree(base, ignore_errors=True)

    rows = []
    for r in results:
        for side in r["sides"]:
            x = r[side]
            ratio = {"raw": "", "pull": r["ratio"]}.get(side, r.get(f"{side}_ratio"))
            rows.append([r["kind"], r["where"], r["size"], side, x["n"], x["per_s"], x["GBps"], x["p50_ms"], x["p99_ms"], ratio])
    print(f"\nmodel pulls vs raw pyzmq request/reply, {seconds:g}s per side and configuration, torch threads = "
          f"{torch.get_num_threads()}")
    print(table(["kind", "where", "model", "side", "n", "per s", "GB/s", "p50 ms", "p99 ms", "x raw"], rows))
    for r in results:
        if r["kind"] == "ipc" and r["where"] == "2proc":
            print(f"ipc, two processes, {r['size']} ({r['bytes'] / MB:.2f} MiB): pull/raw = {r['ratio']:.2f} (target >= {0.8 if r['size'] == '0.25MB' else 0.85}); "
                  f"with the value check on the loop {r['pull+v_ratio']:.2f}; asyncio floor {r['floor_ratio']:.2f}, floor + decode {r['floor+_ratio']:.2f}; "
                  f"pull / floor+ = {r['pull_vs_floor+']:.2f}; awaiting recv + decode {r['await+_ratio']:.2f}")
    figures = {f"{r['kind']}_{r['where']}_{r['size']}": {k: v for k, v in r.items() if k not in ("kind", "size", "where", "sides")}
               for r in results}
    json_line("transport", {"env": environment(), "quick": args.quick, "seconds": seconds, **figures})


if __name__ == "__main__":
    main()
