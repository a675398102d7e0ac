"""The wire format: msgpack headers plus one raw frame per tensor.

A message is a list of ZeroMQ frames::

    [head, body, tensor_0, tensor_1, ...]

``head`` is a tiny msgpack array ``[schema_version, kind, sender, request_id]`` built for
every message.  ``body`` is a msgpack map whose content depends on the kind; for a model
reply it carries the step, model version, number of training samples, the sender's score
row (for DAC's two-hop rule) and the tensor table ``[name, dtype, shape, nbytes]``.  The
body and the tensor frames of a published model are encoded once (:class:`ModelPayload`)
and every request for that version is answered with the same cached frames plus a fresh
head; that split is why the request id lives in ``head`` and not in ``body``.

:func:`decode` checks everything it is given and raises :class:`WireError`, never any
other exception.  Tensors are decoded without copying (``numpy.frombuffer`` on the
received frame, then ``torch.from_numpy``).  Nothing is ever unpickled.
"""

from __future__ import annotations

import enum
import functools
import math
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack
import numpy as np
import torch
import zmq

SCHEMA_VERSION = 1

#: Frames at or above this size are sent without copying (pyzmq's copy threshold).
ZERO_COPY_THRESHOLD = 64 * 1024


class Kind(enum.IntEnum):
    """Message kinds. Numbers are part of the wire format: never reuse one."""

    PULL_REQUEST = 1
    MODEL_REPLY = 2
    ERROR_REPLY = 3
    PING = 4
    PONG = 5
    PAYLOAD_REPLY = 6  # stress traffic: tensors without model semantics


# The allow-list: wire name -> (torch dtype, numpy dtype used to view the bytes).
# bfloat16 has no numpy type: its bytes are viewed as uint16 and reinterpreted by torch.
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float64": (torch.float64, np.dtype("<f8")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),
    "int64": (torch.int64, np.dtype("<i8")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "bool": (torch.bool, np.dtype("?")),
}
_TORCH_TO_WIRE = {tdt: name for name, (tdt, _) in DTYPES.items()}
_FLOAT_DTYPES = {"float32", "float64", "float16", "bfloat16"}
_KINDS = {k.value: k for k in Kind}
# Frames whose len() is their size in bytes (a memoryview's counts items of its format).
_SIZED = (bytes, bytearray, zmq.Frame)

Frame = Union[bytes, bytearray, memoryview, Any]  # Any: zmq.Frame (buffer protocol)


