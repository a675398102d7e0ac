"""Throughput of the asyncio peer runner against the same arithmetic with no peers at all.

N = 20 peers run DAC in one process (``run_local``, async schedule, torch threads 1):
every compute job goes to the one compute thread, the event loop serves and pulls
models over ZeroMQ (inproc) beside it. The baseline is a plain loop over the same
partition and models that does, per peer-round, exactly the peer's arithmetic and
nothing else:

    score n pulled models (the peer's ``Scorer``: mean loss on its train set)
    ``FlatModel.mix`` of own + n (the model kept in one buffer, as a peer keeps it),
    ``learning.train`` (E epochs, batch 8)
    ``learning.evaluate`` on the validation set, offer it to a ``Checkpoint``, keep a copy
    of the model's frame as what the others would pull next

By default the process is pinned to one CPU (``--cores``): the target is a ratio >= 0.9
on one core, where everything the event loop does comes out of the compute budget.

Per config it prints: peer-rounds per second of both (the runner from its first
``Peer.run`` entered to its last one left, so warm-up and the final evaluation are out),
their ratio (``--repeats`` runner runs, 3 by default, each between two baseline segments
of half its length, B R B R B R B: each run is compared with the segments beside it and
the median ratio is the figure, so a shared machine whose speed drifts within a minute
moves the figure less), the same in CPU time (process CPU per
peer-round, robust to other load on a shared machine; the event loop's share is the main
thread's CPU time), and the share of the runner's whole wall time spent outside compute
(1 - sum of the peers' ``compute_s`` / wall; ``compute_s`` is wall time inside the
compute thread, warm-up, snapshot encoding, checkpoints and final evaluations included,
so on one core it also counts time the compute thread was preempted by the event loop),
and the runner's extra CPU per peer-round over the plain loop, split into the event loop's
and the compute thread's, beside what the 0.9 target allows (base / 0.9 - base).

The floor (skipped with ``--no-floor``): the same runner with method ``local`` (no pulls,
no scoring, no mixing: a round trains, validates, checkpoints, publishes its snapshot and
logs its event) against the plain loop of that arithmetic, interleaved the same way. Its
ratio is what the asyncio runner itself (a compute thread beside the event loop, one hop
there and back per round, snapshots, event lines) costs before any model is pulled; the
config's extra CPU minus the floor's is what the pulls add.

Configs: (a) digits + MLP, label shift; (b) mnist-bundled + CNN28, rotation 0/180.
Run: ``python benchmarks/bench_peers.py [--quick] [--only mlp|cnn] [--repeats R] [--profile] [--no-floor]``.
Ends with one JSON line of all figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import environment, json_line, median, table  # noqa: F401  (also puts the checkout on sys.path)

import numpy as np
import torch

from zmqgossip import config, hosting, learning, models, wire
from zmqgossip.flat import FlatModel
from zmqgossip.metrics import RunDir
from zmqgossip.peer import Peer
from zmqgossip.scoring import Scorer


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    raw: dict

    def cfg(self, rounds: int, method: str | None = None) -> config.ExperimentConfig:
        return config.validate({**self.raw, "rounds": rounds, **({"method": method} if method else {})})


def settings(quick: bool) -> dict[str, tuple[Setting, int]]:
    """Each config and its rounds; sized for tens of seconds a config on one quiet core (--quick: a few seconds)."""
    common = {"method": "dac", "schedule": "async", "peers": 20, "seed": 0,
              "policy": {"n": 5, "tau": 30.0}, "compute": {"threads": 1, "processes": 1},
              "network": {"transport": "inproc"}}
    mlp = Setting("mlp", "digits MLP, label shift", {
        **common, "name": "bench-mlp",
        "data": {"dataset": "digits", "shift": "label", "n_train": 50, "n_val": 20, "test_per_class": 20},
        "train": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "test_every": 0},
    })
    cnn = Setting("cnn", "mnist-bundled CNN28, rotation 0/180", {
        **common, "name": "bench-cnn",
        "data": {"dataset": "mnist-bundled", "shift": "rotation", "angles": [0, 180], "fractions": [0.5, 0.5],
                 "allow_overlap": True, "n_train": 200 if not quick else 40, "n_val": 50 if not quick else 20,
                 "test_per_class": 20},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "test_every": 0},
    })
    if quick:
        return {"mlp": (mlp, 4), "cnn": (cnn, 3)}
    return {"mlp": (mlp, 30), "cnn": (cnn, 8)}


# ---------------------------------------------------------------------------- the runner


class PhaseClock:
    """Wall and CPU time from the first ``Peer.run`` entered to the last one left: the
    rounds phase of an async run, warm-up and final evaluation excluded."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self._orig = Peer.run

    def __enter__(self) -> "PhaseClock":
        orig, marks = self._orig, self.marks

        async def run(peer: Peer, *a, **k):  # type: ignore[no-untyped-def]
            if "wall0" not in marks:
                marks.update(wall0=time.perf_counter(), cpu0=time.process_time(), main0=time.thread_time())
            try:
                return await orig(peer, *a, **k)
            finally:
                marks.update(wall1=time.perf_counter(), cpu1=time.process_time(), main1=time.thread_time())

        Peer.run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Peer.run = self._orig  # type: ignore[method-assign]

    def span(self, kind: str) -> float:
        return self.marks[f"{kind}1"] - self.marks[f"{kind}0"]


