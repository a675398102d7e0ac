"""The wire format (version 2): msgpack head and body, and one frame for all tensor bytes.

A message is a list of ZeroMQ frames::

    requests, pings, pongs:   [head] or [head, body]
    error replies:            [head, body]
    model / payload replies:  [head, body, data]

``head`` is a tiny msgpack array ``[schema_version, kind, sender, request_id]`` built for
every message.  ``body`` is a msgpack map whose content depends on the kind; for a model
reply it carries the step, model version, number of training samples, the sender's score
row (for DAC's two-hop rule) and the tensor table ``[name, dtype, shape, offset]``: where
each tensor's bytes (little-endian, C order) start in ``data``.  Offsets are multiples of
:data:`ALIGN`, tensors never overlap and ``data`` ends at the last tensor's end, optionally
padded to the next multiple of :data:`ALIGN`.  docs/WIRE.md is the full specification.

A published model is encoded once (:class:`ModelPayload`: one copy of the parameters into
one buffer, the body from a cached table) and every request for that version is answered
with the same cached frames plus a fresh head; that split is why the request id lives in
``head`` and not in ``body``.

:func:`decode` checks everything it is given and raises :class:`WireError`, never any
other exception.  Tensors are views of the received ``data`` frame (no copy), and values
are checked once per dtype over the frame, not once per tensor.  Nothing is unpickled.
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

SCHEMA_VERSION = 2

#: Every tensor starts at a multiple of this many bytes of the data frame (a cache line;
#: also a multiple of every dtype's size, so a tensor is aligned for its type).
ALIGN = 64

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
FLOAT_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})  # values checked and averaged
_KINDS = {k.value: k for k in Kind}
_REPLY_KINDS = (Kind.MODEL_REPLY, Kind.PAYLOAD_REPLY)

Frame = Union[bytes, bytearray, memoryview, Any]  # Any: zmq.Frame (buffer protocol)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= max(d, 1)
    return tuple(reversed(out))


@dataclass(frozen=True)
class _Group:
    """The tensors of one dtype in a data frame: they are views of one array over
    ``[start, end)``, and their values are checked by one pass over that span."""

    wd: str
    start: int
    end: int
    #: (index in the table, shape, strides, offset in elements from ``start``)
    members: tuple[tuple[int, tuple[int, ...], tuple[int, ...], int], ...]


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a model lies in the data frame.

    ``entries`` are in table order: (name, wire dtype, shape, nbytes, offset).  A sender
    lays tensors out by dtype (in order of first appearance, the table order within one
    dtype), each at the next multiple of :data:`ALIGN`, so that the tensors of one dtype
    form one span and a receiver checks them in one pass.
    """

    entries: tuple[tuple[str, str, tuple[int, ...], int, int], ...]
    size: int  # bytes of the data frame: the last tensor's end, padded to ALIGN
    groups: tuple[_Group, ...]

    @functools.cached_property
    def wire_table(self) -> list[list[Any]]:
        return [[k, wd, list(shape), off] for k, wd, shape, _, off in self.entries]

    @functools.cached_property
    def table_bytes(self) -> bytes:
        return _pack(self.wire_table)

    @functools.cached_property
    def end(self) -> int:
        """Where the last tensor ends (the data frame may be padded after it)."""
        return max((off + nb for *_, nb, off in self.entries), default=0)

    @functools.cached_property
    def body_tail(self) -> bytes:
        """The last entry of a model body as senders pack it: the key and the table."""
        return _TENSORS_KEY + self.table_bytes

    @functools.cached_property
    def names(self) -> list[str]:
        return [e[0] for e in self.entries]

    @classmethod
    def plan(cls, items: Sequence[tuple[str, str, tuple[int, ...]]]) -> "Layout":
        """The canonical layout of tensors (name, wire dtype, shape), given in table order."""
        order: dict[str, list[int]] = {}
        for i, (_, wd, _) in enumerate(items):
            order.setdefault(wd, []).append(i)
        offsets = [0] * len(items)
        nbytes = [math.prod(shape) * DTYPES[wd][1].itemsize for _, wd, shape in items]
        pos = 0
        for idx in order.values():
            for i in idx:
                offsets[i] = pos
                pos += _aligned(nbytes[i])
        entries = tuple((k, wd, tuple(shape), nb, off) for (k, wd, shape), nb, off in zip(items, nbytes, offsets))
        return cls(entries, pos, _groups(entries))


