"""The wire format: exact round trips, and a clear refusal for everything else."""

from __future__ import annotations

import ast
import io
import math
import pickle
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmqgossip import wire
from zmqgossip.wire import DTYPES, Kind, Limits, ModelPayload, WireError, decode, schema_of

PKG = Path(wire.__file__).resolve().parent
U63 = st.integers(0, 2**63 - 1)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def split(frames):
    """A message's frames as (head list, body object, tensor frames as bytes)."""
    head = msgpack.unpackb(bytes(frames[0]), raw=False)
    body = msgpack.unpackb(bytes(frames[1]), raw=False) if len(frames) > 1 else None
    return head, body, [bytes(f) for f in frames[2:]]


def join(head, body, tensors) -> list[bytes]:
    return [pack(head), pack(body), *tensors]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern, so that -0.0 vs 0.0 and every NaN payload count."""
    t = t.contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(bits(got[k]), bits(want[k])), k


def small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 2, 2, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(5, generator=g).half(),
        "brain": torch.randn(6, generator=g).bfloat16(),
    }


def model_frames(state=None, **kw) -> list[bytes]:
    kw.setdefault("sender", 3)
    kw.setdefault("request_id", 11)
    return [bytes(f) for f in wire.encode_model(small_state() if state is None else state, **kw)]


def address_of(frame) -> int:
    # Not ``.ctypes.data``: that keeps the array alive in a reference cycle until gc runs.
    return np.frombuffer(frame, dtype=np.uint8).__array_interface__["data"][0]


def refused(frames, reason: str, **kw) -> WireError:
    with pytest.raises(WireError) as ei:
        decode(frames, **kw)
    assert ei.value.reason == reason, f"expected {reason!r}, got {ei.value}"
    return ei.value


@st.composite
def tensors(draw, dtype: str | None = None) -> torch.Tensor:
    wd = draw(st.sampled_from(sorted(DTYPES))) if dtype is None else dtype
    tdt = DTYPES[wd][0]
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    n = math.prod(shape)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if wd == "bool":
        t = torch.randint(0, 2, (n,), generator=g).bool()
    elif tdt.is_floating_point:
        scale = draw(st.sampled_from([1e-6, 1.0, 1e3]))
        t = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(tdt)
        if n and draw(st.booleans()):  # edge values: extremes, subnormal, signed zero
            fi = torch.finfo(tdt)
            edge = [fi.max, -fi.max, fi.tiny, fi.smallest_normal / 4, -0.0, 0.0]
            t[: min(n, len(edge))] = torch.tensor(edge[: min(n, len(edge))], dtype=torch.float64).to(tdt)
    else:
        info = torch.iinfo(tdt)
        t = torch.randint(info.min, info.max, (n,), generator=g, dtype=tdt)
        if n:
            t[0] = info.max if draw(st.booleans()) else info.min
    t = t.reshape(shape)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # a non-contiguous source must encode like its contiguous copy
    return t


NAMES = st.text(min_size=1, max_size=24)
STATES = st.dictionaries(NAMES, tensors(), max_size=10)
SCORES = st.none() | st.dictionaries(U63, st.floats(0, 1e300, allow_nan=False, allow_infinity=False), max_size=20)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(
    state=STATES,
    sender=U63,
    request_id=U63,
    step=U63,
    version=U63,
    n_samples=U63,
    scores=SCORES,
    buffer=st.sampled_from(["bytes", "bytearray", "memoryview"]),
)
def test_model_round_trip_is_exact_for_any_dtype_shape_and_fields(
    state, sender, request_id, step, version, n_samples, scores, buffer
):
    frames = wire.encode_model(
        state, sender=sender, request_id=request_id, step=step, version=version, n_samples=n_samples, scores=scores
    )
    assert len(frames) == 3  # head, body, and one data frame however many tensors
    conv = {"bytes": bytes, "bytearray": bytearray, "memoryview": lambda f: f}[buffer]
    msg = decode([conv(f) for f in frames], expect=schema_of(state))
    assert msg.kind is Kind.MODEL_REPLY
    assert (msg.sender, msg.request_id, msg.step, msg.version, msg.n_samples) == (
        sender,
        request_id,
        step,
        version,
        n_samples,
    )
    assert msg.scores == (None if scores is None else {int(k): float(v) for k, v in scores.items()})
    assert msg.nbytes == sum(memoryview(f).nbytes for f in frames)
    assert_same_state(msg.tensors, state)


@pytest.mark.parametrize("wd", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 3, 4)], ids=str)
def test_every_allowed_dtype_round_trips_including_scalars_and_empty(wd, shape):
    tdt = DTYPES[wd][0]
    n = math.prod(shape)
    t = (torch.arange(n, dtype=torch.float64) - n // 2).to(tdt).reshape(shape)
    state = {"t": t, "other": torch.ones(2, dtype=tdt)}
    msg = decode(model_frames(state), expect=schema_of(state))
    assert_same_state(msg.tensors, state)


def test_many_tensors_up_to_the_bound_round_trip_and_one_more_is_refused():
    state = {f"layer{i}.w": torch.full((i % 3,), float(i)) for i in range(wire.DEFAULT_LIMITS.max_tensors)}
    msg = decode(model_frames(state), expect=schema_of(state))
    assert_same_state(msg.tensors, state)
    state["one.more"] = torch.zeros(1)
    refused(model_frames(state), "too_large")


def test_scores_row_of_a_thousand_peers_round_trips():
    scores = {k: 1.0 / (k + 1) for k in range(1000)}
    scores[10**12] = 0.0
    msg = decode(model_frames(scores=scores))
    assert msg.scores == scores


def test_request_ping_and_error_reply_round_trip():
    req = decode(wire.encode_request(5, 99))
    assert (req.kind, req.sender, req.request_id) == (Kind.PULL_REQUEST, 5, 99)
    ping = decode(wire.encode_request(6, 7, Kind.PING), kinds=(Kind.PING,))
    assert ping.kind is Kind.PING
    err = decode(wire.encode_error(8, 9, "not_ready", "no model published yet"))
    assert (err.kind, err.sender, err.request_id, err.reason, err.detail) == (
        Kind.ERROR_REPLY,
        8,
        9,
        "not_ready",
        "no model published yet",
    )


def test_meta_round_trips():
    msg = decode(model_frames(meta={"lr": 0.01, "tag": "x"}))
    assert msg.meta == {"lr": 0.01, "tag": "x"}


def test_decode_of_writable_frames_does_not_copy_tensor_bytes():
    state = {"w": torch.arange(100_000, dtype=torch.float32)}
    frames = [bytearray(f) for f in wire.encode_model(state, sender=1)]
    msg = decode(frames)
    assert msg.tensors["w"].data_ptr() == np.frombuffer(frames[2], np.uint8).ctypes.data


def test_parameters_that_require_grad_encode():
    lin = torch.nn.Linear(3, 2)
    state = dict(lin.named_parameters())
    msg = decode(model_frames(state), expect=schema_of(lin.state_dict()))
    assert_same_state(msg.tensors, {k: v.detach() for k, v in state.items()})


# --------------------------------------------------------------------------- ModelPayload


def test_payload_reply_reuses_the_same_encoded_frames_for_every_request():
    p = ModelPayload.build(small_state(), step=1, version=2, n_samples=3, scores={1: 0.5})
    a, b = p.reply(7, 100), p.reply(7, 101)
    assert len(a) == len(b) == 3
    assert a[0] != b[0]  # a fresh head per request
    for fa, fb, cached in zip(a[1:], b[1:], p.frames):
        assert fa is fb is cached
    assert decode(a).request_id == 100 and decode(b).request_id == 101
    assert decode(b).version == 2 and p.version == 2
    assert p.nbytes == sum(memoryview(f).nbytes for f in p.frames)


def test_payload_is_a_snapshot_unchanged_by_later_training():
    state = small_state()
    want = {k: v.clone() for k, v in state.items()}
    p = ModelPayload.build(state, step=0, version=1, n_samples=1)
    for t in state.values():
        t.add_(1) if t.dtype != torch.bool else t.logical_not_()
    state["extra"] = torch.zeros(3)
    assert_same_state(decode(p.reply(1, 1)).tensors, want)


def test_payload_without_copy_aliases_the_source_as_documented():
    state = {"w": torch.zeros(4)}
    p = ModelPayload.build(state, step=0, version=1, n_samples=1, copy=False)
    state["w"].fill_(2)
    assert torch.equal(decode(p.reply(1, 1)).tensors["w"], torch.full((4,), 2.0))


def test_snapshot_memory_reuses_a_buffer_once_nothing_refers_to_it():
    memory = wire.SnapshotMemory()
    state = small_state()
    first = ModelPayload.build(state, step=0, version=1, n_samples=1, memory=memory)
    address = address_of(first.frames[1])
    del first
    for t in state.values():
        t.add_(1) if t.dtype != torch.bool else t.logical_not_()
    second = ModelPayload.build(state, step=0, version=2, n_samples=1, memory=memory)
    assert (memory.allocated, memory.reused) == (1, 1)
    assert address_of(second.frames[1]) == address
    assert_same_state(decode(second.reply(1, 1)).tensors, state)


@pytest.mark.parametrize("holder", ["payload", "frames", "decoded tensor"])
def test_snapshot_memory_never_overwrites_a_snapshot_someone_still_reads(holder):
    memory = wire.SnapshotMemory(keep=2)
    state = {"w": torch.zeros(20_000), "b": torch.zeros(3, dtype=torch.float64)}
    p = ModelPayload.build(state, step=0, version=1, n_samples=1, memory=memory)
    held = {"payload": p, "frames": p.reply(1, 1), "decoded tensor": decode(p.reply(1, 1)).tensors["w"]}[holder]
    del p
    for k in range(2, 6):
        for t in state.values():
            t.fill_(k)
        ModelPayload.build(state, step=0, version=k, n_samples=1, memory=memory)
    w = held.frames[1] if holder == "payload" else held[2] if holder == "frames" else held
    assert bool((torch.as_tensor(np.frombuffer(w, np.float32)[:20_000] if holder != "decoded tensor" else w) == 0).all())
    assert memory.allocated == 2 and memory.reused == 3  # the free one was reused, the held one never


def test_snapshot_memory_starts_every_tensor_on_a_cache_line_and_keeps_few_buffers():
    memory = wire.SnapshotMemory(keep=3)
    state = {"odd": torch.zeros(3, dtype=torch.int8), "w": torch.randn(17), "empty": torch.zeros(0), "x": torch.ones(5)}
    held = [ModelPayload.build(state, step=0, version=k, n_samples=1, memory=memory) for k in range(6)]
    for p in held:
        assert address_of(p.frames[1]) % wire.SnapshotMemory.ALIGN == 0
        table = msgpack.unpackb(p.frames[0])["tensors"]
        assert all(off % wire.ALIGN == 0 for *_, off in table)
        msg = decode(p.reply(1, 1))
        assert_same_state(msg.tensors, state)
        for t in msg.tensors.values():
            if t.numel():
                assert (t.data_ptr() - address_of(p.frames[1])) % wire.ALIGN == 0  # a view, on a cache line
    assert memory.allocated == 6 and len(memory._buffers) == 3  # all held: fresh memory, the list stays short


def test_encoding_a_dtype_outside_the_allow_list_is_refused():
    with pytest.raises(WireError) as ei:
        ModelPayload.build({"c": torch.zeros(2, dtype=torch.complex64)}, step=0, version=0, n_samples=0)
    assert ei.value.reason == "dtype"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "frames",
    [[b"\xc1"], [b""], [b"hello"], [pack({"a": 1})], [pack([1, 2, 3])], [pack("x")], [None], ["text"], [12]],
    ids=["reserved-byte", "empty-frame", "trailing-data", "map-head", "short-head", "str-head", "none", "str", "int"],
)
def test_garbage_is_refused_as_garbage(frames):
    refused(frames, "garbage")


def test_garbage_body_is_refused_as_garbage():
    head = pack([wire.SCHEMA_VERSION, int(Kind.MODEL_REPLY), 1, 1])
    refused([head, b"\xc1\x00", b""], "garbage")
    refused([head, pack([1, 2]), b""], "garbage")  # body must be a map
    refused([pack([wire.SCHEMA_VERSION, int(Kind.PULL_REQUEST), 1, 1]), pack(3)], "garbage")


@pytest.mark.parametrize("frames", [[], (), b"abc", "abc", None], ids=["list", "tuple", "bytes", "str", "none"])
def test_no_frames_or_not_a_frame_list_is_refused(frames):
    refused(frames, "frames")


def test_truncated_model_missing_tensor_frames_is_refused():
    frames = model_frames()
    refused(frames[:-1], "frames")
    refused(frames[:2], "frames")
    refused(frames[:1], "frames")


def test_extra_frames_are_refused():
    frames = model_frames()
    refused([*frames, b"\x00" * 4], "frames")
    refused([*wire.encode_request(1, 1), pack({}), b"x"], "frames")
    refused([*wire.encode_error(1, 1, "r", "d"), b"x"], "frames")


@pytest.mark.parametrize("version", [0, 1, 3, 255, -1, True, 2.0, "2", None, [2]])
def test_unknown_schema_version_is_refused(version):
    head, body, ts = split(model_frames())
    head[0] = version
    refused(join(head, body, ts), "version")


@pytest.mark.parametrize("kind", [0, 7, 99, -1, 2**40, True, 2.0, "MODEL_REPLY", None])
def test_unknown_kind_is_refused(kind):
    head, body, ts = split(model_frames())
    head[1] = kind
    refused(join(head, body, ts), "kind")


def test_a_kind_not_accepted_here_is_refused():
    refused(model_frames(), "kind", kinds=(Kind.PULL_REQUEST, Kind.PING))
    refused(wire.encode_request(1, 1), "kind", kinds=(Kind.MODEL_REPLY, Kind.ERROR_REPLY))


@pytest.mark.parametrize("pos,value", [(2, -1), (2, "3"), (2, 1.5), (2, None), (3, -5), (3, 2**64 - 1), (3, [])])
def test_ill_typed_sender_or_request_id_is_refused(pos, value):
    frames = wire.encode_request(1, 1)
    head = msgpack.unpackb(frames[0])
    head[pos] = value
    refused([pack(head)], "field")


BODY_FIELD_CASES = {
    "step-missing": ("step", None),
    "step-str": ("step", "1"),
    "step-negative": ("step", -1),
    "step-bool": ("step", True),
    "step-float": ("step", 1.0),
    "version-missing": ("version", None),
    "version-list": ("version", [1]),
    "version-too-big": ("version", 2**64 - 1),
    "n-missing": ("n", None),
    "n-negative": ("n", -3),
    "scores-not-pair": ("scores", [1, 2, 3]),
    "scores-map": ("scores", {"1": 0.5}),
    "scores-lengths": ("scores", [[1, 2], [0.5]]),
    "scores-negative-id": ("scores", [[-1], [0.5]]),
    "scores-str-id": ("scores", [["a"], [0.5]]),
    "scores-nan": ("scores", [[1], [float("nan")]]),
    "scores-inf": ("scores", [[1], [float("inf")]]),
    "scores-negative": ("scores", [[1], [-0.5]]),
    "scores-str-value": ("scores", [[1], ["0.5"]]),
    "meta-list": ("meta", [1]),
    "tensors-missing": ("tensors", None),
    "tensors-map": ("tensors", {"a": 1}),
}


@pytest.mark.parametrize("case", list(BODY_FIELD_CASES))
def test_missing_or_ill_typed_model_field_is_refused(case):
    key, value = BODY_FIELD_CASES[case]
    head, body, ts = split(model_frames())
    if value is None:
        del body[key]
    else:
        body[key] = value
    refused(join(head, body, ts), "field")


TABLE_FIELD_CASES = {
    "entry-not-list": lambda e: "w",
    "entry-short": lambda e: e[:3],
    "entry-long": lambda e: [*e, 0],
    "name-int": lambda e: [7, *e[1:]],
    "name-empty": lambda e: ["", *e[1:]],
    "name-too-long": lambda e: ["n" * 257, *e[1:]],
    "offset-str": lambda e: [*e[:3], "0"],
    "offset-negative": lambda e: [*e[:3], -64],
    "offset-float": lambda e: [*e[:3], 0.0],
    "offset-none": lambda e: [*e[:3], None],
}


@pytest.mark.parametrize("case", list(TABLE_FIELD_CASES))
def test_ill_typed_tensor_table_entry_is_refused(case):
    head, body, ts = split(model_frames({"w": torch.zeros(4)}))
    body["tensors"][0] = TABLE_FIELD_CASES[case](body["tensors"][0])
    refused(join(head, body, ts), "field")


@pytest.mark.parametrize("value", [{}, {"reason": 3, "detail": "d"}, {"reason": "r", "detail": 5}])
def test_ill_typed_error_reply_is_refused(value):
    head = [wire.SCHEMA_VERSION, int(Kind.ERROR_REPLY), 1, 1]
    refused([pack(head), pack(value)], "field")


@pytest.mark.parametrize("wd", ["complex64", "float8_e4m3fn", "object", "O", "<f4", "", 5, None, ["float32"]])
def test_dtype_outside_the_allow_list_is_refused(wd):
    head, body, ts = split(model_frames({"w": torch.zeros(4)}))
    body["tensors"][0][1] = wd
    refused(join(head, body, ts), "dtype")


@pytest.mark.parametrize(
    "shape",
    [[-4], [2.0, 2], ["4"], [1] * 9, "4", None, [True], [2**40, -1]],
    ids=str,
)
def test_malformed_shape_is_refused(shape):
    head, body, ts = split(model_frames({"w": torch.zeros(4)}))
    body["tensors"][0][2] = shape
    refused(join(head, body, ts), "shape")


def layout_message(entries, data_len, fill=0):
    """A model reply with the given table entries [name, dtype, shape, offset] and data frame."""
    head, body, _ = split(model_frames({"w": torch.zeros(4)}))
    body["tensors"] = [list(e) for e in entries]
    return join(head, body, [bytes([fill]) * data_len])


@pytest.mark.parametrize(
    "entries,data_len,detail",
    [
        ([["w", "float32", [4], 0]], 12, "runs past the data frame"),  # frame shorter than the table says
        ([["w", "float32", [4], 64]], 64, "runs past the data frame"),
        ([["a", "float32", [4], 0], ["b", "float32", [4], 64]], 70, "runs past the data frame"),
        ([["w", "float32", [4], 0]], 65, "the tensors end at 16"),  # more than the padding after the last
        ([["w", "float32", [4], 0]], 200, "the tensors end at 16"),
        ([["w", "float32", [4], 4]], 64, "not a multiple of 64"),  # misaligned
        ([["w", "float64", [2], 32]], 64, "not a multiple of 64"),  # aligned for its dtype, not for the wire
        ([["a", "float32", [32], 0], ["b", "float32", [4], 64]], 128, "overlap"),
        ([["a", "float32", [4], 64], ["b", "int8", [100], 0]], 128, "overlap"),  # out of table order, still overlapping
        ([["a", "float32", [4], 0], ["b", "float32", [4], 0]], 64, "overlap"),  # the same bytes twice
    ],
)
def test_bad_offsets_are_refused_with_the_reason(entries, data_len, detail):
    err = refused(layout_message(entries, data_len), "offset")
    assert detail in err.detail


def test_any_valid_layout_decodes_not_only_the_canonical_one():
    """Tensors out of table order, gaps, dtypes interleaved: views of the right bytes."""
    a = np.arange(4, dtype="<f4")
    b = np.array([7, -8], dtype="<i8")
    c = np.arange(6, dtype="<f4").reshape(2, 3) / 4
    data = bytearray(512)
    for arr, off in ((a, 320), (b, 128), (c, 0)):
        data[off : off + arr.nbytes] = arr.tobytes()
    data[192:196] = np.array([np.nan], "<f4").tobytes()  # junk in a gap: no tensor's value
    entries = [["a", "float32", [4], 320], ["b", "int64", [2], 128], ["c", "float32", [2, 3], 0], ["e", "float32", [0], 320]]
    head, body, _ = split(model_frames({"w": torch.zeros(4)}))
    body["tensors"] = entries
    msg = decode(join(head, body, [bytes(data[:336])]))  # the frame ends where the last tensor does
    assert list(msg.tensors) == ["a", "b", "c", "e"]
    assert torch.equal(msg.tensors["a"], torch.from_numpy(a)) and torch.equal(msg.tensors["b"], torch.from_numpy(b))
    assert torch.equal(msg.tensors["c"], torch.from_numpy(c)) and msg.tensors["e"].shape == (0,)
    data[320 + 4 : 320 + 8] = np.array([np.inf], "<f4").tobytes()
    err = refused(join(head, body, [bytes(data[:336])]), "nonfinite")
    assert "'a'" in err.detail


def test_padding_is_no_value_of_a_model():
    """NaN in the padding between tensors: the one pass per dtype trips, the exact look
    tensor by tensor finds nothing wrong, and the model is accepted."""
    state = {"a": torch.ones(3), "b": torch.full((5,), 2.0)}
    head, body, (data,) = split(model_frames(state))
    data = bytearray(data)
    data[12:16] = np.array([np.nan], "<f4").tobytes()  # after a's 12 bytes, before b at 64
    msg = decode(join(head, body, [bytes(data)]), expect=schema_of(state))
    assert_same_state(msg.tensors, state)


@pytest.mark.parametrize("version", [1, 0, 3])
def test_a_message_of_another_schema_version_is_refused_naming_both(version):
    v1_model = [pack([1, int(Kind.MODEL_REPLY), 3, 11]),
                pack({"step": 0, "version": 0, "n": 0, "scores": None, "tensors": [["w", "float32", [4], 16]]}),
                b"\x00" * 16]  # version 1: one frame per tensor, nbytes in the table
    head, body, ts = split(v1_model)
    head[0] = version
    err = refused(join(head, body, ts), "version")
    assert str(version) in err.detail and str(wire.SCHEMA_VERSION) in err.detail


def test_declared_size_over_max_bytes_is_refused_before_reading_frames():
    state = {"a": torch.zeros(200), "b": torch.zeros(100)}  # 800 + 400 bytes, b at offset 832
    frames = model_frames(state)
    refused(frames, "too_large", limits=Limits(max_bytes=1000))
    refused(frames, "too_large", limits=Limits(max_bytes=1231))
    decode(frames, limits=Limits(max_bytes=1280))
    # a table that lies: claims a huge tensor, sends a tiny frame
    head, body, ts = split(model_frames({"w": torch.zeros(1)}))
    body["tensors"][0][2:] = [[2**20, 2**20], 0]
    refused(join(head, body, ts), "too_large")
    body["tensors"][0][2:] = [[1], 2**40]  # a small tensor far away
    refused(join(head, body, ts), "too_large")


def test_oversized_head_body_or_table_is_refused():
    refused([pack([1, 2, 3, "x" * 300])], "too_large")
    frames = model_frames(scores={k: 1.0 for k in range(2000)})
    refused(frames, "too_large", limits=Limits(max_header_bytes=1024))
    refused(model_frames({f"t{i}": torch.zeros(1) for i in range(5)}), "too_large", limits=Limits(max_tensors=4))


SCHEMA_CASES = {
    "missing-name": lambda s: {k: v for k, v in s.items() if k != "conv.bias"},
    "extra-name": lambda s: {**s, "head.weight": torch.zeros(2)},
    "renamed": lambda s: {("conv.b" if k == "conv.bias" else k): v for k, v in s.items()},
    "other-shape": lambda s: {**s, "conv.weight": torch.zeros(4, 3, 2, 3)},
    "transposed-shape": lambda s: {**s, "conv.weight": torch.zeros(3, 4, 2, 2)},
    "other-dtype": lambda s: {**s, "conv.bias": torch.zeros(4, dtype=torch.float64)},
    "scalar-vs-1d": lambda s: {**s, "bn.num_batches_tracked": torch.tensor([7])},
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_names_or_shapes_not_matching_the_receiver_are_refused(case):
    mine = small_state()
    theirs = SCHEMA_CASES[case](small_state())
    refused(model_frames(theirs), "schema", expect=schema_of(mine))


@pytest.mark.parametrize("wd", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_in_a_model_are_refused(wd, bad):
    t = torch.ones(1000, dtype=DTYPES[wd][0])
    t[617] = bad
    state = {"ok": torch.ones(3), "w": t}
    err = refused(model_frames(state), "nonfinite")
    assert "'w'" in err.detail
    # the same values are accepted when the receiver opts out, and in stress payloads
    decode(model_frames(state), limits=Limits(check_finite=False))
    p = ModelPayload.build(state, step=0, version=0, n_samples=0)
    assert decode(p.reply(1, 1, Kind.PAYLOAD_REPLY)).kind is Kind.PAYLOAD_REPLY


@pytest.mark.parametrize("limits,bad,reason", [(Limits(), float("nan"), "nonfinite"),
                                               (Limits(max_abs=10.0), -11.0, "magnitude")])
def test_values_can_be_checked_after_the_decode(limits, bad, reason):
    """A receiver that reads a model in another thread decodes its structure on the event
    loop and checks its values there: the same refusal, with the tensor named."""
    state = {"ok": torch.ones(3), "w": torch.zeros(100), "i": torch.arange(4)}
    good = decode(model_frames(state), check_values=False, limits=limits)
    assert not good.checked
    wire.check_values(good, limits)
    assert good.checked
    state["w"][63] = bad
    msg = decode(model_frames(state), check_values=False, limits=limits)
    assert not msg.checked and msg.tensors["w"][63].item() != 0  # unchecked: decoded as sent
    with pytest.raises(WireError) as ei:
        wire.check_values(msg, limits)
    assert ei.value.reason == reason and "'w'" in ei.value.detail
    assert not msg.checked
    refused(model_frames(state), reason, limits=limits)  # decode's own check: the same verdict
    # messages without a model have no values to check
    for frames in ([bytes(f) for f in wire.encode_request(4, 5)], [bytes(f) for f in wire.encode_error(1, 2, "x", "y")]):
        m = decode(frames, check_values=False)
        assert m.checked
        wire.check_values(m)


@pytest.mark.parametrize("wd", ["float32", "float64", "float16", "bfloat16"])
def test_finite_values_whose_sum_overflows_are_accepted(wd):
    fi = torch.finfo(DTYPES[wd][0])
    big = torch.full((1000,), fi.max, dtype=DTYPES[wd][0])
    big[1::2] = fi.max / 2
    state = {"w": big, "neg": -big}
    assert_same_state(decode(model_frames(state)).tensors, state)
    big[999] = float("nan")
    refused(model_frames(state), "nonfinite")


@pytest.mark.parametrize("wd", ["float32", "float64", "float16", "bfloat16"])
def test_values_over_max_abs_are_refused(wd):
    lim = Limits(max_abs=10.0)
    for bad in (11.0, -11.0, 1e4):
        t = torch.zeros(50, dtype=DTYPES[wd][0])
        t[7] = bad
        refused(model_frames({"w": t}), "magnitude", limits=lim)
    ok = torch.tensor([10.0, -10.0, 0.0], dtype=DTYPES[wd][0])
    decode(model_frames({"w": ok}), limits=lim)
    decode(model_frames({"i": torch.tensor([10**6])}), limits=lim)  # integer buffers are not bounded


def test_duplicated_tensor_name_is_refused():
    head, body, ts = split(model_frames({"a": torch.zeros(2), "b": torch.ones(2)}))
    body["tensors"][1][0] = "a"
    refused(join(head, body, ts), "field")
    # even when the receiver's schema would match the names
    refused(join(head, body, ts), "field", expect={"a": ("float32", (2,))})


# --------------------------------------------------------------------------- nothing unpickles

UNPICKLED: list[str] = []


def _mark(what: str) -> str:
    UNPICKLED.append(what)
    return what


class _Bomb:
    def __reduce__(self):
        return (_mark, ("unpickled!",))


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", ["wire.py", *sorted(f"net/{p.name}" for p in (PKG / "net").glob("*.py"))])
def test_wire_and_transport_never_import_a_deserializer_that_runs_code(module):
    src = (PKG / module).read_text()
    assert not _imported_modules(PKG / module) & {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
    for call in ("torch.load", "np.load", "numpy.load", "allow_pickle", "recv_pyobj", "loads("):
        assert call not in src, call


def test_pickle_payload_in_any_frame_is_refused_and_never_run():
    bomb = pickle.dumps(_Bomb())
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    saved = buf.getvalue()
    good = model_frames({"w": torch.zeros(16)})  # 64 bytes: a data frame with no padding
    for payload in (bomb, saved, pickle.dumps({"w": torch.zeros(4)})):
        big_head = "too_large" if len(payload) > 256 else "garbage"  # the head frame is bounded first
        refused([payload], big_head)
        refused([payload, *good[1:]], big_head)
        refused([good[0], payload, *good[2:]], "garbage")
        refused([*good[:2], payload], "offset")  # 64 bytes declared, pickle length differs
        refused([*good, payload], "frames")
    # a pickle whose length fits a declared uint8 tensor is just bytes: read as numbers
    head, body, _ = split(good)
    body["tensors"][0][1:] = ["uint8", [len(bomb)], 0]
    msg = decode(join(head, body, [bomb]))
    assert bytes(msg.tensors["w"].numpy()) == bomb
    assert UNPICKLED == []


# --------------------------------------------------------------------------- robustness


def assert_valid(msg: wire.Message) -> None:
    """What any accepted message must satisfy."""
    assert isinstance(msg.kind, Kind)
    for v in (msg.sender, msg.request_id, msg.step, msg.version, msg.n_samples):
        assert type(v) is int and 0 <= v < 2**63
    if msg.scores is not None:
        assert all(type(k) is int and k >= 0 and math.isfinite(v) and v >= 0 for k, v in msg.scores.items())
    if msg.kind is Kind.ERROR_REPLY:
        assert isinstance(msg.reason, str) and isinstance(msg.detail, str)
    allowed = {tdt for tdt, _ in DTYPES.values()}
    for name, t in msg.tensors.items():
        assert isinstance(name, str) and name
        assert t.dtype in allowed
        if msg.kind is Kind.MODEL_REPLY and t.is_floating_point() and t.numel():
            # (float64 as itself: a finite float64 may exceed float32's range)
            assert bool(torch.isfinite(t if t.dtype == torch.float64 else t.float()).all())


def decode_in_two(frames, **kw) -> wire.Message:
    """decode with the value check left out, then the check: as a peer reads a pull."""
    msg = decode(frames, check_values=False, **kw)
    wire.check_values(msg, kw.get("limits", wire.DEFAULT_LIMITS))
    assert msg.checked
    return msg


def decode_or_refuse(frames, **kw) -> None:
    """Refused with a known reason or decoded valid; and the same verdict when the
    values are checked after the decode."""
    try:
        decode_in_two(frames, **kw)
        later = None
    except WireError as e:
        later = e.reason
    try:
        msg = decode(frames, **kw)
    except WireError as e:
        assert e.reason in WireError.REASONS
        assert later == e.reason, (later, e.reason)
        return
    assert later is None, later
    assert_valid(msg)


FRAME = st.binary(max_size=64)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_refuse(data):
    decode_or_refuse([data])
    decode_or_refuse([data, data])


@FUZZ
@given(st.lists(st.one_of(FRAME, FRAME.map(bytearray), st.none(), st.integers(), st.text(max_size=8)), max_size=6))
def test_random_frame_lists_only_ever_refuse(frames):
    decode_or_refuse(frames)
    decode_or_refuse(frames, expect=schema_of(small_state()))


BASE_MESSAGES = [
    model_frames(),
    model_frames({"x": torch.arange(6, dtype=torch.int16).reshape(2, 3), "b": torch.tensor([True, False])}),
    model_frames(scores={1: 0.5, 9: 2.0}, meta={"a": [1, 2]}),
    [bytes(f) for f in ModelPayload.build(small_state(), step=1, version=1, n_samples=1).reply(2, 3, Kind.PAYLOAD_REPLY)],
    [bytes(f) for f in wire.encode_error(1, 2, "not_ready", "later")],
    [bytes(f) for f in wire.encode_request(4, 5)],
    [bytes(f) for f in wire.encode_request(4, 5, Kind.PING)] + [pack({"t": 1})],
]


@st.composite
def mutated(draw):
    frames = [bytearray(f) for f in draw(st.sampled_from(BASE_MESSAGES))]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip", "truncate", "extend", "drop", "dup", "insert"]))
        if not frames:
            frames.append(bytearray(draw(FRAME)))
            continue
        i = draw(st.integers(0, len(frames) - 1))
        f = frames[i]
        if op == "flip" and f:
            j = draw(st.integers(0, len(f) - 1))
            f[j] = draw(st.integers(0, 255))
        elif op == "truncate":
            del f[draw(st.integers(0, len(f))) :]
        elif op == "extend":
            f.extend(draw(st.binary(min_size=1, max_size=8)))
        elif op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(i, bytearray(f))
        elif op == "insert":
            frames.insert(i, bytearray(draw(FRAME)))
    return frames


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.booleans())
def test_mutated_valid_messages_only_ever_refuse_or_decode_valid(frames, readonly):
    if readonly:
        frames = [bytes(f) for f in frames]
    decode_or_refuse(frames)
    decode_or_refuse(frames, expect=schema_of(small_state()), limits=Limits(max_abs=100.0))
    decode_or_refuse(frames, kinds=(Kind.PULL_REQUEST, Kind.PING))


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
TABLE_ENTRY = st.tuples(
    st.text(max_size=4) | MSGPACK_VALUES,
    st.sampled_from(sorted(DTYPES)) | MSGPACK_VALUES,
    st.lists(st.integers(-1, 4), max_size=3) | MSGPACK_VALUES,
    st.integers(-1, 64) | MSGPACK_VALUES,
).map(list)


@FUZZ
@given(
    head=st.tuples(st.just(1) | MSGPACK_VALUES, st.sampled_from([int(k) for k in Kind]) | MSGPACK_VALUES, U63 | MSGPACK_VALUES, U63 | MSGPACK_VALUES).map(list),
    body=st.fixed_dictionaries(
        {},
        optional={
            "step": U63 | MSGPACK_VALUES,
            "version": U63 | MSGPACK_VALUES,
            "n": U63 | MSGPACK_VALUES,
            "scores": MSGPACK_VALUES,
            "meta": MSGPACK_VALUES,
            "tensors": st.lists(TABLE_ENTRY, max_size=4) | MSGPACK_VALUES,
            "reason": st.text(max_size=4) | MSGPACK_VALUES,
            "detail": st.text(max_size=4) | MSGPACK_VALUES,
        },
    )
    | MSGPACK_VALUES,
    tensor_frames=st.lists(st.binary(max_size=64), max_size=5),
)
def test_structured_nonsense_only_ever_refuses_or_decodes_valid(head, body, tensor_frames):
    try:
        frames = [pack(head), pack(body), *tensor_frames]
    except (ValueError, OverflowError, TypeError):
        return  # not representable in msgpack at all
    decode_or_refuse(frames)
    decode_or_refuse(frames[:2])
    decode_or_refuse(frames, expect={"a": ("float32", (2,))})


# --------------------------------------------------------------------------- one data frame


@st.composite
def odd_tensors(draw) -> torch.Tensor:
    """float32 / float64 / int64 tensors: 0-d, empty, and sizes that are no multiple of 64 bytes."""
    t = draw(tensors(draw(st.sampled_from(["float32", "float64", "int64"]))))
    return t


@settings(max_examples=150, deadline=None)
@given(state=st.dictionaries(NAMES, odd_tensors(), max_size=12), buffer=st.sampled_from(["bytes", "bytearray"]))
def test_round_trip_gives_aligned_views_of_the_one_data_frame(state, buffer):
    frames = [bytearray(f) if buffer == "bytearray" else bytes(f) for f in wire.encode_model(state, sender=1)]
    head, body, data = frames
    table = msgpack.unpackb(body)["tensors"]
    assert [e[0] for e in table] == list(state)
    assert all(off % wire.ALIGN == 0 for *_, off in table)
    msg = decode(frames, expect=schema_of(state))
    assert_same_state(msg.tensors, state)
    if buffer == "bytearray":  # writable memory: every tensor is a view into it, no copy
        start = address_of(data)
        for (name, _, _, off), t in zip(table, msg.tensors.values()):
            if t.numel():
                assert t.data_ptr() == start + off, name
    assert len(data) % wire.ALIGN == 0 and len(data) == sum(-(-t.numel() * t.element_size() // 64) * 64 for t in state.values())


def test_per_message_structure_is_flat_in_tensor_count():
    """However many tensors, a model is three frames; only the table grows."""
    for n in (1, 10, 100, 1000):
        state = {f"t{i}": torch.ones(5) for i in range(n)}
        assert len(wire.encode_model(state, sender=1)) == 3


@st.composite
def mutated_models(draw):
    """A valid model reply with its table or data frame changed: offsets, shapes, dtypes,
    names moved, swapped, duplicated or dropped; the data frame cut, grown or replaced."""
    state = draw(st.sampled_from([small_state(), {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.float64)},
                                  {"x": torch.arange(6, dtype=torch.int16).reshape(2, 3), "b": torch.tensor([True, False])}]))
    head, body, (data,) = split(model_frames(state))
    table = body["tensors"]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["offset", "shape", "dtype", "swap", "dup", "drop", "cut", "grow", "data"]))
        i = draw(st.integers(0, len(table) - 1)) if table else 0
        if op == "offset" and table:
            table[i][3] = draw(st.sampled_from([0, 64, 128, 192, 1, 63, 65, 2**40, -64]) | st.integers(0, 1024))
        elif op == "shape" and table:
            table[i][2] = draw(st.lists(st.integers(0, 40), max_size=3))
        elif op == "dtype" and table:
            table[i][1] = draw(st.sampled_from(sorted(DTYPES)))
        elif op == "swap" and len(table) > 1:
            j = draw(st.integers(0, len(table) - 1))
            table[i][3], table[j][3] = table[j][3], table[i][3]
        elif op == "dup" and table:
            table.append(list(table[i]))
        elif op == "drop" and table:
            del table[i]
        elif op == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif op == "grow":
            data = data + draw(st.binary(min_size=1, max_size=100))
        elif op == "data":
            data = draw(st.binary(min_size=len(data), max_size=len(data)))
    return state, join(head, body, [data])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_models())
def test_mutated_tables_and_data_frames_only_ever_refuse_or_decode_valid(case):
    state, frames = case
    for kw in ({}, {"expect": schema_of(state)}, {"limits": Limits(max_abs=1e3)}):
        decode_or_refuse(frames, **kw)
        try:
            msg = decode(frames, **kw)
        except WireError:
            continue
        # what was accepted lies inside the data frame, each tensor on its own bytes
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in msg.tensors.values() if t.numel())
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
