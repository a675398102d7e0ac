"""A model kept as one data frame: same values, same arithmetic, one copy per snapshot."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from zmqgossip import learning, wire
from zmqgossip.flat import FlatModel
from zmqgossip.models import build_model
from zmqgossip.scoring import Scorer
from zmqgossip.wire import ModelPayload, decode, schema_of

SHAPES = {"mlp": (1, 8, 8), "cnn28": (1, 28, 28), "cnn32": (3, 32, 32)}


class Mixed(nn.Module):
    """Several dtypes and an integer buffer: what batch norm and double layers bring."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.bn = nn.BatchNorm1d(3)
        self.d = nn.Linear(3, 2).double()
        self.register_buffer("empty", torch.zeros(0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.bn(self.a(x)).double())


def model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return Mixed() if name == "mixed" else build_model(name, SHAPES[name], 10)


def frozen(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", ["mlp", "cnn28", "cnn32", "mixed"])
def test_adopting_moves_the_tensors_but_keeps_values_parameters_and_memory_formats(name: str) -> None:
    m = model(name, 0)
    before = frozen(m)
    params = list(m.parameters())
    strides = {k: v.stride() for k, v in m.state_dict().items()}
    flat = FlatModel.adopt(m)
    assert list(m.parameters()) == params  # the same Parameter objects: optimizers keep working
    after = m.state_dict()
    assert {k: v.stride() for k, v in after.items()} == strides  # channels-last weights stay so
    for k, v in before.items():
        assert torch.equal(after[k], v)
    base = flat.buffer.__array_interface__["data"][0]
    inside = [k for k, v in after.items() if v.numel() and base <= v.data_ptr() < base + flat.buffer.nbytes]
    assert inside, "no tensor moved into the buffer"
    assert base % wire.ALIGN == 0 and flat.buffer.nbytes == flat.layout.size
    # The frame is exactly what the wire would encode from the state dict.
    ref = ModelPayload.build(before, step=0, version=1, n_samples=1).frames[1]
    assert bytes(flat.frame()) == bytes(ref)


def test_tied_weights_stay_one_tensor_and_every_name_in_the_frame_follows_it() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    m[1].weight = m[0].weight  # tied: one Parameter under two names
    flat = FlatModel.adopt(m)
    assert m[1].weight is m[0].weight
    with torch.no_grad():
        m[0].weight.add_(1.0)
    frame = decode(ModelPayload.from_frame(flat.frame(), flat.layout, step=0, version=1, n_samples=1).reply(1, 1))
    assert torch.equal(frame.tensors["0.weight"], m[0].weight) and torch.equal(frame.tensors["1.weight"], m[0].weight)
    other = flat.frame().copy()
    with torch.no_grad():
        m[0].weight.zero_()
    flat.load(other)
    assert torch.equal(m[1].weight, frame.tensors["0.weight"])


@pytest.mark.parametrize("name", ["mlp", "cnn28"])
def test_training_writes_through_to_the_frame_and_snapshots_decode_to_the_state(name: str) -> None:
    m = model(name, 1)
    flat = FlatModel.adopt(m)
    shape = SHAPES[name]
    x, y = torch.randn(16, *shape), torch.randint(0, 10, (16,))
    learning.train(m, x, y, epochs=1, batch_size=8, lr=0.01, generator=torch.Generator().manual_seed(0))
    payload = ModelPayload.from_frame(flat.frame(), flat.layout, step=3, version=4, n_samples=16)
    msg = decode(payload.reply(7, 1), expect=schema_of(m.state_dict()))
    assert msg.step == 3 and msg.version == 4 and msg.n_samples == 16
    for k, v in m.state_dict().items():
        assert torch.equal(msg.tensors[k], v), k
    with pytest.raises(ValueError, match="data frame"):
        ModelPayload.from_frame(flat.frame()[:-1], flat.layout, step=0, version=1, n_samples=1)


def test_snapshot_is_a_copy_that_training_does_not_change() -> None:
    m = model("mlp", 2)
    flat = FlatModel.adopt(m)
    memory = wire.SnapshotMemory()
    payload = ModelPayload.from_frame(flat.frame(), flat.layout, step=0, version=1, n_samples=1, memory=memory)
    kept = bytes(payload.frames[1])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    assert bytes(payload.frames[1]) == kept != bytes(flat.frame())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["mlp", "cnn28", "mixed"]), k=st.integers(1, 5),
       weights=st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=5, max_size=5), seed=st.integers(0, 2**16))
