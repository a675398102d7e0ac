"""Throughput of one async run hosted by 1 process vs spread over worker processes.

Runs the same bundled label-shift preset (default ``label-mnist``: 20 peers, CNN28 on
bundled MNIST, scaled down to 10 rounds, tens of seconds per run) through
the real CLI, ``zmqgossip run PRESET --processes P``, once per P (default 1 then 2), one
torch thread per process, and measures peer-rounds per second two ways:

* steady: peer-rounds / (end of the last update - start of the first update), from the
  event files: the rate while the peers run, without start-up and shutdown;
* end-to-end: peer-rounds / wall time of the whole command (interpreter and torch
  imports, spawning workers, warm-up, ready barrier, final evaluation, shutdown).

It splits each run's wall time into start-up (command start -> first update), running,
and the tail (last update -> command exit); prints per-cluster accuracy of each run (a
speed-up must not come from doing less); and samples every thread of the command and
its workers in /proc every 0.2 s to show where the CPU went while the peers ran (asyncio
loop, compute thread, ZeroMQ I/O, the watching parent) and how much the rest of the
machine took meanwhile ("other jobs", from /proc/stat: the load average lags too much).
From the CPU seconds per peer-round it also projects the steady ratio on an idle
machine (each hosting process bound by its one compute thread, all by the cores).

The target on a 2-core machine is a steady ratio >= 1.8. Other jobs skew every measured
rate (not the CPU seconds per peer-round): rerun when "other jobs" is near 0.

Prints two tables and ends with one JSON line. Run:
``python benchmarks/bench_processes.py [--quick] [--preset label-mnist] [--rounds 10] [--processes 1,2] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zmqgossip.metrics import Event, RunDir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, json_line, table

ROOT = Path(__file__).resolve().parent.parent


def zmqgossip_cmd() -> list[str]:
    script = Path(sys.executable).parent / "zmqgossip"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from zmqgossip.cli import app; app()"]


def load1() -> float:
    return os.getloadavg()[0]


def events_of(out: Path) -> list[Event]:
    return [e for evs in RunDir.reader(out).all_events().values() for e in evs]


TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def thread_cpu(root: int) -> dict[tuple[int, int], tuple[str, float]]:
    """CPU seconds so far of every thread in ``root``'s process tree: (pid, tid) -> (kind, s).

    kind: "parent" (any thread of ``root`` when it has worker children), "loop" (a
    hosting process's main thread: the asyncio loop, serving, pulls, decoding), "zmq"
    (ZeroMQ's I/O threads), "compute" (the other threads: the compute thread)."""
    pids = tree(root)
    has_workers = len(pids) > 2  # root + resource tracker + workers
    out = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            f = stat.rsplit(")", 1)[1].split()
            cpu = (int(f[11]) + int(f[12])) / TICK  # utime, stime
            tid = int(task.name)
            if pid == root and has_workers:
                kind = "parent"
            elif comm.startswith("ZMQbg"):
                kind = "zmq"
            elif tid == pid:
                kind = "loop"
            else:
                kind = "compute"
            out[(pid, tid)] = (kind, cpu)
    return out


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return (sum(f[:8]) - idle) / TICK


def event_count(out: Path) -> int:
    n = 0
    for p in (out / "events").glob("peer-*.jsonl"):
        try:
            n += p.read_bytes().count(b"\n")
        except OSError:
            pass
    return n


def one_run(preset: str, rounds: int, processes: int, out: Path, extra: list[str]) -> dict:
    cmd = [*zmqgossip_cmd(), "run", preset, "--processes", str(processes), "--set", f"rounds={rounds}",
           "--set", "compute.threads=1", "--out", str(out), "-q", "--no-report", *extra]
    load_before = load1()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t_start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "120"})
    # Sample the tree's per-thread CPU, the machine's CPU and the event count every 0.2 s;
    # threads keep their last reading after they exit.
    seen: dict[tuple[int, int], tuple[str, float]] = {}
    samples = []  # (time, events, {kind: cpu}, machine busy)
    expected = None
    while proc.poll() is None:
        seen.update(thread_cpu(proc.pid))
        by_kind: dict[str, float] = {}
        for kind, c in seen.values():
            by_kind[kind] = by_kind.get(kind, 0.0) + c
        if expected is None and (out / "config.json").is_file():
            try:
                cfg = json.loads((out / "config.json").read_text())
                expected = cfg["peers"] * cfg["rounds"]
            except (OSError, ValueError, KeyError):
                pass
        samples.append((time.time(), event_count(out), by_kind, machine_busy()))
        time.sleep(0.2)
    _, stderr = proc.communicate()
    t_end = time.time()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its (reaped) workers
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    evs = events_of(out)
    n = len(evs)
    # The steady rate from the events' own times (seconds from the host's round-0 start;
    # hosts of one run pass that barrier within a ping of each other).
    first_start = min(e.t - e.dt for e in evs)
    last_end = max(e.t for e in evs)
    span = last_end - first_start
    # The running window in sampled time: first sample with an update .. first with all.
    i0 = next((i for i, s in enumerate(samples) if s[1] > 0), 0)
    i1 = next((i for i, s in enumerate(samples) if expected and s[1] >= expected), len(samples) - 1)
    window = {}
    if i1 > i0:
        (ta, _, ka, ma), (tb, _, kb, mb) = samples[i0], samples[i1]
        w = tb - ta
        kinds = {k: (kb.get(k, 0.0) - ka.get(k, 0.0)) / w for k in ("loop", "compute", "zmq", "parent")}
        mine = sum(kinds.values())
        window = {"window_s": w, "cores_mine": mine,
                  **{f"cores_{k}": v for k, v in kinds.items()},
                  "cores_others": max(0.0, (mb - ma) / w - mine)}
    wall = t_end - t_start
    return {
        "processes": processes,
        "peer_rounds": n,
        "wall_s": wall,
        "startup_s": (samples[i0][0] - t_start) if samples else None,
        "running_s": span,
        "tail_s": (t_end - samples[i1][0]) if samples else None,
        "steady_rate": n / span,
        "e2e_rate": n / wall,
        "cpu_s": cpu,
        "cpu_per_round_s": cpu / n,
        **window,
        "acc": {c: v for c, v in summary["test_acc"]["per_cluster"].items()},
        "acc_mean": summary["test_acc"]["mean"],
        "failed_peers": summary["failed_peers"],
        "pulls_failed": summary["pulls_failed"],
        "load_before": load_before,
        "load_after": load1(),
        "median_dt_s": sorted(e.dt for e in evs)[n // 2],
        "median_pull_s": sorted(e.pull_s for e in evs)[n // 2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a tiny run (label-digits, 3 rounds): checks the script, not the speed")
    ap.add_argument("--preset", default="label-mnist", help="bundled label-shift preset (default label-mnist)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds per peer (default 10: tens of seconds per run)")
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts; the first is the baseline")
    ap.add_argument("--repeat", type=int, default=1, help="run the whole sequence this many times (medians are reported)")
    ap.add_argument("--set", dest="set_", action="append", default=[], help="extra --set overrides for every run")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.rounds, args.repeat = "label-digits", 3, 1
    counts = [int(x) for x in args.processes.split(",")]
    extra = [a for s in args.set_ for a in ("--set", s)]

    env = environment()
    print(f"bench_processes: {args.preset}, {args.rounds} rounds, processes {counts} x {args.repeat}, "
          f"{env['cpus']} cpus, torch {env['torch']}, load {load1():.2f}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-procs-") as tmp:
        for k in range(args.repeat):
            for p in counts:
                r = one_run(args.preset, args.rounds, p, Path(tmp) / f"p{p}-{k}", extra)
                r["repeat"] = k
                runs.append(r)
                print(f"  {p} process(es): {r['peer_rounds']} peer-rounds, wall {r['wall_s']:.1f} s, "
                      f"steady {r['steady_rate']:.2f}/s, other jobs {r.get('cores_others', float('nan')):.2f} cores, "
                      f"load {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)

    clusters = sorted(runs[0]["acc"])
    base_rate = statistics.median(r["steady_rate"] for r in runs if r["processes"] == counts[0])
    base_e2e = statistics.median(r["e2e_rate"] for r in runs if r["processes"] == counts[0])
    headers = ["processes", "peer-rounds", "wall s", "start-up s", "running s", "tail s", "steady /s", "e2e /s",
               "steady x", "e2e x", *[f"acc c{c}" for c in clusters], "load 1m"]
    rows = [[r["processes"], r["peer_rounds"], r["wall_s"], r["startup_s"], r["running_s"], r["tail_s"],
             r["steady_rate"], r["e2e_rate"], r["steady_rate"] / base_rate, r["e2e_rate"] / base_e2e,
             *[f"{100 * r['acc'][c]:.1f}%" for c in clusters], f"{r['load_before']:.2f}/{r['load_after']:.2f}"]
            for r in runs]
    print()
    print(table(headers, rows))
    print("steady: peer-rounds / (last update end - first update start), from the event files; e2e: / whole command")
    print("start-up: command start -> first update; tail: last update -> command exit (sampled every 0.2 s)")
    # Where the CPU went while the peers ran (sampled per thread from /proc).
    headers = ["processes", "window s", "cores mine", "loop", "compute", "zmq io", "parent", "other jobs",
               "cpu s/peer-round", "cpu s total"]
    rows = [[r["processes"], r.get("window_s"), r.get("cores_mine"), r.get("cores_loop"), r.get("cores_compute"),
             r.get("cores_zmq"), r.get("cores_parent"), r.get("cores_others"),
             (r["cores_mine"] / r["steady_rate"]) if "cores_mine" in r else None, r["cpu_s"]] for r in runs]
    print()
    print(table(headers, [[("-" if v is None else v) for v in row] for row in rows]))
    print("cores: CPU seconds per second of the running window. loop: each hosting process's main thread (asyncio:")
    print("pulls, serving, decoding, scoring hand-off); compute: the compute thread(s); parent: the")
    print("command that spawned workers (progress, watching); other jobs: the rest of the machine meanwhile")
    for r in runs:
        if r["failed_peers"] or r["pulls_failed"]:
            print(f"  note: {r['processes']} process(es): failed peers {r['failed_peers']}, failed pulls {r['pulls_failed']}")
    top = counts[-1]
    top_rate = statistics.median(r["steady_rate"] for r in runs if r["processes"] == top)
    top_e2e = statistics.median(r["e2e_rate"] for r in runs if r["processes"] == top)
    ratio = top_rate / base_rate
    verdict = "meets" if ratio >= 1.8 else "misses"
    others = statistics.median(r.get("cores_others", 0.0) for r in runs)
    print(f"steady ratio {top} vs {counts[0]} process(es): {ratio:.2f} ({verdict} the 1.8 target); "
          f"end-to-end {top_e2e / base_e2e:.2f}; other jobs used {others:.2f} of {env['cpus']} cores meanwhile")
    # What the same CPU cost per peer-round gives on an idle machine: each hosting process
    # is bound by its one compute thread (1 core), all of them by the machine's cores.
    proj = None
    # A window too short for the CPU samples to see the compute threads (a --quick run on a
    # busy machine can read 0) projects nothing.
    if all(r.get("cores_mine", 0) > 0 and r.get("cores_compute", 0) > 0 for r in runs):
        def idle_rate(p: int) -> float:
            rs = [r for r in runs if r["processes"] == p]
            compute = statistics.median(r["cores_compute"] / r["steady_rate"] for r in rs)  # cpu s / peer-round
            total = statistics.median(r["cores_mine"] / r["steady_rate"] for r in rs)
            return min(p / compute, (env["cpus"] or 1) / total)

        proj = idle_rate(top) / idle_rate(counts[0])
        print(f"projected steady ratio on an idle {env['cpus']}-core machine (same CPU seconds per peer-round, "
              f"one busy compute thread per process): {proj:.2f}")
    json_line("processes", {
        "preset": args.preset,
        "rounds": args.rounds,
        "quick": args.quick,
        "repeat": args.repeat,
        "steady_ratio": round(ratio, 3),
        "e2e_ratio": round(top_e2e / base_e2e, 3),
        "projected_idle_steady_ratio": None if proj is None else round(proj, 3),
        "other_jobs_cores": round(others, 3),
        "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
        "cpus": env["cpus"],
        "torch": env["torch"],
    })


if __name__ == "__main__":
    main()
