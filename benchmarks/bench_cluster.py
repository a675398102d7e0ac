"""What hosting on a Ray cluster costs: the same run on Ray actors and on worker processes.

A local two-node Ray cluster (``ray.cluster_utils.Cluster``: a head and one more node,
one CPU each, every node at 127.0.0.1, no dashboard) is started once. Then, through the
real CLI:

(a) the same DAC run (digits MLP, ``--peers`` peers, label shift) with ``--processes 2``
    and with ``--ray ADDRESS --workers 2`` (one actor on each node), interleaved
    ``--repeat`` times. The steady rate is peer-rounds / (end of the last update - start
    of the first), from the event files: the rate while the peers run, which is what the
    control plane must not slow down (target: Ray / processes >= 0.9). Start-up
    (command start -> first update: imports, placing actors or spawning processes,
    warm-up, the ready barrier) is printed apart, as are accuracy and failures.
(b) scale: ``--scale-peers`` DAC peers (digits MLP, label permutation, a few images
    each) over the two nodes: peer-rounds/s, peak RSS of each worker actor, failures.
(c) ``--stress-peers`` stress peers over ``--stress-workers`` Ray workers: pulls/s and
    failures (target: none).

Ends with one JSON line. Run:
``python benchmarks/bench_cluster.py [--quick] [--peers 100] [--rounds 20] [--repeat 3]
[--scale-peers 1000] [--stress-peers 10000] [--stress-workers 6]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, json_line, table  # noqa: E402

from zmqgossip.metrics import RunDir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "COLUMNS": "120"}


def cli(*args: str, timeout: float = 3600) -> tuple[str, float]:
    """Run the zmqgossip command; its stdout and wall seconds (exits on failure)."""
    cmd = [sys.executable, "-c", "from zmqgossip.cli import app; app()", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **ENV}, timeout=timeout)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): zmqgossip {' '.join(args)}\n{p.stderr[-3000:]}")
    return p.stdout, wall


def learning_run(out: Path, where: list[str], sets: list[str], preset: str = "label-digits") -> dict:
    args = ["run", preset, *where, "--out", str(out), "-q", "--no-report", "--set", "compute.threads=1"]
    for s in sets:
        args += ["--set", s]
    _, wall = cli(*args)
    s = RunDir.reader(out).summary()
    evs = [e for es in RunDir.reader(out).all_events().values() for e in es]
    first, last = min(e.t - e.dt for e in evs), max(e.t for e in evs)
    running = last - first
    workers = s.get("workers", [])
    return {
        "peer_rounds": len(evs), "wall_s": wall, "running_s": running, "startup_s": wall - running,
        "steady_rate": len(evs) / running, "e2e_rate": len(evs) / wall, "acc": s["test_acc"]["mean"],
        "within_last20": s["within_cluster_pull_fraction"]["last_20pct"], "failed_peers": len(s["failed_peers"]),
        "pulls_failed": s["pulls_failed"], "nodes": len({w.get("node_id") for w in workers if w.get("node_id")}),
        "rss_mb": [w.get("rss_mb") for w in workers if w.get("rss_mb") is not None],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small runs: checks the script, not the speed")
    ap.add_argument("--peers", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3, help="processes/Ray pairs, interleaved (medians reported)")
    ap.add_argument("--scale-peers", type=int, default=1000)
    ap.add_argument("--scale-rounds", type=int, default=3)
    ap.add_argument("--stress-peers", type=int, default=10_000)
    ap.add_argument("--stress-workers", type=int, default=6)
    a = ap.parse_args()
    if a.quick:
        a.peers, a.rounds, a.repeat, a.scale_peers, a.stress_peers, a.stress_workers = 20, 3, 1, 60, 200, 2

    os.environ.update(ENV)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    os.environ["TMPDIR"] = str(tmp)  # the cluster's session files, removed at the end
    from ray.cluster_utils import Cluster

    t = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        cluster_s = time.perf_counter() - t
        print(f"cluster: 2 nodes at {cluster.address}, up in {cluster_s:.1f} s", flush=True)
        ray_where = ["--ray", cluster.address, "--workers", "2"]

        # (a) the same run on processes and on Ray, interleaved
        data = ["data.n_train=10", "data.n_val=4"] if a.peers > 20 else []
        sets = [f"peers={a.peers}", f"rounds={a.rounds}", "method=dac", *data]
        runs: dict[str, list[dict]] = {"processes": [], "ray": []}
        for k in range(a.repeat):
            for name, where in (("processes", ["--processes", "2"]), ("ray", ray_where)):
                r = learning_run(tmp / f"{name}-{k}", where, sets)
                runs[name].append(r)
                print(f"  {name} #{k}: {r['steady_rate']:.1f} peer-rounds/s steady, start-up {r['startup_s']:.1f} s, "
                      f"wall {r['wall_s']:.1f} s", flush=True)
        med = {n: {f: statistics.median(r[f] for r in rs) for f in
                   ("steady_rate", "e2e_rate", "startup_s", "wall_s", "acc", "within_last20")} for n, rs in runs.items()}
        ratio = med["ray"]["steady_rate"] / med["processes"]["steady_rate"]
        print(f"\n(a) {a.peers} DAC peers x {a.rounds} rounds, digits MLP; medians of {a.repeat}")
        print(table(["hosting", "peer-rounds/s steady", "end-to-end", "start-up s", "wall s", "acc", "within 20%",
                     "failed peers"],
                    [[n, m["steady_rate"], m["e2e_rate"], m["startup_s"], m["wall_s"], m["acc"], m["within_last20"],
                      max(r["failed_peers"] for r in runs[n])] for n, m in med.items()]))
        print(f"Ray / processes, steady: {ratio:.3f} (target >= 0.9)")

        # (b) scale: many DAC peers over the two nodes
        per_cluster = a.scale_peers // 2
        scale_sets = [f"peers={a.scale_peers}", f"rounds={a.scale_rounds}", "method=dac", "policy.n=3",
                      "network.pool_size=4", "train.epochs=1", "train.test_every=0", "data.n_train=2", "data.n_val=1", "data.allow_overlap=true",
                      "data.test_per_class=20"]
        scale = learning_run(tmp / "scale", ray_where, scale_sets, "permutation-digits")
        print(f"\n(b) {a.scale_peers} DAC peers ({per_cluster} a cluster) x {a.scale_rounds} rounds over 2 Ray nodes: "
              f"{scale['steady_rate']:.1f} peer-rounds/s steady, start-up {scale['startup_s']:.1f} s, wall "
              f"{scale['wall_s']:.1f} s, peak RSS per worker {', '.join(f'{x:.0f}' for x in scale['rss_mb'])} MB, "
              f"failed peers {scale['failed_peers']}")

        # (c) stress peers over Ray workers
        out, wall = cli("stress", "--ray", cluster.address, "--workers", str(a.stress_workers), "--peers",
                        str(a.stress_peers), "--payload-kb", "1", "--pulls", "5", "--pool-size", "2", "--timeout", "60")
        st = json.loads(out.strip().splitlines()[-1])["stress"]
        print(f"\n(c) {a.stress_peers:,} stress peers over {a.stress_workers} Ray workers on {len(set(st['nodes']))} nodes: "
              f"{st['pulls_per_s']:,.0f} pulls/s, {st['ok']:,} ok, {st['failed']} failed, peak RSS per worker "
              f"{', '.join(f'{x:.0f}' for x in st['rss_mb'])} MB, wall {wall:.1f} s")
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    json_line("cluster", {
        "quick": a.quick, "peers": a.peers, "rounds": a.rounds, "repeat": a.repeat, "cluster_up_s": cluster_s,
        "processes": med["processes"], "ray": med["ray"], "ratio_steady_ray_vs_processes": ratio,
        "runs": runs,
        "scale": {"peers": a.scale_peers, "rounds": a.scale_rounds, **scale},
        "stress": {"peers": a.stress_peers, "workers": a.stress_workers, "pulls_per_s": st["pulls_per_s"], "ok": st["ok"],
                   "failed": st["failed"], "rss_mb": st["rss_mb"], "wall_s": wall, "nodes": len(set(st["nodes"]))},
        "environment": environment(),
    })


if __name__ == "__main__":
    main()
