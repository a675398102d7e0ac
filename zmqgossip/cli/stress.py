"""`zmqgossip stress`: peers exchange random tensors (no training) and the transport is measured."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import app, fail, out

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _list(text: str | None, kind: type, name: str) -> list | None:
    if text is None:
        return None
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{name}: expected a comma-separated list of numbers, got {text!r}")
    if not vals or any(v <= 0 for v in vals):
        fail(f"{name}: expected positive numbers, got {text!r}")
    return vals


def _links_table(path: Path | None) -> dict[str, Any]:
    """The ``[links]`` table of a TOML file (a links file or a whole experiment)."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        fail(f"--links {path}: {e.strerror or e}")
    except tomllib.TOMLDecodeError as e:
        fail(f"--links {path}: not valid TOML: {e}")
    if "links" not in raw or not isinstance(raw["links"], dict):
        fail(f"--links {path}: no [links] table")
    return raw["links"]


def _validation_message(e: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"{loc}: {msg}" if loc else msg)
        return "; ".join(parts)
    return str(e)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def result_table(results: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title, caption="latency in ms (successful pulls); sockets and fds: peak, per peer")
    for col in ("peers", "KiB", "ok", "failed", "pulls/s", "GB/s", "p50", "p90", "p99", "sockets", "fds", "RSS MB"):
        t.add_column(col, justify="right")
    for r in results:
        lat = r["latency_ms"]
        t.add_row(
            _fmt(r["peers"]), _fmt(r["payload_kb"]), _fmt(r["ok"]), _fmt(r["failed"]), _fmt(r["pulls_per_s"]),
            _fmt(r["gb_per_s"]), _fmt(lat["p50"]), _fmt(lat["p90"]), _fmt(lat["p99"]),
            f"{r['sockets_peak']:,} ({r['sockets_per_peer']:.2g})", f"{r['fds_used']:,} ({r['fds_per_peer']:.2g})",
            " / ".join(f"{x:.0f}" for x in r["rss_mb"]),
        )
    return t


def _caption(r: dict[str, Any]) -> str:
    bits = []
    if r["failures"]:
        bits.append(f"{r['peers']} peers x {r['payload_kb']:g} KiB: failed pulls: "
                    + ", ".join(f"{k} {v}" for k, v in r["failures"].items()))
    if r["refusals"]:
        bits.append("refusals: " + ", ".join(f"{k} {v}" for k, v in r["refusals"].items()))
    ln = r.get("links")
    if ln:
        bits.append(
            f"links: {ln['messages']:,} messages, {ln['dropped']:,} dropped, {ln['partitioned']:,} partitioned, "
            f"{ln['duplicated']:,} duplicated, delay p50 {_fmt(ln['delay_p50_ms'])} ms / p99 {_fmt(ln['delay_p99_ms'])} ms"
        )
    return "\n".join(bits)


