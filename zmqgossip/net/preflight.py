"""Preflight: the sockets and descriptors a process's peers need, checked before launch."""

from __future__ import annotations

import resource
from dataclasses import dataclass

import zmq

from .config import TransportError


@dataclass(frozen=True)
class Budget:
    """What N peers in this process are expected to use."""

    peers: int
    sockets: int
    fds: int


def socket_budget(peers: int, pool_size: int, transport: str, secure: bool = False) -> Budget:
    """Sockets and file descriptors for ``peers`` peers hosted by one process.

    Each ZeroMQ socket holds one descriptor (its mailbox); each ipc/tcp connection holds
    one at each end, and both ends live here when the peers share the process; each
    ipc/tcp inbox also holds the descriptor it listens on. A socket the LRU closes keeps
    its slot and descriptor until ZeroMQ's reaper thread frees them, and under load the
    reaper falls behind by many sockets (peers that pull uniformly at random close a
    socket on most pulls): half a pool per peer is kept free for them. With CURVE (``secure``) each inbox has a monitor (two sockets) and the
    process one ZAP handler.
    """
    reaping = peers * max(1, pool_size // 2)
    sockets = peers * (2 + pool_size) + reaping + (peers * 2 + 1 if secure else 0)
    # ipc/tcp: each bound inbox also holds its listening descriptor.
    conns = 0 if transport == "inproc" else peers * (pool_size * 2 + 1)
    return Budget(peers, sockets, sockets + conns + 64)


def preflight(ctx: zmq.Context, peers: int, pool_size: int, transport: str, secure: bool = False) -> Budget:
    """Raise the socket and descriptor limits as far as allowed, or fail with what to do.

    Call before the context creates its first socket (ZeroMQ fixes MAX_SOCKETS then).
    """
    need = socket_budget(peers, pool_size, transport, secure)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need.fds > soft:
        target = need.fds if hard == resource.RLIM_INFINITY else min(need.fds, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need.fds > soft:
        raise TransportError(
            f"{peers} peers with pool_size={pool_size} over {transport} need about {need.fds} file "
            f"descriptors, but this process may open only {soft} (hard limit {hard}). Raise it "
            f"(e.g. `ulimit -n {need.fds}` as root, or LimitNOFILE for a service), spread the "
            f"peers over more processes, or lower pool_size."
        )
    try:
        if ctx.get(zmq.MAX_SOCKETS) < need.sockets + 16:
            ctx.set(zmq.MAX_SOCKETS, need.sockets + 16)
    except zmq.ZMQError as e:
        raise TransportError(f"cannot raise ZeroMQ MAX_SOCKETS to {need.sockets + 16}: {e}") from None
    limit = ctx.get(zmq.SOCKET_LIMIT)
    if need.sockets + 16 > limit:
        raise TransportError(
            f"{peers} peers need {need.sockets} ZeroMQ sockets; this libzmq allows {limit} per context. "
            f"Spread the peers over more processes or lower pool_size."
        )
    return need


def check_fits(peers: int, pool_size: int, transport: str, secure: bool = False) -> Budget:
    """:func:`preflight` on a throwaway context: in a parent before it starts workers, it
    raises the descriptor limit they inherit, or fails with what to raise."""
    ctx = zmq.Context()
    try:
        return preflight(ctx, peers, pool_size, transport, secure)
    finally:
        ctx.term()
