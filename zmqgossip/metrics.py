"""The run directory: config, per-peer JSONL events, per-peer results, summary.json.

Layout::

    RUN/config.json          resolved config, seed, package versions, git revision
    RUN/clusters.json        true cluster id per peer, and the clusters' names
    RUN/events/peer-7.jsonl  one JSON line per update of peer 7, appended and flushed
    RUN/peers/peer-7.json    peer 7's final result (written atomically at its end)
    RUN/pulls.json           pull-count matrix (rows: puller, columns: pulled)
    RUN/summary.json         the figures a user compares

Event lines are written with one unbuffered ``write`` on a file opened in append mode:
nothing waits in a buffer, a crash loses at most the line being written, and a reader
skips a torn last line. The files of the most recent writers stay open (at most
``RunDir.OPEN_EVENT_FILES``, so a thousand peers stay within descriptor limits); an
update is one ``write``, not an open, a write and a close.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"))


def dumps(obj: Any) -> str:
    return _ENCODER.encode(obj)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write then rename: a reader sees the old file or the new one, never half."""
    write_bytes_atomic(path, json.dumps(obj, default=_json_default, indent=1).encode(), durable=True)


def write_bytes_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """``data`` into ``path`` through a temporary file and a rename; ``durable``: synced
    to the disk before the rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_new_lines(path: str | Path, offset: int) -> bytes:
    """The complete lines of an appended file after ``offset`` (a torn last line waits
    for its end); b"" for none, or no file yet."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return b""
    return data[: data.rfind(b"\n") + 1]


def parse_events(lines: bytes, peer: int) -> list["Event"]:
    """The event lines among ``lines`` of peer ``peer``'s file (others are skipped)."""
    out = []
    for line in lines.splitlines():
        try:
            out.append(Event.from_dict(json.loads(line), peer))
        except (ValueError, TypeError):
            continue
    return out


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines of a JSONL file; a torn last line (crash) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def environment() -> dict[str, Any]:
    """Versions and git revision recorded beside every run."""
    import msgpack
    import torch
    import zmq

    from . import __version__

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "zmqgossip": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "numpy": np.__version__,
        "git_revision": rev,
        "host": platform.node(),
    }


@dataclass(slots=True)
class Event:
    """One update of one peer, as its event line records it.

    ``chosen``: the peers it asked; ``ok``: those whose model it used; ``failed``: peer
    id (as text) -> reason; ``loss``: the pulled models' losses on its training data
    (None for methods that do not score); ``mix``: aggregation weights, its own first;
    ``age_s`` / ``lag``: how old each used model was (seconds / steps behind the puller).
    """

    peer: int
    step: int
    t: float = 0.0
    dt: float = 0.0
    pull_s: float = 0.0
    chosen: list[int] = field(default_factory=list)
    ok: list[int] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    loss: list[float | None] | None = None
    mix: list[float] = field(default_factory=list)
    age_s: list[float | None] = field(default_factory=list)
    lag: list[int] = field(default_factory=list)
    bytes: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    test_acc: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in EVENT_FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], peer: int | None = None) -> "Event":
        """An event line read back (fields it lacks take their defaults; unknown keys are
        ignored, so newer lines still read)."""
        known = {k: d[k] for k in EVENT_FIELDS if k in d}
        known.setdefault("peer", -1 if peer is None else peer)
        known.setdefault("step", -1)
        return cls(**known)


EVENT_FIELDS = tuple(f.name for f in fields(Event))


class EventTail:
    """Reads the new complete lines of some peers' event files (progress of workers)."""

    def __init__(self, run: "RunDir", peers: Sequence[int]) -> None:
        self.run = run
        self.offsets = {p: 0 for p in peers}

    def poll(self, on_event: Callable[[Event], None]) -> None:
        for p, off in self.offsets.items():
            data = read_new_lines(self.run.events_path(p), off)
            self.offsets[p] = off + len(data)
            for e in parse_events(data, p):
                on_event(e)