def _profiled_compute(profiles: list[cProfile.Profile]):  # type: ignore[no-untyped-def]
    """hosting.build.ComputeThread whose worker thread runs under cProfile."""
    base = hosting.build.ComputeThread

    def start() -> None:
        p = cProfile.Profile()
        profiles.append(p)
        p.enable()

    def make(*a, **k):  # type: ignore[no-untyped-def]
        return base(*a, initializer=start, **k)

    return make


def _top(prof: cProfile.Profile | list[cProfile.Profile], n: int = 30) -> str:
    s = io.StringIO()
    profs = prof if isinstance(prof, list) else [prof]
    st = pstats.Stats(profs[0], stream=s)
    for p in profs[1:]:
        st.add(p)
    st.sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(n)
    return s.getvalue()


def run_runner(cfg: config.ExperimentConfig, out: Path, profile: bool) -> dict:
    prof = cProfile.Profile() if profile else None
    worker_profs: list[cProfile.Profile] = []
    orig_compute = hosting.build.ComputeThread
    if profile:
        hosting.build.ComputeThread = _profiled_compute(worker_profs)  # type: ignore[misc]
    try:
        with PhaseClock() as clock:
            if prof:
                prof.enable()
            summary = hosting.run_experiment(cfg, out)
            if prof:
                prof.disable()
    finally:
        hosting.build.ComputeThread = orig_compute  # type: ignore[misc]
    rd = RunDir(out)
    events = [e for p in range(cfg.peers) for e in rd.events(p)]
    results = rd.results()
    compute = sum(r["compute_s"] for r in results.values())
    wall = float(summary["wall_s"])
    phase = clock.span("wall")
    pull_s = [e.pull_s for e in events]
    fig = {
        "peer_rounds": summary["peer_rounds"],
        "rounds_phase_s": phase,
        "wall_s": wall,
        "rounds_per_s": summary["peer_rounds"] / phase,
        "cpu_ms_per_round": 1000 * clock.span("cpu") / summary["peer_rounds"],
        "main_thread_cpu_ms_per_round": 1000 * clock.span("main") / summary["peer_rounds"],
        "main_thread_cpu_share": clock.span("main") / clock.span("cpu"),
        "compute_s": compute,
        "outside_compute_share": 1.0 - compute / wall,
        "pull_s_p50": float(np.median(pull_s)),
        "pulls_failed": summary["pulls_failed"],
        "within_last_20pct": summary["within_cluster_pull_fraction"]["last_20pct"],
        "test_acc": summary["test_acc"]["mean"],
        "bytes_sent": summary["bytes_sent"],
    }
    if prof:
        fig["profile"] = "--- main thread (event loop) ---\n" + _top(prof)
        if worker_profs:
            fig["profile"] += "\n--- compute thread ---\n" + _top(worker_profs)
    return fig


# ---------------------------------------------------------------------------- the baseline


