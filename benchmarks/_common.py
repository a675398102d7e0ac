"""Small helpers shared by the benchmark scripts: model shapes, timing, printing."""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from zmqgossip.allocator import tune_for_hosting  # noqa: E402

# The benchmarks host peers, or time what hosting peers does: tuned as a hosting process
# is, and before torch allocates (it reads the huge-page setting at its first allocation).
MEMORY = tune_for_hosting()

import torch  # noqa: E402

MB = 1024 * 1024


def lenet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The paper's LeNet-style CNN for 32x32x3: 62,006 float32 parameters (~0.25 MB)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "conv1.weight": (6, 3, 5, 5),
        "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5),
        "conv2.bias": (16,),
        "fc1.weight": (120, 400),
        "fc1.bias": (120,),
        "fc2.weight": (84, 120),
        "fc2.bias": (84,),
        "fc3.weight": (10, 84),
        "fc3.bias": (10,),
    }
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def big_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A ~10 MB float32 MLP-ish state dict (2.6 M parameters in 6 tensors)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "fc1.weight": (2048, 1024),
        "fc1.bias": (2048,),
        "fc2.weight": (256, 2048),
        "fc2.bias": (256,),
        "fc3.weight": (10, 256),
        "fc3.bias": (10,),
    }
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


MODELS: dict[str, Callable[[int], dict[str, torch.Tensor]]] = {"0.25MB": lenet_state, "10MB": big_state}


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def time_loop(fn: Callable[[], object], min_time: float, min_iters: int = 3, max_iters: int = 1_000_000) -> list[float]:
    """Call ``fn`` repeatedly for at least ``min_time`` seconds; per-call seconds."""
    times = []
    end = time.perf_counter() + min_time
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[i]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def between(xs: Sequence[float]) -> list[float]:
    """The mean of each two neighbours: a baseline measured before and after each run."""
    return [(a + b) / 2 for a, b in itertools.pairwise(xs)]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def environment() -> dict[str, object]:
    import numpy as np
    import zmq

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "memory": dict(MEMORY),
    }


def json_line(name: str, figures: dict[str, object]) -> None:
    """The one machine-readable line a benchmark ends with."""
    print(json.dumps({"benchmark": name, **figures}, sort_keys=False, default=float))


def rounds_span(run_dir: Path) -> tuple[float, float, float]:
    """A run's rounds in wall-clock seconds: (first update's start, last update's end, span),
    from its event files (event times count from the run's round 0)."""
    from zmqgossip.metrics import RunDir

    rd = RunDir.reader(run_dir)
    events = [e for evs in rd.all_events().values() for e in evs]
    round0 = min(r["round0_t"] for r in rd.results().values())
    start = round0 + min(e.t - e.dt for e in events)
    end = round0 + max(e.t for e in events)
    return start, end, end - start


def protocol_s(run_dir: Path) -> tuple[float, float]:
    """Seconds of the paper's protocol outside a run's rounds: (warm-up training before
    round 0, final test evaluation), the slowest hosting process's, from its timeline."""
    from zmqgossip.metrics import RunDir

    timeline = RunDir.reader(run_dir).summary().get("timeline") or []
    warmup = max((t["warmed_up"] - t["built"] for t in timeline if "warmed_up" in t and "built" in t), default=0.0)
    final = max((t["evaluated"] - t["rounds_done"] for t in timeline if "evaluated" in t and "rounds_done" in t),
                default=0.0)
    return warmup, final


def cold_split(run_dir: Path, launched: float, exited: float) -> dict[str, float]:
    """Where a command's time went: launch to the first update (``start_s``), the rounds,
    the last update to exit (``end_s``); and of these, the paper's protocol: the warm-up
    training before round 0 and the final test evaluation (the slowest hosting process's,
    from the summary's timeline). ``launched``/``exited``: wall-clock times."""
    first, last, span = rounds_span(run_dir)
    warmup, final = protocol_s(run_dir)
    outside = (exited - launched) - span
    return {"wall_s": exited - launched, "start_s": first - launched, "rounds_s": span, "end_s": exited - last,
            "outside_s": outside, "warmup_s": warmup, "final_eval_s": final, "ours_s": outside - warmup - final}
