"""Sending and receiving whole multipart messages on raw ZeroMQ sockets, without waiting."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import zmq

from .. import wire

# Plain ints: with pyzmq's flag enums every `&` and `|` builds an enum member, a cost that
# shows in a pull's profile.
EVENTS, POLLIN, POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
DONTWAIT, SNDMORE = int(zmq.DONTWAIT), int(zmq.SNDMORE)


def send_now(sock: zmq.Socket, frames: list, copy: bool = True) -> None:
    """Send a multipart message without waiting (``zmq.Again`` if the queue is full).

    Once the first frame is queued ZeroMQ takes the rest of the message atomically.
    """
    last = len(frames) - 1
    for i, f in enumerate(frames):
        sock.send(f, DONTWAIT | SNDMORE if i < last else DONTWAIT, copy=copy)


def recv_now(sock: zmq.Socket) -> list:
    """Receive a whole multipart message without waiting, as zero-copy frames."""
    part = sock.recv(DONTWAIT, copy=False)
    parts = [part]
    while part.more:  # the frame's own flag: no socket option lookup per frame
        part = sock.recv(DONTWAIT, copy=False)
        parts.append(part)
    return parts


def prepared_frames(frames: Iterable[Any]) -> tuple[zmq.Frame, ...]:
    """ZeroMQ messages made once, for frames sent many times (a published snapshot).

    Every send then shares them by reference count. Sending the buffers themselves makes
    a message per frame per send, and frees each zero-copy one through pyzmq's collector
    thread (a GIL hand-off per frame per reply). Small frames are copied once here; large
    ones are shared with their buffer, which must not change while they exist.
    """
    return tuple(zmq.Frame(f, copy=memoryview(f).nbytes < wire.ZERO_COPY_THRESHOLD) for f in frames)