@app.command()
def stress(
    peers: int = typer.Option(20, help="number of peers"),
    payload_kb: float = typer.Option(256.0, "--payload-kb", help="payload per peer in KiB (random float32)"),
    tensors: int = typer.Option(1, help="split the payload into this many tensors"),
    pulls: Optional[int] = typer.Option(None, help="pulls per peer (default 20 unless --duration)"),
    duration: Optional[float] = typer.Option(None, "--duration", help="or: pull for this many seconds"),
    fanout: int = typer.Option(2, help="distinct peers pulled concurrently per round"),
    warmup_rounds: int = typer.Option(0, "--warmup-rounds", help="rounds before the measurement starts (connect; not counted)"),
    interval: float = typer.Option(0.0, "--interval", help="seconds each peer waits between rounds (emulated compute)"),
    neighbours: Optional[int] = typer.Option(None, help="pull only from a fixed random set of this many peers (default: all)"),
    transport: Optional[str] = typer.Option(None, help="inproc, ipc or tcp (default inproc; ipc with --mode processes)"),
    mode: str = typer.Option("asyncio", help="asyncio (one process) or processes (spawned workers)"),
    processes: int = typer.Option(2, help="worker processes for --mode processes"),
    pool_size: Optional[int] = typer.Option(
        None, "--pool-size", help="outgoing sockets kept per peer (LRU; default: one per other peer up to 33 peers, else 8)"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="per-pull timeout in seconds (default: an experiment's)"),
    hwm: Optional[int] = typer.Option(None, help="messages queued per socket (default: an experiment's)"),
    seed: int = typer.Option(0, help="random seed (targets, link randomness)"),
    emulator: str = typer.Option("auto", help="link emulator: auto, on (even for ideal links), off"),
    links: Optional[Path] = typer.Option(None, "--links", help="TOML file with a \\[links] table (profile, classes, scenario)"),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="constant one-way latency of every link"),
    jitter_ms: Optional[float] = typer.Option(None, "--jitter-ms", help="plus uniform [0, jitter] per message"),
    loss: Optional[float] = typer.Option(None, help="message loss probability of every link"),
    bandwidth_mbps: Optional[float] = typer.Option(None, "--bandwidth-mbps", help="bandwidth per directed link, Mbit/s"),
    sweep_peers: Optional[str] = typer.Option(None, "--sweep-peers", help="sweep: peer counts, e.g. 10,100,1000"),
    sweep_payload_kb: Optional[str] = typer.Option(None, "--sweep-payload-kb", help="sweep: payloads in KiB, e.g. 1,256"),
    out_dir: Path = typer.Option(Path("stress-out"), "--out", help="sweep: where sweep.csv and sweep.png go"),
    ray: Optional[str] = typer.Option(None, "--ray", help="workers as actors of a Ray cluster: auto, local or its ADDRESS (tcp)"),
    workers: Optional[int] = typer.Option(None, help="with --ray: worker actors (default: one per CPU of the cluster)"),
    advertise: Optional[str] = typer.Option(None, help="with --ray: the address every worker binds its peers at"),
) -> None:
    """Stress the transport: peers pull random tensors from each other; print a table and one JSON line."""
    from ..allocator import tune_for_hosting

    tune_for_hosting()  # this process hosts peers (or starts workers that do); before torch allocates
    from ..stress import StressConfig, StressError, run_stress, run_sweep
    from ..net import TransportError

    link_raw = _links_table(links)
    quick = {k: v for k, v in (("latency_ms", latency_ms), ("jitter_ms", jitter_ms), ("loss", loss),
                               ("bandwidth_mbps", bandwidth_mbps)) if v is not None}
    if quick:
        default = dict(link_raw.get("default", {}))
        lat = dict(default.get("latency", {}))
        if latency_ms is not None:
            lat.update(dist="constant", mean_ms=latency_ms)
        if jitter_ms is not None:
            lat["jitter_ms"] = jitter_ms
        if lat:
            default["latency"] = lat
        if loss is not None:
            default["loss"] = loss
        if bandwidth_mbps is not None:
            default["bandwidth_mbps"] = bandwidth_mbps
        link_raw = {**link_raw, "default": default}
    raw = {
        "peers": peers, "payload_kb": payload_kb, "tensors": tensors, "pulls": pulls, "duration_s": duration,
        "fanout": fanout, "neighbours": neighbours, "interval_s": interval, "warmup_rounds": warmup_rounds,
        "mode": mode, "processes": processes, "seed": seed, "emulator": emulator, "links": link_raw,
        "network": {k: v for k, v in (("transport", transport), ("pool_size", pool_size), ("timeout_s", timeout),
                                      ("hwm", hwm)) if v is not None},
    }
    if ray is None and (workers is not None or advertise is not None):
        fail("--workers and --advertise go with --ray")
    if ray is not None:
        if transport not in (None, "tcp"):
            fail(f"--ray runs over tcp between nodes, not {transport}")
        if sweep_peers is not None or sweep_payload_kb is not None:
            fail("--ray runs one configuration: leave out --sweep-peers and --sweep-payload-kb")
        raw["mode"] = "processes"
        raw["network"]["transport"] = "tcp"
    sp = _list(sweep_peers, int, "--sweep-peers")
    skb = _list(sweep_payload_kb, float, "--sweep-payload-kb")
    if sp is not None or skb is not None:
        sp = sp or [peers]
        skb = skb or [payload_kb]
        # Validate the grid's corner with the most peers first (fanout < peers, processes <= peers).
        raw = {**raw, "peers": max(sp)}
    try:
        cfg = StressConfig.model_validate(raw)
        if sp is not None:
            for n in sp:
                StressConfig.model_validate({**raw, "peers": n})
    except ValueError as e:
        fail(_validation_message(e))
    with contextlib.ExitStack() as held:
        if ray is not None:
            from ..hosting.cluster import ClusterError, RayConnection, check_workers, default_workers

            try:
                check_workers(workers, peers)
                conn = held.enter_context(RayConnection(ray))  # held for the run
                raw["processes"] = workers or default_workers(conn.cpus(), peers)
                cfg = StressConfig.model_validate(raw)
            except ClusterError as e:
                fail(str(e))
            except ValueError as e:
                fail(_validation_message(e))
        try:
            if sp is None:
                results = [run_stress(cfg, ray=ray, advertise=advertise)]
                title = f"zmqgossip stress · {'ray' if ray else cfg.mode} · {cfg.transport} · fan-out {cfg.fanout}"
                figures: dict[str, Any] = {"stress": results[0]}
            else:

                def progress(r: dict[str, Any]) -> None:
                    typer.echo(f"  {r['peers']} peers x {r['payload_kb']:g} KiB: {r['pulls_per_s']:,.0f} pulls/s, "
                               f"{r['failed']} failed", err=True)

                results, csv_path, png_path = run_sweep(cfg, sp, skb, out_dir, on_result=progress)
                title = f"zmqgossip stress sweep · {cfg.mode} · {cfg.transport} · fan-out {cfg.fanout}"
                figures = {"sweep": results, "csv": str(csv_path), "png": str(png_path)}
        except (TransportError, StressError) as e:
            fail(str(e))
    # Wider than a pipe's default 80 columns, so the table is not folded in logs.
    console = Console(width=max(out.width, 132))
    console.print(result_table(results, title))
    for r in results:
        cap = _caption(r)
        if cap:
            console.print(cap)
    typer.echo(json.dumps(figures, default=float))
