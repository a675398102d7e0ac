"""Nothing outlives a test: no child process, no ipc socket file, no listening port.

A pytest plugin (listed in conftest's ``pytest_plugins``). The ipc files of the whole
session go to one short temporary folder of its own (so other sessions on the machine
do not count), and each test is checked after it ends. A test that leaves something
behind fails with what it left; the leftovers are then cleaned up so the next test
starts clean.
"""

from __future__ import annotations

import multiprocessing.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import reap_children


def _listening_ports() -> set[int]:
    """TCP ports this process listens on (its socket inodes matched in /proc/net/tcp*)."""
    inodes = set()
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


_SESSION_TMP: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Before anything makes a temp file: this session's own short temp folder (children
    inherit TMPDIR), so only this session's ipc sockets are in it."""
    # multiprocessing's own folder (the forkserver's socket) stays outside it: multiprocessing
    # removes that folder at exit, after this session's folder is gone.
    multiprocessing.util.get_temp_dir()
    d = tempfile.mkdtemp(prefix="zgt", dir="/tmp" if os.path.isdir("/tmp") else None)
    _SESSION_TMP.update(dir=d, env=os.environ.get("TMPDIR"), cache=tempfile.tempdir)
    os.environ["TMPDIR"] = d
    tempfile.tempdir = d


def pytest_unconfigure(config: pytest.Config) -> None:
    d = _SESSION_TMP.get("dir")
    if d is None:
        return
    tempfile.tempdir = _SESSION_TMP["cache"]
    if _SESSION_TMP["env"] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = _SESSION_TMP["env"]
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return Path(_SESSION_TMP["dir"] or tempfile.gettempdir())


def _ipc_leftovers(root: Path) -> list[str]:
    out = []
    for d in root.glob("zg*"):
        if d.is_dir():
            out += [str(p) for p in d.iterdir() if p.is_socket()] or [str(d)]
    return sorted(out)


@pytest.fixture(autouse=True)
def nothing_left_behind(session_tmp):
    ports_before = _listening_ports()
    yield
    children = reap_children()
    ipc = _ipc_leftovers(session_tmp)
    ports = sorted(_listening_ports() - ports_before)
    for d in session_tmp.glob("zg*"):
        shutil.rmtree(d, ignore_errors=True)
    problems = []
    if children:
        problems.append(f"child processes still running: {children}")
    if ipc:
        problems.append(f"ipc files left: {ipc[:5]}{' ...' if len(ipc) > 5 else ''}")
    if ports:
        problems.append(f"tcp ports still listening: {ports}")
    if problems:
        pytest.fail("the test left things behind: " + "; ".join(problems))
