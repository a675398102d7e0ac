"""Peer checkpoints on disk, in the wire format: nothing is ever pickled or unpickled.

A checkpoint file is::

    b"ZGCK1\\n"
    u64 length + JSON document        (step, policy scores, RNG states, counters, ...)
    u32 frame count, then u64 length + bytes per frame   (a wire model message of the tensors)

The tensors travel exactly as a model reply does, so loading reuses :func:`wire.decode`
and its validation (dtypes, shapes, sizes, finite values).  Files are written to a
temporary name and renamed: a process that dies mid-write leaves the previous checkpoint
intact, and a reader sees a whole file or the old one.

Only a ``durable`` save is flushed to the disk (fsync) before the rename. A peer's periodic
checkpoints are not: they are there for a peer process that dies (``kill -9``, a crashed
worker), and the kernel keeps what a dead process wrote. Syncing each one would add a
disk flush to every save, I/O wait during which the compute thread stands still (saves
are frequent and small). After an OS crash or power loss the newest periodic checkpoint can be missing
or torn; loading a torn one fails with a :class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import wire

MAGIC = b"ZGCK1\n"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back."""


def save_checkpoint(
    path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *, durable: bool = False
) -> None:
    """Write a checkpoint atomically (temporary file, rename); ``durable``: fsync it first."""
    path = Path(path)
    frames = wire.ModelPayload.build(tensors, step=int(meta.get("step", 0)), version=0, n_samples=0).reply(0, 0)
    doc = json.dumps(meta, separators=(",", ":")).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", len(doc)))
        f.write(doc)
        f.write(struct.pack("<I", len(frames)))
        for fr in frames:
            mv = memoryview(fr).cast("B")
            f.write(struct.pack("<Q", mv.nbytes))
            f.write(mv)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (own memory, writable) and the JSON document of a checkpoint file."""
    path = Path(path)
    try:
        data = memoryview(bytearray(path.read_bytes()))
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    try:
        if bytes(data[: len(MAGIC)]) != MAGIC:
            raise CheckpointError(f"{path} is not a zmqgossip checkpoint")
        pos = len(MAGIC)
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        meta = json.loads(bytes(data[pos : pos + n]))
        pos += n
        (count,) = struct.unpack_from("<I", data, pos)
        pos += 4
        frames = []
        for _ in range(count):
            (m,) = struct.unpack_from("<Q", data, pos)
            pos += 8
            if pos + m > len(data):
                raise CheckpointError(f"{path} is truncated")
            frames.append(data[pos : pos + m])
            pos += m
        msg = wire.decode(frames, limits=wire.Limits(max_bytes=2**40, check_finite=False))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__})") from None
    except wire.WireError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return msg.tensors, meta