@dataclass
class RunDir:
    """Paths of one run directory; creating it makes the folders."""

    root: Path
    create: bool = True  # make the folders (a writer); False reads a run as it is
    #: open event files (peer -> descriptor), least recently written first
    _open: OrderedDict[int, int] = field(default_factory=OrderedDict, init=False, repr=False, compare=False)
    _paths: dict[int, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    OPEN_EVENT_FILES = 64

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.create:
            self.events_dir.mkdir(parents=True, exist_ok=True)
            self.peers_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def reader(cls, root: str | Path) -> "RunDir":
        """A run directory to read (report, compare): nothing is created in it."""
        return cls(Path(root), create=False)

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the event files kept open (a later event opens its file again)."""
        fds = getattr(self, "_open", None)  # absent if __init__ failed
        while fds:
            os.close(fds.popitem()[1])

    @property
    def events_dir(self) -> Path:
        return self.root / "events"

    @property
    def peers_dir(self) -> Path:
        return self.root / "peers"

    def checkpoint_path(self, peer: int) -> Path:
        d = self.root / "checkpoints"
        d.mkdir(exist_ok=True)
        return d / f"peer-{peer}.ckpt"

    def events_path(self, peer: int) -> Path:
        return self.events_dir / f"peer-{peer}.jsonl"

    def result_path(self, peer: int) -> Path:
        return self.peers_dir / f"peer-{peer}.json"

    def append_event(self, peer: int, event: Event | Mapping[str, Any]) -> None:
        line = (dumps(event.as_dict() if isinstance(event, Event) else event) + "\n").encode()
        fd = self._open.get(peer)
        if fd is None:
            path = self._paths.get(peer)
            if path is None:
                path = self._paths[peer] = str(self.events_path(peer))
            if len(self._open) >= self.OPEN_EVENT_FILES:
                os.close(self._open.popitem(last=False)[1])
            # O_APPEND + one write: lines from concurrent writers never interleave.
            fd = self._open[peer] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        else:
            self._open.move_to_end(peer)
        os.write(fd, line)

    def events(self, peer: int) -> list[Event]:
        """A peer's events; after a resume, a re-run step's last line replaces earlier ones."""
        p = self.events_path(peer)
        if not p.exists():
            return []
        by_step: dict[int, Event] = {}
        for d in read_jsonl(p):
            try:
                e = Event.from_dict(d, peer)
            except TypeError:
                continue  # not an event line
            by_step.pop(e.step, None)  # keep the order of the last occurrence
            by_step[e.step] = e
        return list(by_step.values())

    def peer_ids(self) -> list[int]:
        """Peers of the run: from clusters.json, else those with an events file."""
        if (self.root / "clusters.json").is_file():
            return list(range(len(self.clusters()[0])))
        ids = []
        for p in self.events_dir.glob("peer-*.jsonl"):
            try:
                ids.append(int(p.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return sorted(ids)

    def all_events(self) -> dict[int, list[Event]]:
        """Every peer's events (re-run steps once), in peer-id order."""
        return {i: self.events(i) for i in self.peer_ids()}

    def write_result(self, peer: int, result: Mapping[str, Any]) -> None:
        write_json_atomic(self.result_path(peer), dict(result))

    def results(self) -> dict[int, dict]:
        """Each peer's result; a file that is unreadable (torn copy) is skipped."""
        out = {}
        for p in sorted(self.peers_dir.glob("peer-*.json")):
            try:
                with open(p) as f:
                    r = json.load(f)
                out[int(r["peer"])] = r
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json_atomic(self.root / "config.json", {**config, "environment": environment()})

    def config(self) -> dict:
        with open(self.root / "config.json") as f:
            return json.load(f)

    def write_clusters(self, clusters: Sequence[int], names: Sequence[str]) -> None:
        write_json_atomic(self.root / "clusters.json", {"clusters": list(clusters), "names": list(names)})

    def clusters(self) -> tuple[list[int], list[str]]:
        with open(self.root / "clusters.json") as f:
            d = json.load(f)
        return d["clusters"], d["names"]

    def pulls(self) -> dict | None:
        """pulls.json (the pull-count matrices summarize() wrote), if there is one."""
        p = self.root / "pulls.json"
        if not p.is_file():
            return None
        with open(p) as f:
            return json.load(f)

    def summary(self) -> dict:
        with open(self.root / "summary.json") as f:
            return json.load(f)


def pull_matrix(events: Mapping[int, Iterable[Event]], peers: int, *, min_step: int = 0) -> np.ndarray:
    """counts[i, j] = successful pulls of j's model by i (at steps >= min_step)."""
    m = np.zeros((peers, peers), dtype=np.int64)
    for i, evs in events.items():
        for e in evs:
            if e.step >= min_step:
                for j in e.ok:
                    if 0 <= j < peers:
                        m[i, j] += 1
    return m


def within_fraction(m: np.ndarray, clusters: Sequence[int], rows: Iterable[int] | None = None) -> float | None:
    """Share of pulls that stayed inside the puller's true cluster."""
    c = np.asarray(clusters)
    same = c[:, None] == c[None, :]
    idx = np.arange(len(c)) if rows is None else np.fromiter(rows, dtype=np.int64)
    total = m[idx].sum()
    return float((m[idx] * same[idx]).sum() / total) if total else None


def _cluster_means(values: Mapping[int, float | None], clusters: Sequence[int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c in sorted(set(clusters)):
        vals = [values[i] for i in range(len(clusters)) if clusters[i] == c and values.get(i) is not None]
        out[str(c)] = float(np.mean(vals)) if vals else None
    return out


def _mean(vals: Iterable[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def summarize(
    run: RunDir, *, wall_s: float | None = None, started: float | None = None, extra: Mapping[str, Any] | None = None,
) -> dict:
    """Build summary.json (and pulls.json) from what the peers wrote.

    Works on a partial run: peers without a result count as failed, and their events
    still count for pulls. ``started``: when hosting began (wall clock), the origin of
    the summary's timeline.
    """
    cfg = run.config()
    clusters, names = run.clusters()
    n = len(clusters)
    results = run.results()
    events = {i: run.events(i) for i in range(n)}
    rounds = int(cfg.get("rounds") or 0)
    tail = tail_from(rounds, events)
    m_all = pull_matrix(events, n)
    m_tail = pull_matrix(events, n, min_step=tail)
    write_json_atomic(run.root / "pulls.json", {"counts": m_all.tolist(), "tail_counts": m_tail.tolist(), "tail_from_step": tail})
    best = {i: r.get("test_acc") for i, r in results.items()}
    final = {i: r.get("final_test_acc") for i, r in results.items()}
    counters = [r.get("counters", {}) for r in results.values()]
    failed_peers = sorted(set(range(n)) - {i for i, r in results.items() if r.get("status") == "done"})
    per_cluster_within = {}
    for c in sorted(set(clusters)):
        rows = [i for i in range(n) if clusters[i] == c]
        per_cluster_within[str(c)] = {"all": within_fraction(m_all, clusters, rows), "last_20pct": within_fraction(m_tail, clusters, rows)}
    summary = {
        "name": cfg.get("name"),
        "method": cfg.get("method"),
        "schedule": cfg.get("schedule"),
        "peers": n,
        "rounds": rounds,
        "seed": cfg.get("seed"),
        "clusters": {str(c): {"name": names[c], "peers": clusters.count(c)} for c in sorted(set(clusters))},
        "test_acc": {"mean": _mean(best.values()), "per_cluster": _cluster_means(best, clusters)},
        "final_test_acc": {"mean": _mean(final.values()), "per_cluster": _cluster_means(final, clusters)},
        "within_cluster_pull_fraction": {
            "all": within_fraction(m_all, clusters),
            "last_20pct": within_fraction(m_tail, clusters),
            "per_cluster": per_cluster_within,
        },
        "peer_rounds": sum(len(evs) for evs in events.values()),
        "wall_s": wall_s,
        "pulls_ok": sum(c.get("pulls_ok", 0) for c in counters),
        "pulls_failed": sum(c.get("pulls_failed", 0) for c in counters),
        "bytes_sent": sum(c.get("bytes_out", 0) for c in counters),
        "bytes_received": sum(c.get("bytes_in", 0) for c in counters),
        "failed_peers": failed_peers,
        "resumed": {str(i): r["resumed_from"] for i, r in sorted(results.items()) if r.get("resumed_from") is not None},
        "staleness": _staleness(events),
        "links": _link_stats(run.root),
        "scenario": _scenario_log(run.root),
        "timeline": _timeline(run.root, started),
    }
    if extra:
        summary.update(extra)
    write_json_atomic(run.root / "summary.json", summary)
    return summary


def tail_from(rounds: int, events: Mapping[int, Iterable[Event]]) -> int:
    """First step of the last 20% of the run (of its rounds, else of the steps logged)."""
    horizon = rounds or max((e.step for evs in events.values() for e in evs), default=-1) + 1
    return int(np.floor(0.8 * horizon))


def _staleness(events: Mapping[int, Iterable[Event]]) -> dict[str, float | None]:
    ages = [a for evs in events.values() for e in evs for a in e.age_s if a is not None]
    lags = [a for evs in events.values() for e in evs for a in e.lag if a is not None]
    q = lambda v, p: float(np.percentile(v, p)) if v else None  # noqa: E731
    return {"age_s_p50": q(ages, 50), "age_s_p99": q(ages, 99), "lag_p50": q(lags, 50), "lag_p99": q(lags, 99)}


def _timeline(root: Path, started: float | None) -> list[dict[str, float]] | None:
    """Per hosting process, when each phase ended, in seconds since ``started`` (the
    hosting's start): peers built, warmed up, every peer ready (round 0), rounds done,
    final evaluation done, every remote peer done, sockets closed."""
    out = []
    for p in sorted(root.glob("timeline-*.json"), key=lambda q: int(q.stem.rsplit("-", 1)[1])):
        try:
            with open(p) as f:
                marks = json.load(f)
        except (OSError, ValueError):
            continue
        base = started if started is not None else marks.get("host", 0.0)
        out.append({k: round(v - base, 3) for k, v in marks.items()})
    return out or None


def _scenario_log(root: Path) -> list[dict] | None:
    """The scenario events as applied (each process logs those it applied to its peers),
    in order of when they took effect."""
    entries = []
    for p in sorted(root.glob("scenario-*.json")):
        with open(p) as f:
            entries.extend(json.load(f))
    return sorted(entries, key=lambda e: e["applied_s"]) if entries else None


def _link_stats(root: Path) -> dict[str, Any] | None:
    """The link emulators' statistics, summed over the processes that wrote them.

    Quantiles cannot be merged exactly: the p50/p99 given are the largest of the
    processes' own, an upper bound."""
    parts = []
    for p in sorted(root.glob("links-*.json")):
        with open(p) as f:
            parts.append(json.load(f))
    if not parts:
        return None
    out: dict[str, Any] = {k: sum(x.get(k, 0) for x in parts) for k in ("messages", "delivered", "dropped", "partitioned", "duplicated")}
    delivered = [(x.get("delivered", 0), x.get("delay_mean_ms")) for x in parts if x.get("delay_mean_ms") is not None]
    total = sum(n for n, _ in delivered)
    out["delay_mean_ms"] = sum(n * m for n, m in delivered) / total if total else None
    for q in ("delay_p50_ms", "delay_p90_ms", "delay_p99_ms"):
        vals = [x[q] for x in parts if x.get(q) is not None]
        out[q] = max(vals) if vals else None
    return out