def test_mix_is_bit_identical_to_the_weighted_average_of_state_dicts(name: str, k: int, weights: list[float], seed: int) -> None:
    ws = weights[:k]
    if sum(ws) <= 0:
        ws[0] = 1.0
    own = model(name, seed)
    others = [model(name, seed + 1 + i) for i in range(k - 1)]
    states = [frozen(own), *(frozen(o) for o in others)]
    expected = learning.weighted_average(states, ws)
    flat = FlatModel.adopt(own)
    frames = [flat.frame(), *(FlatModel.adopt(o).frame().copy() for o in others)]
    flat.mix(frames, ws)
    got = own.state_dict()
    for key, v in expected.items():
        assert torch.equal(got[key], v), key
    assert bytes(flat.frame()) == bytes(ModelPayload.build(expected, step=0, version=1, n_samples=1).frames[1])


def test_mix_refuses_what_weighted_average_refuses() -> None:
    flat = FlatModel.adopt(model("mlp", 0))
    f = flat.frame().copy()
    for frames, ws, match in [
        ([], [], "no frames"),
        ([f, f], [1.0], "weights"),
        ([f, f], [1.0, float("nan")], "finite"),
        ([f, f], [0.0, 0.0], "sum to 0"),
        ([f, f[:-64]], [1.0, 1.0], "bytes"),
    ]:
        with pytest.raises(ValueError, match=match):
            flat.mix(frames, ws)


def received(state: dict[str, torch.Tensor], *, pad: bool = True, reverse: bool = False) -> wire.Message:
    """A model message as another sender could lay it out: tensors in another order, or
    the data frame not padded after its last tensor (both valid on the wire)."""
    items = list(state.items())[::-1] if reverse else list(state.items())
    frames = wire.encode_model(dict(items), sender=1, version=1)
    if not pad:
        end = wire.layout_of(dict(items)).end
        frames[-1] = bytes(frames[-1])[:end]
    return decode(frames, expect=schema_of(state))


def test_frame_of_takes_a_frame_of_the_same_layout_as_it_is_and_relays_others() -> None:
    m = model("mixed", 3)
    flat = FlatModel.adopt(m)
    other = frozen(model("mixed", 4))
    same = received(other)
    assert same.data is not None and flat.frame_of(same) is same.data  # no copy
    for msg in (received(other, reverse=True), received(other, pad=False)):
        got = flat.frame_of(msg)
        assert got is not msg.data
        flat.load(got)
        for k, v in other.items():
            assert torch.equal(m.state_dict()[k], v), k
    wrong = decode(wire.encode_model(frozen(model("mlp", 0)), sender=1))
    with pytest.raises(ValueError, match="differ"):
        flat.frame_of(wrong)


def test_a_decoded_message_makes_its_tensor_views_only_when_asked() -> None:
    state = frozen(model("mlp", 5))
    msg = decode(wire.encode_model(state, sender=2), expect=schema_of(state))
    assert msg._tensors is None and msg.data is not None
    assert torch.equal(msg.tensors["net.1.weight"], state["net.1.weight"])
    assert msg.tensors["net.1.weight"].data_ptr() == msg.data.__array_interface__["data"][0]  # a view
    state["net.3.bias"][1] = float("nan")  # still refused at decode, before anyone looks
    with pytest.raises(wire.WireError, match="nonfinite"):
        decode(wire.encode_model(state, sender=2), expect=schema_of(state))


@pytest.mark.parametrize("name", ["mlp", "cnn28"])
def test_scoring_a_message_equals_scoring_its_state(name: str) -> None:
    x, y = torch.randn(40, *SHAPES[name]), torch.randint(0, 10, (40,))
    scorer = Scorer(model(name, 6), x, y)
    for seed in (7, 8):
        state = frozen(model(name, seed))
        msg = decode(wire.encode_model(state, sender=1), expect=schema_of(state))
        assert scorer.mean_loss_of(msg) == scorer.mean_loss(state)


@pytest.mark.parametrize("name", ["mlp", "cnn28"])
def test_a_model_is_read_only_once_its_values_are_checked(name: str) -> None:
    """Mixing and scoring refuse a message decoded without its value check until
    ``wire.check_values`` has passed it: a NaN can never reach a model unchecked."""
    x, y = torch.randn(8, *SHAPES[name]), torch.randint(0, 10, (8,))
    m = model(name, 1)
    flat, scorer = FlatModel.adopt(m), Scorer(model(name, 2), x, y)
    state = frozen(model(name, 3))
    msg = decode(wire.encode_model(state, sender=1), expect=schema_of(state), check_values=False)
    for read in (flat.frame_of, scorer.mean_loss_of):
        with pytest.raises(ValueError, match="not checked"):
            read(msg)
    wire.check_values(msg)
    assert flat.frame_of(msg) is msg.data
    assert scorer.mean_loss_of(msg) == scorer.mean_loss(state)