class Schema(dict[str, tuple[str, tuple[int, ...]]]):
    """What a receiver expects of a model: tensor name -> (wire dtype, shape), in order.

    It also knows the exact tensor table a matching sender writes, so that decoding the
    common message (the same model as ours) compares one list instead of validating each
    entry; any other table takes the full, entry-by-entry validation.
    """

    @functools.cached_property
    def entries(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        return [(k, wd, tuple(shape), math.prod(shape) * DTYPES[wd][1].itemsize) for k, (wd, shape) in self.items()]

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(e[3] for e in self.entries)

    @functools.cached_property
    def wire_table(self) -> list[list[Any]]:
        return [[k, wd, list(shape), nb] for k, wd, shape, nb in self.entries]


class WireError(Exception):
    """A message that cannot be accepted.

    ``reason`` is a short machine-readable code (used as a counter key), ``detail`` a
    sentence for people.
    """

    REASONS = (
        "garbage",  # not msgpack / not the expected structure
        "frames",  # wrong number of frames (truncated or extra)
        "version",  # unknown schema version
        "kind",  # unknown or unexpected message kind
        "field",  # missing or ill-typed header field
        "dtype",  # dtype outside the allow-list
        "shape",  # shape inconsistent with byte length, or malformed
        "too_large",  # declared or actual size over the bound
        "schema",  # names / shapes / dtypes differ from the receiver's model
        "nonfinite",  # NaN or Inf in a model
        "magnitude",  # a value above the configured absolute bound
        "sender",  # sender id differs from the peer that was asked
    )

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Bounds that :func:`decode` enforces; the defaults suit models up to ~256 MB."""

    max_bytes: int = 256 * 1024 * 1024  # total tensor bytes in one message
    max_tensors: int = 4096
    max_header_bytes: int = 4 * 1024 * 1024  # body frame (score rows of many peers)
    max_ndim: int = 8
    max_abs: float | None = None  # refuse model values with |x| above this
    check_finite: bool = True


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message. ``tensors`` share memory with the received frames."""

    kind: Kind
    sender: int
    request_id: int
    step: int = 0
    version: int = 0
    n_samples: int = 0
    scores: dict[int, float] | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    reason: str | None = None  # error replies: the refusal code
    detail: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0  # bytes on the wire, all frames


def schema_of(state: Mapping[str, torch.Tensor]) -> Schema:
    """The receiver-side expectation for a model's tensors: name -> (dtype, shape)."""
    return Schema((k, (_wire_dtype(v), tuple(v.shape))) for k, v in state.items())


def _wire_dtype(t: torch.Tensor) -> str:
    try:
        return _TORCH_TO_WIRE[t.dtype]
    except KeyError:
        raise WireError("dtype", f"tensor dtype {t.dtype} is not in the allow-list") from None


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _head(kind: Kind, sender: int, request_id: int) -> bytes:
    return _pack([SCHEMA_VERSION, int(kind), int(sender), int(request_id)])


def _scores_field(scores: Mapping[int, float] | None) -> list | None:
    if scores is None:
        return None
    # Two parallel arrays pack smaller and decode faster than a map of 1,000 entries.
    ids = [int(k) for k in scores]
    return [ids, [float(scores[k]) for k in ids]]


class SnapshotMemory:
    """Reusable memory for one publisher's model snapshots.

    A publisher snapshots its model every round. Fresh memory for each snapshot costs the
    kernel's page faults on every large model (a 10 MB model: ~0.3 ms of faults on top of
    the copy), so the snapshots of one publisher take turns in a few buffers instead.  A
    buffer is reused only when nothing refers to it any more: no payload, no frame that
    ZeroMQ still sends, no tensor that a receiver in the same process decoded from it
    (an inproc receive shares the sender's memory).  Python's reference count says
    exactly that, so a snapshot is never overwritten while anyone can still read it.
    """

    ALIGN = 64  # every tensor starts on a cache line

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A writable byte buffer of exactly ``nbytes``, cache-line aligned, that nothing
        else refers to."""
        with self._lock:
            for i in range(len(self._buffers)):
                # The list holds the allocation; every view of it (the buffer handed out,
                # the frames, decoded tensors) refers to it too, since numpy views point at
                # the array that owns the memory. getrefcount adds one for its argument.
                if self._buffers[i].nbytes == nbytes + self.ALIGN and sys.getrefcount(self._buffers[i]) == 2:
                    self.reused += 1
                    return self._aligned(self._buffers[i], nbytes)
            base = np.empty(nbytes + self.ALIGN, dtype=np.uint8)
            self.allocated += 1
            if len(self._buffers) >= self.keep:
                # Drop the list's hold on one buffer (its users keep it alive until done).
                self._buffers.pop(0)
            self._buffers.append(base)
            return self._aligned(base, nbytes)

    def _aligned(self, base: np.ndarray, nbytes: int) -> np.ndarray:
        skip = -base.__array_interface__["data"][0] % self.ALIGN  # (.ctypes would make a cycle)
        return base[skip : skip + nbytes]


def _layout(state: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, str, torch.Tensor, int, int]], int]:
    """Each tensor's wire dtype, byte offset and length in one snapshot buffer."""
    out = []
    offset = 0
    for name, t in state.items():
        wd = _wire_dtype(t)
        t = t.detach()
        nb = t.numel() * t.element_size()
        out.append((name, wd, t, offset, nb))
        offset += -(-nb // SnapshotMemory.ALIGN) * SnapshotMemory.ALIGN
    return out, offset


@dataclass(frozen=True)
class ModelPayload:
    """A model snapshot encoded once: the body frame and the tensor frames.

    The tensors are private copies (a snapshot), so training can go on changing the live
    model while any number of replies send these bytes.
    """

    frames: tuple[Frame, ...]
    version: int
    nbytes: int

    @classmethod
    def build(
        cls,
        state: Mapping[str, torch.Tensor],
        *,
        step: int,
        version: int,
        n_samples: int,
        scores: Mapping[int, float] | None = None,
        meta: Mapping[str, Any] | None = None,
        copy: bool = True,
        memory: SnapshotMemory | None = None,
    ) -> "ModelPayload":
        """Snapshot ``state`` (one copy, into ``memory`` when given) and encode it.

        ``copy=False`` sends the tensors' own memory: only for tensors nobody changes.
        """
        table = []
        buffers: list[Frame] = []
        layout, size = _layout(state)
        if copy:
            arena = memory.take(size) if memory is not None else np.empty(size, dtype=np.uint8)
        for name, wd, t, offset, nb in layout:
            if copy:
                # One copy into the snapshot buffer, none after it. numpy's copy is a
                # plain memcpy for contiguous tensors (torch's copy_ is slower here).
                dst = arena[offset : offset + nb]
                if nb:
                    if t.device.type == "cpu" and wd != "bfloat16":
                        np.copyto(dst.view(DTYPES[wd][1]).reshape(t.shape), t.numpy(), casting="no")
                    else:
                        torch.from_numpy(dst).view(t.dtype).view(t.shape).copy_(t)
                buffers.append(memoryview(dst))
            else:
                if t.device.type != "cpu":
                    t = t.cpu()
                t = t.contiguous()
                view = t.view(torch.uint16) if wd == "bfloat16" else t
                buffers.append(memoryview(view.numpy().reshape(-1)).cast("B"))
            table.append([name, wd, list(t.shape), nb])
        body = {
            "step": int(step),
            "version": int(version),
            "n": int(n_samples),
            "scores": _scores_field(scores),
            "tensors": table,
        }
        if meta:
            body["meta"] = dict(meta)
        body_bytes = _pack(body)
        total = sum(e[3] for e in table)
        return cls((body_bytes, *buffers), int(version), total + len(body_bytes))

    def reply(self, sender: int, request_id: int, kind: Kind = Kind.MODEL_REPLY) -> list[Frame]:
        """The frames answering one request: a fresh head and the cached rest."""
        return [reply_head(sender, request_id, kind), *self.frames]


def reply_head(sender: int, request_id: int, kind: Kind = Kind.MODEL_REPLY) -> bytes:
    """The head frame of a reply; the rest of a model reply is its payload's cached frames."""
    return _head(kind, sender, request_id)


def encode_model(
    state: Mapping[str, torch.Tensor],
    *,
    sender: int,
    request_id: int = 0,
    step: int = 0,
    version: int = 0,
    n_samples: int = 0,
    scores: Mapping[int, float] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> list[Frame]:
    """Encode one model reply (snapshot + frames). Publishing uses :class:`ModelPayload`."""
    payload = ModelPayload.build(
        state, step=step, version=version, n_samples=n_samples, scores=scores, meta=meta
    )
    return payload.reply(sender, request_id)


def encode_request(
    sender: int, request_id: int, kind: Kind = Kind.PULL_REQUEST, body: Mapping[str, Any] | None = None
) -> list[Frame]:
    """A pull request, ping or pong: the head, and a small body map if given."""
    head = _head(kind, sender, request_id)
    return [head] if body is None else [head, _pack(dict(body))]


def encode_error(sender: int, request_id: int, reason: str, detail: str) -> list[Frame]:
    """An error reply telling the requester why it gets no model."""
    return [_head(Kind.ERROR_REPLY, sender, request_id), _pack({"reason": reason, "detail": detail})]


# --------------------------------------------------------------------------- decoding


def _buffer(frame: Frame) -> memoryview:
    try:
        mv = memoryview(frame)
    except TypeError:
        raise WireError("garbage", f"frame of type {type(frame).__name__} is not a buffer") from None
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def _unpack(frame: Frame, what: str, limit: int) -> Any:
    mv = _buffer(frame)
    if mv.nbytes > limit:
        raise WireError("too_large", f"{what} frame is {mv.nbytes} bytes, bound is {limit}")
    try:
        # strict_map_key: only str/bytes keys, so no hash-flooding via odd key types;
        # msgpack also bounds every container by the buffer's own size.
        return msgpack.unpackb(mv, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise WireError("garbage", f"{what} frame is not valid msgpack ({type(e).__name__})") from None


def _int(value: Any, name: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise WireError("field", f"{name} must be an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def decode(
    frames: Sequence[Frame],
    expect: Schema | None = None,
    limits: Limits = DEFAULT_LIMITS,
    kinds: Sequence[Kind] | None = None,
) -> Message:
    """Decode and validate one message; raise :class:`WireError` on anything wrong.

    ``expect`` is the receiver's model schema (see :func:`schema_of`): when given, a model
    must have exactly these tensor names, dtypes and shapes.  ``kinds`` restricts which
    message kinds are acceptable here (e.g. a server accepts only requests).
    """
    try:
        return _decode(frames, expect, limits, kinds)
    except WireError:
        raise
    except Exception as e:  # a bug or an input we did not foresee: still a refusal
        raise WireError("garbage", f"undecodable message ({type(e).__name__}: {e})") from None


def _decode(
    frames: Sequence[Frame],
    expect: Schema | None,
    limits: Limits,
    kinds: Sequence[Kind] | None,
) -> Message:
    if not isinstance(frames, (list, tuple)) or not frames:
        raise WireError("frames", "empty message")
    head = _unpack(frames[0], "head", 256)
    if not isinstance(head, list) or len(head) != 4:
        raise WireError("garbage", "head must be [version, kind, sender, request_id]")
    version, kind_no, sender, request_id = head
    if type(version) is not int or version != SCHEMA_VERSION:  # True == 1.0 == 1 in Python
        raise WireError("version", f"schema version {version!r:.20}, this peer speaks {SCHEMA_VERSION}")
    kind = _KINDS.get(kind_no) if type(kind_no) is int else None  # a dict: Kind(...) costs more
    if kind is None:
        raise WireError("kind", f"unknown message kind {kind_no!r:.20}")
    if kinds is not None and kind not in kinds:
        raise WireError("kind", f"{kind.name} is not accepted here")
    sender = _int(sender, "sender")
    request_id = _int(request_id, "request_id")
    msg = Message(kind=kind, sender=sender, request_id=request_id)

    if kind not in (Kind.MODEL_REPLY, Kind.PAYLOAD_REPLY):  # a few small frames; models: below
        msg.nbytes = sum(_buffer(f).nbytes for f in frames)
    if kind in (Kind.PULL_REQUEST, Kind.PING, Kind.PONG):
        if len(frames) > 2:
            raise WireError("frames", f"{kind.name} has {len(frames)} frames, expected 1 or 2")
        if len(frames) == 2:
            body = _unpack(frames[1], "body", 64 * 1024)
            if not isinstance(body, dict):
                raise WireError("garbage", "request body must be a map")
            msg.meta = body
        return msg

    if len(frames) < 2:
        raise WireError("frames", f"{kind.name} without a body frame")
    body = _unpack(frames[1], "body", limits.max_header_bytes)
    if not isinstance(body, dict):
        raise WireError("garbage", "body must be a map")

    if kind is Kind.ERROR_REPLY:
        if len(frames) != 2:
            raise WireError("frames", f"error reply has {len(frames)} frames, expected 2")
        reason, detail = body.get("reason"), body.get("detail", "")
        if not isinstance(reason, str) or not isinstance(detail, str):
            raise WireError("field", "error reply needs string reason and detail")
        msg.reason, msg.detail = reason[:64], detail[:1000]
        return msg

    # MODEL_REPLY / PAYLOAD_REPLY
    msg.step = _int(body.get("step"), "step")
    msg.version = _int(body.get("version"), "version")
    msg.n_samples = _int(body.get("n"), "n_samples")
    msg.scores = _decode_scores(body.get("scores"))
    meta = body.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("field", "meta must be a map")
    msg.meta = meta
    table = body.get("tensors")
    if not isinstance(table, list):
        raise WireError("field", "tensor table missing or not a list")
    if len(table) > limits.max_tensors:
        raise WireError("too_large", f"{len(table)} tensors, bound is {limits.max_tensors}")
    if len(frames) != 2 + len(table):
        raise WireError("frames", f"{len(frames) - 2} tensor frames for {len(table)} table entries")
    if isinstance(expect, Schema) and table == expect.wire_table:
        entries = expect.entries  # the table is exactly our model's: already valid
    else:
        entries = [_table_entry(e, limits) for e in table]
        if expect is not None:
            _check_schema(entries, expect)
    if isinstance(expect, Schema) and entries is expect.entries:
        declared = expect.nbytes
    else:
        declared = sum(e[3] for e in entries)
    if declared > limits.max_bytes:
        raise WireError("too_large", f"declared {declared} tensor bytes, bound is {limits.max_bytes}")
    check = kind is Kind.MODEL_REPLY and (limits.check_finite or limits.max_abs is not None)
    bound = math.inf if limits.max_abs is None else limits.max_abs**2
    tensors: dict[str, torch.Tensor] = {}
    suspects = []
    for (name, wd, shape, nb), frame in zip(entries, frames[2:]):
        if name in tensors:
            raise WireError("field", f"tensor {name!r:.60} appears twice")
        # The frame's bytes, shaped, with no copy: one numpy call where the frame's size is
        # known cheaply (a received frame), the general path for any other buffer.
        if type(frame) in _SIZED and len(frame) == nb:
            arr = np.ndarray(shape, DTYPES[wd][1], buffer=frame)
            if not arr.flags.writeable:  # bytes: read-only, and torch wants writable memory
                arr = arr.copy()
        else:
            arr = _array(name, wd, nb, frame).reshape(shape)
        t = torch.from_numpy(arr)
        tensors[name] = t.view(torch.bfloat16) if wd == "bfloat16" else t
        if not check or not nb or wd not in _FLOAT_DTYPES:
            continue
        if wd in ("float32", "float64"):
            # One dot product answers both questions in the common case: x.x is finite
            # only if every x is (NaN/Inf propagate), and x.x <= b^2 implies every
            # |x| <= b. Overflow or a large sum only sends us to the exact look below.
            q = float(np.vdot(arr, arr))  # vdot flattens: no matrix product for 2-d tensors
            if math.isfinite(q) and q <= bound:
                continue
        suspects.append(name)
    for name in suspects:
        _check_values(name, tensors[name], limits)
    msg.tensors = tensors
    # every tensor frame was checked to hold exactly its declared bytes
    msg.nbytes = _buffer(frames[0]).nbytes + _buffer(frames[1]).nbytes + declared
    return msg


def _decode_scores(raw: Any) -> dict[int, float] | None:
    if raw is None:
        return None
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], list) and isinstance(raw[1], list)):
        raise WireError("field", "scores must be [ids, values]")
    ids, vals = raw
    if len(ids) != len(vals):
        raise WireError("field", "scores: ids and values differ in length")
    # Whole-row checks first (C loops: a row has an entry per peer); the entry-by-entry
    # look below only runs to name what is wrong, or when a sum of finite values overflowed.
    if set(map(type, ids)) <= {int} and set(map(type, vals)) <= {float, int}:
        if not ids or (min(ids) >= 0 and min(vals) >= 0 and math.isfinite(sum(vals))):
            return dict(zip(ids, map(float, vals)))
    out: dict[int, float] = {}
    for k, v in zip(ids, vals):
        if type(k) is not int or k < 0:
            raise WireError("field", f"score id {k!r:.20} is not a peer id")
        if type(v) not in (float, int) or not math.isfinite(v) or v < 0:
            raise WireError("field", f"score for peer {k} is {v!r:.20}, need a finite number >= 0")
        out[k] = float(v)
    return out


def _table_entry(e: Any, limits: Limits) -> tuple[str, str, tuple[int, ...], int]:
    if not (isinstance(e, list) and len(e) == 4):
        raise WireError("field", "tensor table entry must be [name, dtype, shape, nbytes]")
    name, wd, shape, nb = e
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise WireError("field", "tensor name must be a non-empty string of at most 256 chars")
    if not isinstance(wd, str) or wd not in DTYPES:
        raise WireError("dtype", f"tensor {name!r}: dtype {wd!r:.20} not in {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise WireError("shape", f"tensor {name!r}: shape must be a list of at most {limits.max_ndim} dims")
    for d in shape:
        if type(d) is not int or d < 0 or d > limits.max_bytes:
            raise WireError("shape", f"tensor {name!r}: bad dimension {d!r:.20}")
    nb = _int(nb, f"tensor {name!r} nbytes")
    count = math.prod(shape)
    if count * DTYPES[wd][1].itemsize != nb:
        raise WireError("shape", f"tensor {name!r}: shape {shape} of {wd} is not {nb} bytes")
    return name, wd, tuple(shape), nb


def _check_schema(entries: list[tuple[str, str, tuple[int, ...], int]], expect: Schema) -> None:
    got = {name: (wd, shape) for name, wd, shape, _ in entries}
    if got.keys() != expect.keys():
        missing = sorted(expect.keys() - got.keys())[:3]
        extra = sorted(got.keys() - expect.keys())[:3]
        raise WireError("schema", f"tensor names differ from this model: missing {missing}, unexpected {extra}")
    for name, (wd, shape) in got.items():
        ewd, eshape = expect[name]
        if (wd, tuple(shape)) != (ewd, tuple(eshape)):
            raise WireError("schema", f"tensor {name!r}: got {wd}{list(shape)}, this model has {ewd}{list(eshape)}")


def _array(name: str, wd: str, nb: int, frame: Frame) -> np.ndarray:
    """The frame's bytes as a flat array of the wire dtype (bfloat16: as uint16), no copy."""
    try:
        flat = np.frombuffer(frame, dtype=DTYPES[wd][1])
    except (TypeError, ValueError, BufferError):  # not a plain buffer, or a ragged length
        flat = None
    if flat is None or flat.nbytes != nb:
        have = _buffer(frame).nbytes  # refuses what is no buffer at all
        raise WireError("shape", f"tensor {name!r}: frame has {have} bytes, table says {nb}")
    if not flat.flags.writeable:
        # bytes objects are read-only; torch wants writable memory. zmq frames
        # received with copy=False are writable, so the hot path never copies.
        flat = flat.copy()
    return flat


def _check_values(name: str, t: torch.Tensor, limits: Limits) -> None:
    if limits.max_abs is None:
        # One cheap pass first: a sum is finite only if every value is (NaN and +-Inf
        # never turn back into a finite number). Finite values can still overflow a
        # sum, so only a non-finite sum needs the exact look below.
        if math.isfinite(float(t.sum())):
            return
    lo, hi = torch.aminmax(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)
    lo, hi = float(lo), float(hi)
    # NaN propagates through aminmax; so does +-Inf.
    if limits.check_finite and not (math.isfinite(lo) and math.isfinite(hi)):
        raise WireError("nonfinite", f"tensor {name!r} contains NaN or Inf")
    if limits.max_abs is not None and max(-lo, hi) > limits.max_abs:
        raise WireError("magnitude", f"tensor {name!r} has |value| {max(-lo, hi):.3g} > {limits.max_abs:g}")
