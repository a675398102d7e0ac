"""Helpers shared by the test modules (not a test module itself)."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from zmqgossip.net import Transport


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(d: dict[str, Any]) -> str:
    """Top-level keys, then one ``[table]`` per dict value, then ``[[array]]`` tables."""
    def is_tables(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and isinstance(v[0], dict)

    lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and not is_tables(v)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    for k, v in d.items():
        if is_tables(v):
            for item in v:
                lines += ["", f"[[{k}]]"] + [f"{kk} = {toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def zmqgossip_cmd() -> list[str]:
    """The installed console script when there is one, else the app through this Python."""
    script = Path(sys.executable).parent / "zmqgossip"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("zmqgossip")
    if found:
        return [found]
    return [sys.executable, "-c", "from zmqgossip.cli import app; app()"]


# Data files in the real formats (tests write them; nothing is downloaded).


def idx_bytes(arr: np.ndarray) -> bytes:
    head = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int, n_test: int, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def cifar_batch(n: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing",
        b"labels": [int(v) for v in np.arange(n) % 10],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }


def write_cifar(folder: Path, n: int = 20, protocol: int = 2) -> dict[str, dict[bytes, object]]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(n, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n, 9)
    for name, obj in batches.items():
        raw = pickle.dumps(obj, protocol=protocol)
        # What the real (numpy 1.x era) files name; numpy 2 writes numpy._core.
        raw = raw.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")
        (folder / name).write_bytes(raw)
    return batches


def default_sigint() -> None:
    """For ``preexec_fn``: a child that is sent SIGINT must not inherit an ignored SIGINT
    (a test runner started in the background has it ignored, and exec keeps that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def with_overrides(raw: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with ``over`` applied: a dict value updates that table, anything else replaces."""
    out = dict(raw)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_experiment(**over: Any) -> dict[str, Any]:
    """A seconds-long async experiment (12 peers, digits, MLP) as a plain dict for TOML."""
    raw: dict[str, Any] = {
        "name": "tiny", "method": "dac-var", "schedule": "async", "peers": 12, "rounds": 4, "seed": 0,
        "data": {"dataset": "digits", "shift": "label", "n_train": 40, "n_val": 20, "test_per_class": 30},
        "train": {"model": "mlp", "epochs": 1, "lr": 3e-3, "test_every": 2},
        "policy": {"n": 3},
    }
    return with_overrides(raw, over)


# Transports over real sockets (a test's event loop and ZeroMQ context).


async def started(ctx: Any, directory: Mapping[int, str], ids: Iterable[int], **kw: Any) -> dict[int, Transport]:
    """A started (bound) ``Transport`` per id of ``directory``; ``kw`` go to each one
    (``config``, ``links``, ``expect``, ...)."""
    ts = {p: Transport(ctx, p, directory, **kw) for p in ids}
    for t in ts.values():
        await t.start()
    return ts


async def close_all(ts: Mapping[int, Transport] | Iterable[Transport]) -> None:
    """Close every transport (a dict of them, as ``started`` returns, or any iterable)."""
    for t in ts.values() if isinstance(ts, Mapping) else ts:
        await t.close()


def children(pid: int) -> list[int]:
    """Child pids of ``pid`` (from /proc/PID/task/*/children; no psutil)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(set(out))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pids(parent: int) -> list[int]:
    """The worker processes a ``zmqgossip run`` process started: forked by its forkserver
    (zmqgossip.warm), or spawned directly; never multiprocessing's resource tracker."""
    out: list[int] = []
    for c in children(parent):
        cmd = cmdline(c)
        if "multiprocessing.forkserver" in cmd:
            out += children(c)
        elif ("spawn_main" in cmd or "multiprocessing-fork" in cmd) and "resource_tracker" not in cmd:
            out.append(c)
    return sorted(out)