class PlainLoop:
    """The peers' arithmetic with no peers: models and data in lists, one loop.

    ``pulls=False``: a round only trains, validates, checkpoints and publishes (what a
    ``local`` peer does), the baseline of the runner's floor.
    """

    def __init__(self, cfg: config.ExperimentConfig, seed: int = 0, pulls: bool = True) -> None:
        self.cfg = cfg
        self.pulls = pulls
        part = hosting.build_partition(cfg)
        name = self.model_name = hosting.model_name(cfg, part)
        self.clients = part.clients
        self.models = []
        for pid in range(cfg.peers):
            torch.manual_seed(cfg.seed * 100_003 + pid)
            self.models.append(models.build_model(name, part.input_shape, part.num_classes))
        self.scorers = [
            Scorer(models.build_model(name, part.input_shape, part.num_classes), d.train_x, d.train_y) for d in self.clients
        ]
        # Kept as the peers keep them: each model in one buffer laid out as a data frame,
        # and what the others pull as a copy of that frame.
        self.flats = [FlatModel.adopt(m) for m in self.models]
        self.states = [self._published(f) for f in self.flats]
        self.checkpoints = [learning.Checkpoint() for _ in self.models]
        self.gens = [torch.Generator().manual_seed(seed * 1_000_003 + p) for p in range(cfg.peers)]
        self.rng = np.random.default_rng(seed)
        self.step = 0

    @staticmethod
    def _published(flat: FlatModel) -> wire.Message:
        return wire.Message(wire.Kind.MODEL_REPLY, 0, 0, data=flat.frame().copy(), layout=flat.layout)

    def peer_round(self, i: int) -> None:
        cfg, d, model, flat = self.cfg, self.clients[i], self.models[i], self.flats[i]
        if self.pulls:
            others = [p for p in range(cfg.peers) if p != i]
            chosen = [int(x) for x in self.rng.choice(others, size=min(cfg.policy.n, len(others)), replace=False)]
            for k in chosen:  # score
                self.scorers[i].mean_loss_of(self.states[k])
            n_i = int(d.train_y.shape[0])
            weights = [n_i, *(int(self.clients[k].train_y.shape[0]) for k in chosen)]
            flat.mix([flat.frame(), *(flat.frame_of(self.states[k]) for k in chosen)], weights)
        t = cfg.train
        learning.train(model, d.train_x, d.train_y, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, generator=self.gens[i])
        val_loss, _ = learning.evaluate(model, d.val_x, d.val_y)
        self.checkpoints[i].offer(val_loss, model, self.step)
        self.states[i] = self._published(flat)  # "publish"

    def run(self, peer_rounds: int) -> tuple[float, float]:
        """(wall, CPU) seconds for ``peer_rounds`` updates, round-robin over the peers."""
        t, c = time.perf_counter(), time.process_time()
        for r in range(peer_rounds):
            self.peer_round(r % self.cfg.peers)
            if r % self.cfg.peers == self.cfg.peers - 1:
                self.step += 1
        return time.perf_counter() - t, time.process_time() - c


# ---------------------------------------------------------------------------- main