def _groups(entries: Sequence[tuple[str, str, tuple[int, ...], int, int]]) -> tuple[_Group, ...]:
    by: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by.setdefault(e[1], []).append(i)
    out = []
    for wd, idx in by.items():
        full = [i for i in idx if entries[i][3]]
        start = min((entries[i][4] for i in full), default=0)
        end = max((entries[i][4] + entries[i][3] for i in full), default=0)
        isz = DTYPES[wd][1].itemsize
        members = tuple((i, entries[i][2], _strides(entries[i][2]), (entries[i][4] - start) // isz if entries[i][3] else 0)
                        for i in idx)
        out.append(_Group(wd, start, end, members))
    return tuple(out)


class Schema(dict[str, tuple[str, tuple[int, ...]]]):
    """What a receiver expects of a model: tensor name -> (wire dtype, shape), in order.

    It also knows the exact tensor table a matching sender writes (names, dtypes, shapes
    and offsets of the canonical layout), so that decoding the common message (the same
    model as ours) compares one list instead of validating each entry.
    """

    @functools.cached_property
    def layout(self) -> Layout:
        return Layout.plan([(k, wd, tuple(shape)) for k, (wd, shape) in self.items()])

    @property
    def entries(self) -> tuple[tuple[str, str, tuple[int, ...], int, int], ...]:
        return self.layout.entries

    @property
    def wire_table(self) -> list[list[Any]]:
        return self.layout.wire_table


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
        "shape",  # malformed shape
        "offset",  # a tensor misaligned, overlapping another or past the data frame; a data frame of the wrong length
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

    max_bytes: int = 256 * 1024 * 1024  # bytes of the data frame (all tensors) in one message
    max_tensors: int = 4096
    max_header_bytes: int = 4 * 1024 * 1024  # body frame (score rows of many peers)
    max_ndim: int = 8
    max_abs: float | None = None  # refuse model values with |x| above this
    check_finite: bool = True


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message.

    A model's bytes are ``data`` (the received data frame, checked, laid out as
    ``layout``); ``tensors`` are views of it, made on first use: a receiver that works on
    the frame as a whole (a :class:`~zmqgossip.flat.FlatModel`) never pays a view per tensor.
    """

    kind: Kind
    sender: int
    request_id: int
    step: int = 0
    version: int = 0
    n_samples: int = 0
    scores: dict[int, float] | None = None
    reason: str | None = None  # error replies: the refusal code
    detail: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0  # bytes on the wire, all frames
    data: np.ndarray | None = None  # model and payload replies: the data frame's bytes
    layout: Layout | None = None  # ... and where each tensor lies in them
    #: False while a model's values wait for :func:`check_values` (``decode(check_values=False)``)
    checked: bool = True
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Name -> tensor, views of ``data`` (no copy); empty for messages without a model."""
        if self._tensors is None:
            if self.data is None or self.layout is None:
                self._tensors = {}
            else:
                self._tensors = dict(zip(self.layout.names, views_of(torch.from_numpy(self.data), self.layout)))
        return self._tensors

    def require_checked(self) -> None:
        """Raise ``ValueError`` while the values wait for :func:`check_values`: whatever
        scores or mixes a model reads only checked values."""
        if not self.checked:
            raise ValueError("the message's values are not checked yet (wire.check_values)")


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


# --------------------------------------------------------------------------- encoding


def layout_of(state: Mapping[str, torch.Tensor]) -> Layout:
    """The sender's layout of ``state`` (see :class:`Layout`)."""
    return Layout.plan([(k, _wire_dtype(t), tuple(t.shape)) for k, t in state.items()])


def _signature(state: Mapping[str, torch.Tensor]) -> list[tuple[torch.dtype, torch.Size]]:
    return [(t.dtype, t.shape) for t in state.values()]


