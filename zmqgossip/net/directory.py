"""Endpoints: where each peer's inbox is (the directory), for one machine."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterable

from .config import TransportError

IPC_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


def ipc_dir(prefix: str = "zg") -> str:
    """A fresh short directory for ipc sockets.

    ipc paths must fit in 107 bytes, and a long TMPDIR (macOS, CI runners) breaks that,
    so fall back to /tmp when the default temp dir is too long.
    """
    base = tempfile.gettempdir()
    if len(base) > 40 and os.path.isdir("/tmp"):
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)


_INPROC_SEQ = itertools.count()  # inproc names must differ between directories of one process


def make_directory(kind: str, peers: Iterable[int], *, base: str | None = None, host: str = "127.0.0.1",
                   port0: int = 0) -> dict[int, str]:
    """Endpoints for peers on one machine: ``inproc``, ``ipc`` (under ``base``) or ``tcp``.

    For tcp, ``port0`` > 0 assigns consecutive ports; ``port0`` = 0 asks for free ports.
    """
    peers = list(peers)
    if kind == "inproc":
        tag = base or f"{os.getpid()}-{next(_INPROC_SEQ)}"
        return {p: f"inproc://zg-{tag}-{p}" for p in peers}
    if kind == "ipc":
        base = base or ipc_dir()
        out = {p: f"ipc://{base}/{p}" for p in peers}
        longest = max((len(e) - len("ipc://") for e in out.values()), default=0)
        if longest > IPC_PATH_MAX:
            raise TransportError(f"ipc path of {longest} bytes exceeds {IPC_PATH_MAX}: use a shorter base directory than {base!r}")
        return out
    if kind == "tcp":
        ports = [port0 + i for i in range(len(peers))] if port0 else free_tcp_ports(len(peers), host)
        return {p: f"tcp://{host}:{port}" for p, port in zip(peers, ports)}
    raise TransportError(f"unknown transport {kind!r}: use inproc, ipc or tcp")


def free_tcp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ask the OS for ``n`` distinct free ports (held open together, then released)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