def interleaved(cfg: config.ExperimentConfig, base: PlainLoop, repeats: int, profile: bool) -> dict:
    """``repeats`` runner runs of ``cfg``, each between two baseline segments of half its
    peer-rounds (B R B R ... B): each run's ratio is to the mean rate of the two segments
    around it, the figure is the median of those ratios (a shared machine's speed drifts
    within a minute; one run against one baseline would read that drift as a result)."""
    total = cfg.peers * cfg.rounds
    half = total // 2
    base.run(cfg.peers)  # warm-up: one pass, untimed (the runner warms up too)
    segments = [base.run(half)]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as out:
        for k in range(repeats):
            runs.append(run_runner(cfg, Path(out) / f"run{k}", profile and k == 0))
            torch.set_num_threads(1)
            segments.append(base.run(half))
    per_run = []
    for k, r in enumerate(runs):
        (w1, c1), (w2, c2) = segments[k], segments[k + 1]
        base_rate, base_cpu_ms = 2 * half / (w1 + w2), 1000 * (c1 + c2) / (2 * half)
        per_run.append({
            "ratio": r["rounds_per_s"] / base_rate,
            "cpu_ratio": base_cpu_ms / r["cpu_ms_per_round"],
            "baseline_rounds_per_s": base_rate,
            "baseline_cpu_ms_per_round": base_cpu_ms,
            "rounds_per_s": r["rounds_per_s"],
            "main_thread_cpu_ms_per_round": r["main_thread_cpu_ms_per_round"],
        })
    # The run whose ratio is the (lower) median stands for the config; every run's ratio is kept.
    mid = sorted(range(repeats), key=lambda k: per_run[k]["ratio"])[(repeats - 1) // 2]
    shown, shown_base = runs[mid], per_run[mid]
    extra = shown["cpu_ms_per_round"] - shown_base["baseline_cpu_ms_per_round"]
    return {
        "baseline_segments_per_s": [half / w for w, _ in segments],
        **shown,
        "baseline_rounds_per_s": shown_base["baseline_rounds_per_s"],
        "baseline_ms_per_round": 1000.0 / shown_base["baseline_rounds_per_s"],
        "baseline_cpu_ms_per_round": shown_base["baseline_cpu_ms_per_round"],
        "runner_ms_per_round": 1000.0 / shown["rounds_per_s"],
        "ratio": median([p["ratio"] for p in per_run]),
        "cpu_ratio": median([p["cpu_ratio"] for p in per_run]),
        # Where the runner's extra CPU per peer-round goes (the median run), and how much the
        # 0.9 target allows: base / 0.9 - base.
        "extra_cpu_ms_per_round": extra,
        "compute_thread_extra_cpu_ms_per_round": extra - shown["main_thread_cpu_ms_per_round"],
        "target_allows_cpu_ms_per_round": shown_base["baseline_cpu_ms_per_round"] * (1 / 0.9 - 1),
        "ratios": [p["ratio"] for p in per_run],
        "cpu_ratios": [p["cpu_ratio"] for p in per_run],
        "runs": per_run,
    }


# The floor's own figures, kept beside the config's.
FLOOR_KEYS = ("ratio", "ratios", "cpu_ratio", "rounds_per_s", "baseline_rounds_per_s", "baseline_cpu_ms_per_round",
              "cpu_ms_per_round", "main_thread_cpu_ms_per_round", "extra_cpu_ms_per_round",
              "compute_thread_extra_cpu_ms_per_round", "target_allows_cpu_ms_per_round", "peer_rounds")


def bench(setting: Setting, rounds: int, profile: bool, repeats: int, floor: bool) -> dict:
    """The config's runner against its plain loop; with ``floor``, then the same runner
    with no pulls at all (``local``: train, validate, checkpoint, publish, log) against
    the plain loop of that arithmetic: what the asyncio runner costs before any pull."""
    cfg = setting.cfg(rounds)
    torch.set_num_threads(1)
    base = PlainLoop(cfg)
    fig = {
        "config": setting.key,
        "label": setting.label,
        "model": base.model_name,
        "peers": cfg.peers,
        "rounds": rounds,
        "n": cfg.policy.n,
        "n_train": cfg.data.n_train,
        "n_val": cfg.data.n_val,
        "epochs": cfg.train.epochs,
        "repeats": repeats,
        **interleaved(cfg, base, repeats, profile),
    }
    if floor:
        local = setting.cfg(rounds, method="local")
        got = interleaved(local, PlainLoop(local, pulls=False), repeats, False)
        fig["floor"] = {"method": "local", **{k: got[k] for k in FLOOR_KEYS}}
    return fig


def pin(cores: int) -> list[int] | None:
    """Restrict this process (all its threads) to ``cores`` CPUs; the CPUs used, or None."""
    if cores <= 0 or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    use = allowed[-cores:]  # the last ones: CPU 0 takes most interrupts
    os.sched_setaffinity(0, use)
    return use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny variant (a few seconds a config)")
    ap.add_argument("--only", choices=["mlp", "cnn"], help="run one config")
    ap.add_argument("--rounds", type=int, help="rounds per peer (default: per config)")
    ap.add_argument("--repeats", type=int, help="runner runs per config, each between two baseline segments; "
                                                "the ratio is their median (default 3; --quick: 1)")
    ap.add_argument("--profile", action="store_true", help="cProfile the runner's event loop and compute threads; print the top functions")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip the floor: the same runner with no pulls (method local) against its plain loop")
    ap.add_argument("--cores", type=int, default=1,
                    help="pin this process to that many CPUs (default 1: the target is >= 0.9 on one core; 0: no pinning)")
    args = ap.parse_args()
    pinned = pin(args.cores)
    load0 = os.getloadavg()

    figures = []
    for key, (setting, rounds) in settings(args.quick).items():
        if args.only and key != args.only:
            continue
        f = bench(setting, args.rounds or rounds, args.profile, args.repeats or (1 if args.quick else 3), not args.no_floor)
        prof = f.pop("profile", None)
        figures.append(f)
        print(f"[{key}] {setting.label} ({f['model']}): {f['peers']} peers x {f['rounds']} rounds, n={f['n']}, "
              f"{f['n_train']} train / {f['n_val']} val, E={f['epochs']}", flush=True)
        if prof:
            print(prof)

    headers = ["config", "peer-rounds", "baseline r/s", "runner r/s", "ratio (median)", "ratios", "base ms/r", "runner ms/r",
               "base cpu ms/r", "runner cpu ms/r", "event loop cpu ms/r", "cpu ratio",
               "outside compute (wall)", "event loop share (cpu)", "pull p50 ms", "runner wall s", "within last20", "test acc"]
    rows = [
        [f["config"], f["peer_rounds"], f["baseline_rounds_per_s"], f["rounds_per_s"], f["ratio"],
         " ".join(f"{r:.3f}" for r in f["ratios"]),
         f["baseline_ms_per_round"], f["runner_ms_per_round"], f["baseline_cpu_ms_per_round"],
         f["cpu_ms_per_round"], f["main_thread_cpu_ms_per_round"], f["cpu_ratio"],
         f"{100 * f['outside_compute_share']:.1f}%", f"{100 * f['main_thread_cpu_share']:.1f}%",
         1000 * f["pull_s_p50"], f["wall_s"], f["within_last_20pct"], f["test_acc"]]
        for f in figures
    ]
    print()
    print(table(headers, rows))
    for f in figures:
        verdict = "meets" if f["ratio"] >= 0.9 else "MISSES"
        print(f"{f['config']}: runner / plain loop = {f['ratio']:.3f}, the median of {f['repeats']} "
              f"({', '.join(f'{r:.3f}' for r in f['ratios'])}) ({verdict} the 0.9 target); CPU ratios "
              f"{', '.join(f'{r:.3f}' for r in f['cpu_ratios'])}; baseline segments "
              f"{', '.join(f'{r:.1f}' for r in f['baseline_segments_per_s'])} r/s")
        print(f"{f['config']}: the runner spends {f['extra_cpu_ms_per_round']:.2f} ms of CPU per peer-round more than "
              f"the plain loop's {f['baseline_cpu_ms_per_round']:.2f} ({f['main_thread_cpu_ms_per_round']:.2f} on the event "
              f"loop, {f['compute_thread_extra_cpu_ms_per_round']:+.2f} in the compute thread); the target allows "
              f"{f['target_allows_cpu_ms_per_round']:.2f}")
        fl = f.get("floor")
        if fl:
            print(f"{f['config']}: floor: the same runner with no pulls (method local) / its plain loop = {fl['ratio']:.3f} "
                  f"({', '.join(f'{r:.3f}' for r in fl['ratios'])}); it spends {fl['extra_cpu_ms_per_round']:.2f} ms of CPU "
                  f"per peer-round more ({fl['main_thread_cpu_ms_per_round']:.2f} on the event loop, "
                  f"{fl['compute_thread_extra_cpu_ms_per_round']:+.2f} in the compute thread) of the "
                  f"{fl['target_allows_cpu_ms_per_round']:.2f} that 0.9 allows; the pulls cost "
                  f"{f['extra_cpu_ms_per_round'] - fl['extra_cpu_ms_per_round']:.2f} ms per peer-round on top")
    print(f"pinned to CPUs {pinned}" if pinned else "not pinned", f"; load average before/after: {load0} / {os.getloadavg()}")
    json_line("peers", {"quick": args.quick, "cpus_pinned": pinned, "load_avg_before": load0, "environment": environment(),
                              "configs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()} for f in figures]})


if __name__ == "__main__":
    main()
