"""A worker's run directory, copied to the driver's as it grows: no shared filesystem.

A worker on another machine writes its peers' event lines, results, checkpoints and
link/scenario logs into a staging directory of its own; :class:`Mirror` collects what
changed since it last looked, and :func:`apply_changes` writes it into the driver's run
directory. Event files only grow, so only their new complete lines travel; every other
file is written whole (atomically, by the peers) and travels whole when it changed.
What the driver holds is therefore what ``report``, ``compare`` and ``--resume`` need,
up to the last collection before a worker died.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..metrics import read_new_lines, write_bytes_atomic

#: Folders of a run directory whose files a worker writes (relative to its root), and
#: the top-level files it writes (``links-N.json``, ``scenario-N.json``).
WORKER_DIRS = ("events", "peers", "checkpoints")
APPENDED = "events"  # files under it only grow: new complete lines travel


@dataclass(frozen=True)
class Change:
    """New bytes of one file: appended lines (``append``) or the whole file."""

    path: str  # relative to the run directory, with "/" separators
    data: bytes
    append: bool

    def as_tuple(self) -> tuple[str, bytes, bool]:
        return self.path, self.data, self.append


@dataclass
class Mirror:
    """Collects the changes of a staging run directory since the last collection."""

    root: Path
    _offsets: dict[str, int] = field(default_factory=dict, init=False)  # appended files: bytes sent
    _stamps: dict[str, tuple[int, int]] = field(default_factory=dict, init=False)  # whole files: (size, mtime_ns)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def _files(self) -> Iterable[tuple[str, os.DirEntry]]:
        for d in WORKER_DIRS:
            try:
                with os.scandir(self.root / d) as it:
                    for e in it:
                        if e.is_file() and not e.name.startswith("."):  # ".x.tmp": a write in progress
                            yield f"{d}/{e.name}", e
            except FileNotFoundError:
                continue
        with os.scandir(self.root) as it:
            for e in it:
                if e.is_file() and e.name.endswith(".json") and e.name.startswith(("links-", "scenario-")):
                    yield e.name, e

    def changes(self, *, limit_bytes: int = 64 << 20) -> list[Change]:
        """What changed since the last call (at most about ``limit_bytes``; the rest comes
        with the next call)."""
        out: list[Change] = []
        size = 0
        for rel, entry in self._files():
            if size >= limit_bytes:
                break
            if rel.startswith(APPENDED + "/"):
                off = self._offsets.get(rel, 0)
                data = read_new_lines(entry.path, off)
                if data:
                    out.append(Change(rel, data, True))
                    self._offsets[rel] = off + len(data)
                    size += len(data)
                continue
            st = entry.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            if self._stamps.get(rel) == stamp:
                continue
            try:
                data = Path(entry.path).read_bytes()
            except FileNotFoundError:
                continue  # replaced between the listing and the read: the next call takes it
            out.append(Change(rel, data, False))
            self._stamps[rel] = stamp
            size += len(data)
        return out


def apply_changes(root: Path, changes: Sequence[Change | tuple[str, bytes, bool]]) -> list[Change]:
    """Write ``changes`` into the run directory ``root``; return them as :class:`Change`.

    A path that would leave ``root`` is refused (a worker names files, the driver writes).
    """
    root = Path(root)
    done = []
    for c in changes:
        ch = c if isinstance(c, Change) else Change(*c)
        rel = Path(ch.path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"a worker sent a file outside the run directory: {ch.path!r}")
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if ch.append:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, ch.data)
            finally:
                os.close(fd)
        else:
            write_bytes_atomic(path, ch.data)
        done.append(ch)
    return done


def seed_files(root: Path, peers: Sequence[int]) -> list[Change]:
    """What a worker needs from the driver's run directory to resume ``peers``: the run's
    config and clusters, and each peer's checkpoint and result where there is one."""
    root = Path(root)
    names = ["config.json", "clusters.json"]
    for p in peers:
        names += [f"checkpoints/peer-{p}.ckpt", f"peers/peer-{p}.json"]
    return [Change(n, (root / n).read_bytes(), False) for n in names if (root / n).is_file()]
