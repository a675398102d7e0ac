"""Regenerate docs/PERFORMANCE.md: every benchmark run afresh, one table of its figures.

    python benchmarks/performance.py                 # every benchmark, full size (long)
    python benchmarks/performance.py --quick         # each benchmark's --quick variant (a test runs it)
    python benchmarks/performance.py --only wire,transport
    python benchmarks/performance.py --reuse LINES   # render again from saved JSON lines, no runs

Each ``bench_*.py`` ends with one JSON line of its figures, each measured against a
baseline taken in the same run. This script runs them one after another, keeps their
lines (``--lines``, a JSON-lines file: one record per benchmark with the command, its
date, the machine and the line), and renders one table: each headline figure, its
baseline, their ratio, the target, the command that measured it, when and where. What a
figure means, and why a benchmark measures it the way it does, is in the docstring of its
script. Nothing in the table is typed by hand; a benchmark that fails is listed with its
error and makes the script exit non-zero after the others ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ["wire", "transport", "stress", "peers", "processes", "reference", "learning", "fuzz", "sweep", "cluster"]
# Options a benchmark runs with here. The flood: attackers are other machines, so the
# flooders get a core of their own (on a 2-core machine they would otherwise take the
# victim's), and the same flood against a peer beside the victim is its floor.
OPTIONS: dict[str, list[str]] = {"fuzz": ["--apart", "--floor"]}


@dataclass(frozen=True)
class Target:
    """``ratio >= value`` (``at_least``) or ``ratio < value``."""

    value: float
    at_least: bool = True

    def met(self, ratio: float) -> bool:
        return ratio >= self.value if self.at_least else ratio < self.value

    def __str__(self) -> str:
        return f"{'≥' if self.at_least else '<'} {self.value:g}"


@dataclass(frozen=True)
class Row:
    """One headline figure of a benchmark: ``value`` against ``baseline``."""

    figure: str
    value: float | None
    unit: str
    baseline: float | None
    baseline_what: str
    ratio: float | None
    target: Target | None = None


# ------------------------------------------------------------------ the figures of each line


def _wire(line: dict[str, Any]) -> Iterator[Row]:
    for size, r in _sizes(line):
        yield Row(f"wire codec: encode (snapshot) + validated decode of a {size} model",
                  r["both_GBps"], "GB/s", r["memcpy_GBps"], "memcpy of its bytes", r["ratio_both_vs_memcpy"],
                  Target(0.5) if size == "10MB" else None)
    r = line.get("0.25MB")
    if r and "both_dict_us" in r:
        yield Row("wire codec: encode + validated decode of the 0.25MB model, per message", r["both_us"], "µs",
                  20.0, "the bound of 20 µs", r["both_us"] / 20.0, Target(1.0, at_least=False))
        yield Row("wire codec: the same 0.25MB model kept as a state dict (a copy and a view per tensor)",
                  r["both_dict_us"], "µs", r["both_us"], "kept as one frame (FlatModel)", r["both_dict_us"] / r["both_us"])
    a, b = line.get("100 tensors"), line.get("10 tensors")
    if a and b:
        yield Row("wire codec: 0.25 MB in 100 tensors vs in 10, per message", a["both_us"], "µs", b["both_us"],
                  "the same bytes in 10 tensors", a["both_us"] / b["both_us"])


def _transport(line: dict[str, Any]) -> Iterator[Row]:
    for key, r in line.items():
        if isinstance(r, dict) and key.startswith("ipc_2proc_"):
            size = key.removeprefix("ipc_2proc_")
            yield Row(f"model pull (request, reply, decode; values checked in the compute thread), ipc between 2 processes, {size}",
                      r["pull"]["per_s"], "pulls/s", r["raw"]["per_s"], "raw pyzmq request/reply", r["ratio"],
                      Target(0.85 if size == "10MB" else 0.8))
            if "pull+v" in r:
                yield Row(f"the same pull, its values checked on the event loop too, {size}",
                          r["pull+v"]["per_s"], "pulls/s", r["raw"]["per_s"], "raw pyzmq request/reply", r["pull+v_ratio"])
            if "floor+" in r:
                yield Row(f"the floor: a bare asyncio client that receives and decodes as a pull does (no Transport), {size}",
                          r["floor+"]["per_s"], "pulls/s", r["raw"]["per_s"], "raw pyzmq request/reply", r["floor+_ratio"])


def _stress(line: dict[str, Any]) -> Iterator[Row]:
    f = line.get("foundation")
    if f:
        yield Row("`zmqgossip stress`, 4 peers on 2 processes, ipc, 0.25 MB, zero-delay links",
                  f["stress_per_s"], "pulls/s", f["foundation_raw_per_s"], "raw pyzmq request/reply, as bench_transport measures it",
                  f["stress_vs_foundation_raw"], Target(0.8))
    for r in line.get("vs_raw", []):
        yield Row(f"`zmqgossip stress` vs a raw engine of the same topology ({r['topology']}, {r['payload_kb']:g} KiB)",
                  r["stress_pulls_per_s"], "pulls/s", r["raw_pulls_per_s"], "raw pyzmq engine, no decoding", r["ratio"])


def _peers(line: dict[str, Any]) -> Iterator[Row]:
    for c in line["configs"]:
        yield Row(f"{c['peers']} DAC peers as asyncio tasks, one core: {c.get('label', c['config'])}",
                  c["rounds_per_s"], "peer-rounds/s", c["baseline_rounds_per_s"], "the same arithmetic in a plain loop",
                  c["ratio"], Target(0.9))
        fl = c.get("floor")
        if fl:
            yield Row(f"the floor: the same {c['peers']} peers pulling nothing (method local), {c.get('label', c['config'])}",
                      fl["rounds_per_s"], "peer-rounds/s", fl["baseline_rounds_per_s"],
                      "training, validation and snapshots in a plain loop", fl["ratio"])


def _processes(line: dict[str, Any]) -> Iterator[Row]:
    runs = line["runs"]
    counts = sorted({r["processes"] for r in runs})
    if len(counts) < 2:
        return
    rate = {p: statistics.median(r["steady_rate"] for r in runs if r["processes"] == p) for p in counts}
    top, base = counts[-1], counts[0]
    yield Row(f"`{line['preset']}` async on {top} worker processes (steady state)", rate[top], "peer-rounds/s",
              rate[base], f"the same run in {base} process", line["steady_ratio"], Target(1.8))


def _reference(line: dict[str, Any]) -> Iterator[Row]:
    for r in line["runs"]:
        yield Row(f"`{line['preset']}` {r['schedule']}, {r['processes']} process(es)", r["rate"], "client-rounds/s",
                  line["reference_rate"], "the paper's reference code (a fixed figure)", r["x_reference"],
                  Target(1.5) if r["schedule"] == "sequential" else Target(4.0))
    cold = line.get("cold_run")
    if cold:
        what = f"a cold `zmqgossip run {line['preset']} --method dac-var --schedule async --processes 2`"
        yield Row(f"{what}: seconds outside its rounds (median; target <= 3 s)", cold["outside_s"], "s",
                  cold["warmup_s"] + cold["final_eval_s"], "of it the paper's protocol (warm-up, final evaluation)", None)
        yield Row("the same: launch to first update / last update to exit", cold["start_s"], "s", cold["end_s"],
                  "last update to exit", None)


def _learning(line: dict[str, Any]) -> Iterator[Row]:
    for r in line["results"]:
        t = f"{r['threads']} torch thread{'s' if r['threads'] > 1 else ''}"
        yield Row(f"one client-round (CNN28, 400 samples, E=3, batch 8): scoring 5 pulled models, {t}",
                  r["score_ms"], "ms", r["train_ms"], "training", r["score_over_train"], Target(0.15, at_least=False))
        yield Row(f"the same round: validation of 100 samples, {t}",
                  r["validate_ms"], "ms", r["train_ms"], "training", r["validate_over_train"], Target(0.05, at_least=False))


def _fuzz(line: dict[str, Any]) -> Iterator[Row]:
    n = line.get("flooders", 1)
    for variant, r in line.get("variants", {"plain": line}).items():
        before, flood = r["phases"]["before"], r["phases"]["flood"]
        if variant == "curve":
            yield Row(f"CURVE peer, {n} flooders with keys outside the roster: connections refused at the handshake",
                      r["refusals"].get("auth", 0) / flood["seconds"], "connections/s", None, "", None)
        else:
            yield Row(f"hostile messages a live, training peer reads ({n} flooding processes; the rest wait in "
                      "ZeroMQ's queues)", r["fuzz_msgs_per_s"], "messages/s", None, "", None)
        apart = ", flooders on a core of their own" if line.get("apart") else ""
        yield Row(f"{variant}: an honest peer's pull latency p99 during the flood{apart}", r["p99_ms_flood"], "ms",
                  r["p99_ms_no_flood"], "p99 before the flood", r["p99_ratio_flood_vs_no_flood"],
                  Target(2.0, at_least=False))
        fl = r.get("floor")
        if fl:
            yield Row(f"{variant}: the floor: the same p99 for a peer beside the flooded one (its process, not flooded)",
                      fl["p99_ms_flood"], "ms", fl["p99_ms_no_flood"], "p99 before the flood",
                      fl["p99_ratio_flood_vs_no_flood"])
        yield Row(f"{variant}: the flooded peer's training rounds during the flood", flood["rounds_per_s"],
                  "rounds/s", before["rounds_per_s"], "before the flood", r["rounds_ratio_flood_vs_no_flood"],
                  Target(0.5))


def _sweep(line: dict[str, Any]) -> Iterator[Row]:
    grid = f"`{line['experiment']}`, {len(line['methods'])} methods x {len(line['seeds'])} seeds"
    yield Row(f"a sweep of {grid} on {line['parallel']} warm workers", line["sweep_wall_s"], "s",
              line["separate_wall_s"], "the same runs, one `zmqgossip run` each", line["speedup"], Target(1.25))
    yield Row(f"a sweep's run: seconds outside its rounds ({grid}, median)", line["sweep_overhead_s_median"], "s",
              line["cold_overhead_s_median"], "a cold `zmqgossip run`'s", None)
    if "sweep_ours_s_median" in line:
        yield Row("of those, seconds that are not the paper's protocol (warm-up, final evaluation; target <= 0.5 s)",
                  line["sweep_ours_s_median"], "s", line["cold_ours_s_median"], "a cold `zmqgossip run`'s", None)


def _cluster(line: dict[str, Any]) -> Iterator[Row]:
    yield Row(f"{line['peers']} DAC peers (digits MLP) on 2 Ray actors over a 2-node local cluster (steady state)",
              line["ray"]["steady_rate"], "peer-rounds/s", line["processes"]["steady_rate"],
              "the same run on 2 worker processes", line["ratio_steady_ray_vs_processes"], Target(0.9))
    yield Row("the same run's start-up on Ray (command start to first update)", line["ray"]["startup_s"], "s",
              line["processes"]["startup_s"], "on 2 worker processes", None)
    sc = line["scale"]
    yield Row(f"{sc['peers']:,} DAC peers over 2 Ray nodes ({sc['failed_peers']} failed; peak RSS per worker "
              f"{', '.join(f'{x:.0f}' for x in sc['rss_mb'])} MB)", sc["steady_rate"], "peer-rounds/s", None, "", None)
    st = line["stress"]
    yield Row(f"{st['peers']:,} stress peers over {st['workers']} Ray workers ({st['failed']} failed pulls)",
              st["pulls_per_s"], "pulls/s", None, "", None)


def _sizes(line: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key, r in line.items():
        if isinstance(r, dict) and "ratio_both_vs_memcpy" in r:
            yield key, r


ROWS: dict[str, Callable[[dict[str, Any]], Iterator[Row]]] = {
    "wire": _wire, "transport": _transport, "stress": _stress, "peers": _peers,
    "processes": _processes, "reference": _reference, "learning": _learning, "fuzz": _fuzz, "sweep": _sweep,
    "cluster": _cluster,
}
assert list(ROWS) == BENCHMARKS


# ------------------------------------------------------------------ running


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import zmq

    return {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": version("torch"), "pyzmq": zmq.pyzmq_version(),
            "libzmq": zmq.zmq_version()}


def run_one(name: str, quick: bool, timeout_s: float, where: dict[str, Any]) -> dict[str, Any]:
    """Run ``bench_NAME.py``; its record (command, date, machine, load, seconds, JSON line or error)."""
    args = [*OPTIONS.get(name, []), *(["--quick"] if quick else [])]
    command = " ".join(["python", f"benchmarks/bench_{name}.py", *args])
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    print(f"== {command}", file=sys.stderr, flush=True)
    record: dict[str, Any] = {"benchmark": name, "command": command, "quick": quick,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": where,
                              "load_before": round(load, 2)}
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"bench_{name}.py"), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**record, "seconds": round(time.monotonic() - t0, 1), "error": f"no result within {timeout_s:g} s"}
    record["seconds"] = round(time.monotonic() - t0, 1)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {**record, "error": f"exit status {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
    try:
        line = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {**record, "error": f"the last line is not JSON: {lines[-1][:200]}"}
    if line.get("benchmark") != name:
        return {**record, "error": f"the JSON line is from {line.get('benchmark')!r}", "line": line}
    return {**record, "line": line}


# ------------------------------------------------------------------ rendering


def _num(x: float | None) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def rows_of(record: dict[str, Any]) -> list[Row]:
    return list(ROWS[record["benchmark"]](record["line"])) if "line" in record else []


def _load(rec: dict[str, Any]) -> str:
    return "load not recorded" if rec.get("load_before") is None else f"load {rec['load_before']:g}"


def _label(where: dict[str, Any]) -> str:
    return f"{where['cores']} × {where['cpu']}"


def render(records: list[dict[str, Any]], quick: bool, regenerate: str) -> str:
    out = [
        "# Performance",
        "",
        f"Generated by `{regenerate}` from the benchmarks' own JSON lines; edit the script, not this",
        "file. Each figure is measured against a baseline taken in the same run (the ratio is",
        "what to read: absolute rates move with the machine and its load). What each benchmark",
        "measures, and how, is in the docstring of its script in `benchmarks/`.",
        "",
    ]
    if quick and all(rec.get("quick") for rec in records):
        out += ["**Quick figures**: each benchmark's `--quick` variant, a check that the scripts run.",
                "They are too short to say anything about speed; run the script without `--quick`.", ""]
    elif any(rec.get("quick") for rec in records):
        out += ["**Rows whose command ends in `--quick` are quick figures**: a check that the script",
                "runs, too short to say anything about speed. The other rows are full measurements.", ""]
    out += ["| figure | value | baseline | ratio | target | command | date | machine |",
            "|---|---:|---:|---:|---:|---|---|---|"]
    for rec in records:
        for r in rows_of(rec):
            met = "" if r.target is None or r.ratio is None else (" ✓" if r.target.met(r.ratio) else " ✗")
            base = "–" if r.baseline is None else f"{_num(r.baseline)} {r.unit}: {r.baseline_what}"
            out.append(f"| {r.figure} | {_num(r.value)} {r.unit} | {base} | {_num(r.ratio)}{met} | "
                       f"{r.target or '–'} | `{rec['command']}` | {rec['date']} | {_label(rec['machine'])}, "
                       f"{_load(rec)} |")
    failed = [rec for rec in records if "error" in rec]
    if failed:
        out += ["", "Benchmarks that gave no figures in this run:", ""]
        out += [f"- `{rec['command']}`: {rec['error'].strip().splitlines()[-1] if rec['error'].strip() else 'failed'}"
                for rec in failed]
    missing = [b for b in BENCHMARKS if b not in {rec["benchmark"] for rec in records}]
    if missing:
        out += ["", "Not in this run: " + ", ".join(f"`python benchmarks/bench_{b}.py`" for b in missing) + "."]
    out += ["", "✓ / ✗: the ratio meets / misses its target. load: the 1-minute load average when the",
            "benchmark started (other jobs on the machine skew rates, less so ratios).", ""]
    machines = {json.dumps(rec["machine"], sort_keys=True): rec["machine"] for rec in records}
    for where in machines.values():
        out += [f"Machine: {_label(where)}, {where['system']}; Python {where['python']}, torch {where['torch']}, "
                f"pyzmq {where['pyzmq']} (libzmq {where['libzmq']})."]
    out += [f"Benchmark time: {sum(rec.get('seconds', 0) for rec in records) / 60:.1f} minutes.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each benchmark's --quick variant (seconds to a minute each)")
    ap.add_argument("--only", help=f"comma-separated benchmarks (default all: {','.join(BENCHMARKS)})")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "PERFORMANCE.md", help="where the document goes")
    ap.add_argument("--lines", type=Path, default=ROOT / "runs" / "performance.jsonl",
                    help="where the benchmarks' records go (one JSON line each)")
    ap.add_argument("--reuse", type=Path, help="render from a --lines file of an earlier run instead of running")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds one benchmark may take")
    args = ap.parse_args(argv)

    names = BENCHMARKS if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    if args.reuse:
        records = [json.loads(ln) for ln in args.reuse.read_text().splitlines() if ln.strip()]
        records = [r for r in records if r["benchmark"] in names]
        quick = all(r.get("quick") for r in records)
    else:
        quick = args.quick
        args.lines.parent.mkdir(parents=True, exist_ok=True)
        records = []
        where = machine()
        with open(args.lines, "w") as f:
            for name in names:
                records.append(run_one(name, quick, args.timeout, where))
                f.write(json.dumps(records[-1]) + "\n")
                f.flush()
    records.sort(key=lambda r: BENCHMARKS.index(r["benchmark"]))  # the document's order, whatever ran first
    regenerate = "python benchmarks/performance.py" + (" --quick" if quick else "")
    text = render(records, quick, regenerate)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(text)
    for rec in records:
        status = rec.get("error", "").strip().splitlines()[-1:] or [f"{len(rows_of(rec))} figures"]
        print(f"{rec['benchmark']}: {status[0]} ({rec.get('seconds', 0):.0f} s)", file=sys.stderr)
    failed = [rec["benchmark"] for rec in records if "error" in rec]
    print(json.dumps({"bench": "performance", "quick": quick, "doc": str(args.doc), "lines": str(args.reuse or args.lines),
                      "rows": sum(len(rows_of(r)) for r in records), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
