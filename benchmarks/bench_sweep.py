"""A sweep on warm workers against the same runs launched one after another.

Both sides run the same grid (default: ``ref-covariate-mnist``, methods dac-var, random
and oracle, seeds 0-4, async schedule): once as ``zmqgossip sweep --parallel 2`` and once
as one ``zmqgossip run`` command per grid point, one after another, in the same
benchmark run. It prints:

* the wall time of each side and their ratio (separate / sweep; target >= 1.25);
* per run, the time outside its rounds: for the sweep, the seconds the run took in its
  warm worker minus its rounds (first update's start to last update's end, from the
  events; target <= 0.5 s); for a cold run, the command's wall time minus its rounds,
  split into start (command start to first update) and end (last update to exit).

Prints a table and ends with one JSON line. Run:
``python benchmarks/bench_sweep.py [--quick] [--experiment ref-covariate-mnist] [--methods ...] [--seeds 0-4]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cold_split, environment, json_line, protocol_s, rounds_span, table

from zmqgossip.sweep import parse_seeds, parse_values


def cli() -> list[str]:
    script = Path(sys.executable).parent / "zmqgossip"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from zmqgossip.cli import app; app()"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny grid on label-digits: checks the script, not the speed")
    ap.add_argument("--experiment", default="ref-covariate-mnist")
    ap.add_argument("--methods", default="dac-var,random,oracle")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--fix", action="append", default=[], help="extra key=value for every run (repeatable)")
    args = ap.parse_args()
    fixed = list(args.fix)
    if args.quick:
        args.experiment, args.methods, args.seeds = "label-digits", "dac-var,random", "0"
        fixed += ["rounds=3", "peers=6", "data.n_train=20", "data.n_val=8", "data.test_per_class=10"]
    methods, seeds = parse_values(args.methods, "--methods"), parse_seeds(args.seeds)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        # The sweep.
        t = time.perf_counter()
        cmd = [*cli(), "sweep", args.experiment, "--method", ",".join(methods), "--seed", args.seeds,
               "--parallel", str(args.parallel), "--out", str(tmp / "sweep"), "-q"]
        for kv in fixed:
            cmd += ["--fix", kv]
        p = subprocess.run(cmd, capture_output=True, text=True)
        sweep_wall = time.perf_counter() - t
        if p.returncode != 0:
            sys.exit(f"sweep failed: {p.stderr[-3000:]}")
        record = json.loads((tmp / "sweep" / "sweep.json").read_text())["runs"]
        sweep_over, sweep_ours = [], []
        for name, r in record.items():
            sweep_over.append(r["seconds"] - rounds_span(tmp / "sweep" / name)[2])
            sweep_ours.append(sweep_over[-1] - sum(protocol_s(tmp / "sweep" / name)))
        # The same runs, one command each.
        cold = []
        t_all = time.perf_counter()
        for m in methods:
            for s in seeds:
                out = tmp / "runs" / f"{m}-{s}"
                cmd = [*cli(), "run", args.experiment, "--method", m, "--seed", str(s), "--out", str(out), "-q",
                       "--no-report"]
                for kv in fixed:
                    cmd += ["--set", kv]
                t0 = time.time()
                p = subprocess.run(cmd, capture_output=True, text=True)
                t1 = time.time()
                if p.returncode != 0:
                    sys.exit(f"run failed: {p.stderr[-3000:]}")
                cold.append({"run": f"{m}-{s}", **cold_split(out, t0, t1)})
        separate_wall = time.perf_counter() - t_all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cold_over = [c["wall_s"] - c["rounds_s"] for c in cold]
    figures = {
        "quick": args.quick, "env": environment(), "experiment": args.experiment, "methods": methods, "seeds": seeds,
        "parallel": args.parallel, "runs": len(cold),
        "sweep_wall_s": sweep_wall, "separate_wall_s": separate_wall, "speedup": separate_wall / sweep_wall,
        "sweep_overhead_s_median": statistics.median(sweep_over), "sweep_overhead_s_max": max(sweep_over),
        "sweep_ours_s_median": statistics.median(sweep_ours),
        "cold_overhead_s_median": statistics.median(cold_over),
        "cold_ours_s_median": statistics.median(c["ours_s"] for c in cold),
        "protocol_s_median": statistics.median(c["warmup_s"] + c["final_eval_s"] for c in cold),
        "cold_start_s_median": statistics.median(c["start_s"] for c in cold),
        "cold_end_s_median": statistics.median(c["end_s"] for c in cold),
        "cold_rounds_s_median": statistics.median(c["rounds_s"] for c in cold),
    }
    print(table(["side", "runs", "wall s", "outside rounds per run (median) s", "of it ours s", "start s", "end s"], [
        [f"sweep --parallel {args.parallel}", len(sweep_over), f"{sweep_wall:.1f}",
         f"{figures['sweep_overhead_s_median']:.2f} (max {figures['sweep_overhead_s_max']:.2f})",
         f"{figures['sweep_ours_s_median']:.2f}", "-", "-"],
        ["one zmqgossip run each", len(cold), f"{separate_wall:.1f}", f"{figures['cold_overhead_s_median']:.2f}",
         f"{figures['cold_ours_s_median']:.2f}", f"{figures['cold_start_s_median']:.2f}", f"{figures['cold_end_s_median']:.2f}"],
    ]))
    print(f"separate / sweep = {figures['speedup']:.2f} (target >= 1.25); a sweep's run spends "
          f"{figures['sweep_overhead_s_median']:.2f} s outside its rounds (target <= 0.5), of which "
          f"{figures['sweep_ours_s_median']:.2f} s are not the paper's protocol (warm-up training and final "
          f"evaluation: {figures['protocol_s_median']:.2f} s a run); a cold run {figures['cold_overhead_s_median']:.2f} s, "
          f"ours {figures['cold_ours_s_median']:.2f} s")
    json_line("sweep", figures)


if __name__ == "__main__":
    main()