def aligned_zeros(nbytes: int) -> np.ndarray:
    """``nbytes`` zero bytes starting at a multiple of :data:`ALIGN`, for a data frame.

    Zeroed (calloc: no cost until touched): padding between tensors stays zero, which
    keeps the receiver's one pass per dtype on its fast path.
    """
    base = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    skip = -base.__array_interface__["data"][0] % ALIGN  # (.ctypes would make a cycle)
    return base[skip : skip + nbytes]


def views_of(base: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Typed views of a byte tensor laid out as ``layout``, in table order (an empty
    tensor gets a fresh empty tensor: it has no bytes to view)."""
    out: list[torch.Tensor] = [None] * len(layout.entries)  # type: ignore[list-item]
    for g in layout.groups:
        tdt = DTYPES[g.wd][0]
        if g.end == g.start:  # only empty tensors: nothing to view
            for i, shape, _, _ in g.members:
                out[i] = torch.empty(shape, dtype=tdt)
            continue
        span = base[g.start : g.end].view(tdt)
        at = span.storage_offset()  # as_strided counts from the storage, not the view
        for i, shape, strides, off in g.members:
            out[i] = span.as_strided(shape, strides, at + off) if layout.entries[i][3] else torch.empty(shape, dtype=tdt)
    return out


class _Buffer:
    """One snapshot buffer and the typed views a layout copies into (made once)."""

    __slots__ = ("array", "tensor", "layout", "views")

    def __init__(self, array: np.ndarray) -> None:
        self.array = array  # exactly the snapshot's bytes, cache-line aligned
        self.tensor = torch.from_numpy(array)  # holds one reference to ``array``
        self.layout: Layout | None = None
        self.views: list[torch.Tensor] = []

    def views_for(self, layout: Layout) -> list[torch.Tensor]:
        if self.layout is not layout:
            self.views, self.layout = views_of(self.tensor, layout), layout
        return self.views


class SnapshotMemory:
    """Reusable memory for one publisher's model snapshots.

    A publisher snapshots its model every round. Fresh memory for each snapshot costs the
    kernel's page faults on every large model, on top of the copy, so the snapshots of one publisher take turns in a few buffers instead.  A
    buffer is reused only when nothing refers to it any more: no payload, no frame that
    ZeroMQ still sends, no tensor that a receiver in the same process decoded from it
    (an inproc receive shares the sender's memory).  Python's reference count says
    exactly that, so a snapshot is never overwritten while anyone can still read it.

    It also remembers the layout of the last model snapshotted and, per buffer, the views
    that the copy writes through: a snapshot is then one call that copies every tensor.
    """

    ALIGN = ALIGN

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._buffers: list[_Buffer] = []
        self._lock = threading.Lock()
        self._layout: Layout | None = None
        self._names: list[str] = []
        self._signature: list[tuple[torch.dtype, torch.Size]] = []
        self.reused = 0
        self.allocated = 0

    def layout(self, state: Mapping[str, torch.Tensor]) -> Layout:
        """``state``'s layout; the last one again while names, dtypes and shapes stay."""
        sig = _signature(state)
        if self._layout is None or sig != self._signature or list(state) != self._names:
            self._layout, self._names, self._signature = layout_of(state), list(state), sig
        return self._layout

    def take(self, nbytes: int) -> np.ndarray:
        """A writable byte buffer of exactly ``nbytes``, cache-line aligned, that nothing
        else refers to."""
        return self._take(nbytes).array

    def _take(self, nbytes: int) -> _Buffer:
        with self._lock:
            for b in self._buffers:
                # Free: referred to only by its _Buffer, its torch tensor and getrefcount's
                # argument. Every frame, payload or decoded tensor of a snapshot refers to
                # the array (numpy views and memoryviews point at the array they came from).
                if b.array.nbytes == nbytes and sys.getrefcount(b.array) == 3:
                    self.reused += 1
                    return b
            b = _Buffer(aligned_zeros(nbytes))
            self.allocated += 1
            if len(self._buffers) >= self.keep:
                # Drop the list's hold on one buffer (its users keep it alive until done).
                self._buffers.pop(0)
            self._buffers.append(b)
            return b

    def snapshot(self, state: Mapping[str, torch.Tensor], layout: Layout) -> np.ndarray:
        """Copy ``state`` into a free buffer laid out as ``layout``; the buffer's bytes."""
        b = self._take(layout.size)
        copy_into(b.views_for(layout), state)
        return b.array


def copy_into(views: list[torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state``'s tensors, in order, into ``views`` (:func:`views_of` a buffer)."""
    # One call copies every tensor (each in its logical order: channels-last weights too);
    # no_grad: parameters that require grad are read, never recorded.
    if views:
        with torch.no_grad():
            torch._foreach_copy_(views, list(state.values()))


def _alias(state: Mapping[str, torch.Tensor], layout: Layout) -> memoryview | None:
    """The bytes of a one-tensor state whose own memory is a valid data frame, else None."""
    if len(layout.entries) != 1:
        return None
    (t,) = state.values()
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    view = t.view(torch.uint16) if t.dtype == torch.bfloat16 else t
    return memoryview(view.numpy().reshape(-1)).cast("B")


_TENSORS_KEY = _pack("tensors")


@dataclass(frozen=True)
class ModelPayload:
    """A model snapshot encoded once: the body frame and the data frame.

    The tensors are a private copy (a snapshot), so training can go on changing the live
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

        ``copy=False`` sends a one-tensor state's own memory (only for a tensor nobody
        changes); any other state is copied all the same.
        """
        layout = memory.layout(state) if memory is not None else layout_of(state)
        data: Frame | None = None if copy else _alias(state, layout)
        if data is None:
            if memory is not None:
                data = memoryview(memory.snapshot(state, layout))
            else:
                arr = np.zeros(layout.size, dtype=np.uint8)
                copy_into(views_of(torch.from_numpy(arr), layout), state)
                data = memoryview(arr)
        return cls._encode(data, layout, step=step, version=version, n_samples=n_samples, scores=scores, meta=meta)

    @classmethod
    def from_frame(
        cls,
        frame: np.ndarray,
        layout: Layout,
        *,
        step: int,
        version: int,
        n_samples: int,
        scores: Mapping[int, float] | None = None,
        meta: Mapping[str, Any] | None = None,
        memory: SnapshotMemory | None = None,
    ) -> "ModelPayload":
        """Snapshot a model that already is a data frame (a :class:`~zmqgossip.flat.FlatModel`'s
        buffer, laid out as ``layout``): one copy of ``frame``, whatever the number of tensors."""
        if frame.dtype != np.uint8 or frame.ndim != 1 or frame.nbytes != layout.size:
            raise ValueError(f"a data frame of {layout.size} bytes (uint8) is expected, got {frame.dtype} {frame.shape}")
        data = memory.take(layout.size) if memory is not None else np.empty(layout.size, dtype=np.uint8)
        np.copyto(data, frame)
        return cls._encode(memoryview(data), layout, step=step, version=version, n_samples=n_samples,
                           scores=scores, meta=meta)

    @classmethod
    def _encode(
        cls,
        data: Frame,
        layout: Layout,
        *,
        step: int,
        version: int,
        n_samples: int,
        scores: Mapping[int, float] | None,
        meta: Mapping[str, Any] | None,
    ) -> "ModelPayload":
        fields: dict[str, Any] = {
            "step": int(step),
            "version": int(version),
            "n": int(n_samples),
            "scores": _scores_field(scores),
        }
        if meta:
            fields["meta"] = dict(meta)
        # msgpack is a concatenation: a map of these fields with one more entry, the
        # tensor table packed once per layout. (A map of <= 15 entries has a one-byte
        # header, 0x80 | count.)
        head = _pack(fields)
        body = bytes((head[0] + 1,)) + head[1:] + layout.body_tail
        return cls((body, data), int(version), len(body) + data.nbytes)

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
    check_values: bool = True,
) -> Message:
    """Decode and validate one message; raise :class:`WireError` on anything wrong.

    ``expect`` is the receiver's model schema (see :func:`schema_of`): when given, a model
    must have exactly these tensor names, dtypes and shapes.  ``kinds`` restricts which
    message kinds are acceptable here (e.g. a server accepts only requests).

    ``check_values=False`` leaves a model's values (finite, within ``limits.max_abs``)
    to :func:`check_values`, for a receiver that reads the model in another thread: the
    event loop then only checks structure, and the one pass over the values happens where
    the bytes are read anyway. Such a message has ``checked = False`` until then.
    """
    try:
        return _decode(frames, expect, limits, kinds, check_values)
    except WireError:
        raise
    except Exception as e:  # a bug or an input we did not foresee: still a refusal
        raise WireError("garbage", f"undecodable message ({type(e).__name__}: {e})") from None


def check_head(frames: Sequence[Frame], kinds: Sequence[Kind] | None = None) -> tuple[Kind, int, int]:
    """Validate a message's head frame (and its frame count for its kind): (kind, sender,
    request id). Costs one small msgpack decode: a server refuses junk with it before
    reading anything else."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise WireError("frames", "empty message")
    if len(frames) > 3:  # no kind has more: refused before any msgpack is read
        raise WireError("frames", f"{len(frames)} frames; no message has more than 3")
    head = _unpack(frames[0], "head", 256)
    if not isinstance(head, list) or len(head) != 4:
        raise WireError("garbage", "head must be [version, kind, sender, request_id]")
    version, kind_no, sender, request_id = head
    if type(version) is not int or version != SCHEMA_VERSION:  # True == 1.0 == 1 in Python
        if type(version) is int and version == 1:
            raise WireError("version", "schema version 1 (one frame per tensor) is no longer spoken; "
                                       f"this peer speaks version {SCHEMA_VERSION}")
        raise WireError("version", f"schema version {version!r:.20}, this peer speaks {SCHEMA_VERSION}")
    kind = _KINDS.get(kind_no) if type(kind_no) is int else None  # a dict: Kind(...) costs more
    if kind is None:
        raise WireError("kind", f"unknown message kind {kind_no!r:.20}")
    if kinds is not None and kind not in kinds:
        raise WireError("kind", f"{kind.name} is not accepted here")
    sender = _int(sender, "sender")
    request_id = _int(request_id, "request_id")
    n = len(frames)
    if kind in _REPLY_KINDS:
        if n != 3:
            raise WireError("frames", f"{kind.name} has {n} frames, expected 3 (head, body, data)")
    elif kind is Kind.ERROR_REPLY:
        if n != 2:
            raise WireError("frames", f"error reply has {n} frames, expected 2")
    elif n > 2:
        raise WireError("frames", f"{kind.name} has {n} frames, expected 1 or 2")
    return kind, sender, request_id


def _decode(
    frames: Sequence[Frame],
    expect: Schema | None,
    limits: Limits,
    kinds: Sequence[Kind] | None,
    values: bool = True,
) -> Message:
    kind, sender, request_id = check_head(frames, kinds)
    msg = Message(kind=kind, sender=sender, request_id=request_id)
    if kind in (Kind.PULL_REQUEST, Kind.PING, Kind.PONG):
        msg.nbytes = sum(_buffer(f).nbytes for f in frames)
        if len(frames) == 2:
            body = _unpack(frames[1], "body", 64 * 1024)
            if not isinstance(body, dict):
                raise WireError("garbage", "request body must be a map")
            msg.meta = body
        return msg

    layout = None
    if kind is not Kind.ERROR_REPLY and isinstance(expect, Schema):
        body = _known_table_body(frames[1], expect.layout, limits)
        if body is not None:
            layout = expect.layout
    if layout is None:
        body = _unpack(frames[1], "body", limits.max_header_bytes)
    if not isinstance(body, dict):
        raise WireError("garbage", "body must be a map")

    if kind is Kind.ERROR_REPLY:
        msg.nbytes = sum(_buffer(f).nbytes for f in frames)
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
    table = body.get("tensors") if layout is None else expect.wire_table  # type: ignore[union-attr]
    if not isinstance(table, list):
        raise WireError("field", "tensor table missing or not a list")
    if len(table) > limits.max_tensors:
        raise WireError("too_large", f"{len(table)} tensors, bound is {limits.max_tensors}")
    if layout is not None:
        pass  # the body ends with our model's canonical table, byte for byte
    elif isinstance(expect, Schema) and table == expect.wire_table:
        layout = expect.layout  # the table is exactly our model's canonical one: valid
    else:
        layout = _validated_layout(table, limits)
        if expect is not None:
            _check_schema(layout.entries, expect)
    data = _buffer(frames[2])
    _check_extent(layout, data.nbytes, limits)
    base = np.frombuffer(data, dtype=np.uint8)
    if not base.flags.writeable:
        # bytes objects are read-only; torch wants writable memory. zmq frames received
        # with copy=False are writable, so the hot path never copies.
        base = base.copy()
    msg.data, msg.layout = base, layout
    if kind is Kind.MODEL_REPLY:
        if values:
            _check_model_values(msg, limits)
        else:
            msg.checked = False
    msg.nbytes = _buffer(frames[0]).nbytes + _buffer(frames[1]).nbytes + data.nbytes
    return msg


def check_values(msg: Message, limits: Limits = DEFAULT_LIMITS) -> None:
    """The value check :func:`decode` left out (``check_values=False``): every float is
    finite and, with ``limits.max_abs``, within it; else :class:`WireError` ("nonfinite"
    or "magnitude", naming the tensor). One pass per dtype over the data frame; a message
    already checked costs nothing."""
    if msg.checked:
        return
    _check_model_values(msg, limits)
    msg.checked = True


def _check_model_values(msg: Message, limits: Limits) -> None:
    if msg.layout is None or msg.data is None or not (limits.check_finite or limits.max_abs is not None):
        return
    for g in msg.layout.groups:
        if g.wd in FLOAT_DTYPES and g.end > g.start:
            _check_group(g, msg.data, msg, limits)


def _known_table_body(frame: Frame, layout: Layout, limits: Limits) -> dict | None:
    """The body's fields without unpacking its tensor table, when the body ends with our
    own model's table exactly as a sender packs it (the common message); else None.

    msgpack is a concatenation: a map of n entries whose last entry is ``"tensors": T`` is
    the map header, n - 1 entries, then those bytes. If the bytes before that suffix parse
    exactly as a map of n - 1 entries, the whole body parses as those entries plus the
    known table (a later key wins, as in a full unpack). Anything else takes the full unpack.
    """
    mv = _buffer(frame)
    tail = layout.body_tail
    n = mv.nbytes - len(tail)
    if n < 1 or mv.nbytes > limits.max_header_bytes or mv[n:] != tail:
        return None
    first = mv[0]
    if not 0x81 <= first <= 0x8F:  # a fixmap of 1..15 entries: what senders write
        return None
    try:
        fields = msgpack.unpackb(bytes((first - 1,)) + mv[1:n], raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001  (the full unpack names what is wrong)
        return None
    return fields if isinstance(fields, dict) else None


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


def _validated_layout(table: list, limits: Limits) -> Layout:
    """A tensor table that is not the receiver's own, checked entry by entry."""
    entries = []
    names: set[str] = set()
    for e in table:
        name, wd, shape, nb, off = _table_entry(e, limits)
        if name in names:
            raise WireError("field", f"tensor {name!r:.60} appears twice")
        names.add(name)
        entries.append((name, wd, shape, nb, off))
    declared = max((off + nb for *_, nb, off in entries), default=0)
    if declared > limits.max_bytes:
        raise WireError("too_large", f"the table declares a data frame of {declared} bytes, bound is {limits.max_bytes}")
    full = sorted((off, off + nb, name) for name, _, _, nb, off in entries if nb)
    for (_, end, a), (start, _, b) in zip(full, full[1:]):
        if start < end:
            raise WireError("offset", f"tensors {a!r:.60} and {b!r:.60} overlap")
    return Layout(tuple(entries), _aligned(declared), _groups(entries))


def _table_entry(e: Any, limits: Limits) -> tuple[str, str, tuple[int, ...], int, int]:
    if not (isinstance(e, list) and len(e) == 4):
        raise WireError("field", "tensor table entry must be [name, dtype, shape, offset]")
    name, wd, shape, off = e
    if not isinstance(name, str) or not 0 < len(name) <= 256:
        raise WireError("field", "tensor name must be a non-empty string of at most 256 chars")
    if not isinstance(wd, str) or wd not in DTYPES:
        raise WireError("dtype", f"tensor {name!r}: dtype {wd!r:.20} not in {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise WireError("shape", f"tensor {name!r}: shape must be a list of at most {limits.max_ndim} dims")
    for d in shape:
        if type(d) is not int or d < 0 or d > limits.max_bytes:
            raise WireError("shape", f"tensor {name!r}: bad dimension {d!r:.20}")
    off = _int(off, f"tensor {name!r} offset")
    if off % ALIGN:
        raise WireError("offset", f"tensor {name!r}: offset {off} is not a multiple of {ALIGN}")
    nb = math.prod(shape) * DTYPES[wd][1].itemsize
    if nb > limits.max_bytes or off > limits.max_bytes:
        raise WireError("too_large", f"tensor {name!r}: {nb} bytes at offset {off}, bound is {limits.max_bytes}")
    return name, wd, tuple(shape), nb, off


def _check_extent(layout: Layout, have: int, limits: Limits) -> None:
    """The data frame holds every tensor and at most the padding after the last one."""
    if have > limits.max_bytes:
        raise WireError("too_large", f"data frame is {have} bytes, bound is {limits.max_bytes}")
    end = layout.end
    if have < end:
        past = next(name for name, _, _, nb, off in layout.entries if off + nb > have)
        raise WireError("offset", f"tensor {past!r:.60} runs past the data frame ({have} bytes; the table needs {end})")
    if have > _aligned(end):
        raise WireError("offset", f"data frame is {have} bytes; the tensors end at {end} (padded: {_aligned(end)})")


def _check_schema(entries: Sequence[tuple[str, str, tuple[int, ...], int, int]], expect: Mapping) -> None:
    got = {e[0]: (e[1], e[2]) for e in entries}
    if got.keys() != expect.keys():
        missing = sorted(expect.keys() - got.keys())[:3]
        extra = sorted(got.keys() - expect.keys())[:3]
        raise WireError("schema", f"tensor names differ from this model: missing {missing}, unexpected {extra}")
    for name, (wd, shape) in got.items():
        ewd, eshape = expect[name]
        if (wd, tuple(shape)) != (ewd, tuple(eshape)):
            raise WireError("schema", f"tensor {name!r}: got {wd}{list(shape)}, this model has {ewd}{list(eshape)}")


def _check_group(g: _Group, base: np.ndarray, msg: Message, limits: Limits) -> None:
    """One pass over the span of a dtype's tensors; only a span that fails is looked at
    tensor by tensor (to name the culprit, or because the span also holds padding or
    other tensors' bytes that are no values of this dtype)."""
    span = base[g.start : g.end].view(DTYPES[g.wd][1])
    bound = math.inf if limits.max_abs is None else limits.max_abs**2
    if g.wd in ("float32", "float64"):
        # One dot product answers both questions in the common case: x.x is finite only
        # if every x is (NaN/Inf propagate), and x.x <= b^2 implies every |x| <= b.
        # Overflow or a large sum only sends us to the exact look below.
        q = float(np.vdot(span, span))
        if math.isfinite(q) and q <= bound:
            return
    elif _values_ok(torch.from_numpy(span).view(DTYPES[g.wd][0]), limits):
        return
    entries, tensors = msg.layout.entries, msg.tensors  # type: ignore[union-attr]
    for i, *_ in g.members:
        name, _, _, nb, _ = entries[i]
        if nb:
            _check_values(name, tensors[name], limits)


def _values_ok(t: torch.Tensor, limits: Limits) -> bool:
    if limits.max_abs is None:
        # A sum is finite only if every value is (NaN and +-Inf never turn back into a
        # finite number). Finite values can still overflow a sum: then the exact look.
        return math.isfinite(float(t.sum()))
    lo, hi = torch.aminmax(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)
    lo, hi = float(lo), float(hi)
    return math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= limits.max_abs


def _check_values(name: str, t: torch.Tensor, limits: Limits) -> None:
    if _values_ok(t, limits):
        return
    lo, hi = torch.aminmax(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)
    lo, hi = float(lo), float(hi)
    # NaN propagates through aminmax; so does +-Inf.
    if limits.check_finite and not (math.isfinite(lo) and math.isfinite(hi)):
        raise WireError("nonfinite", f"tensor {name!r} contains NaN or Inf")
    if limits.max_abs is not None and max(-lo, hi) > limits.max_abs:
        raise WireError("magnitude", f"tensor {name!r} has |value| {max(-lo, hi):.3g} > {limits.max_abs:g}")
