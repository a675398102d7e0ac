"""Scoring pulled models: the Scorer's mean loss is the module's, whatever path it takes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqgossip import wire
from zmqgossip.data import load_dataset
from zmqgossip.learning import mean_loss, train
from zmqgossip.models import build_model
from zmqgossip.scoring import Scorer, _CNN28Patches


def _module_loss(
    name: str, shape: tuple[int, ...], state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 100
) -> float:
    m = build_model(name, shape, 10)
    m.load_state_dict(state)
    return mean_loss(m, x, y, batch_size)


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_dataset("mnist-bundled", seed=0)
    return d.x[:250].contiguous(), d.y[:250].contiguous()


def _trained_states(x: torch.Tensor, y: torch.Tensor, k: int) -> list[dict[str, torch.Tensor]]:
    """k CNN28 states that have learned something (activations and losses far from a fresh init)."""
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        m = build_model("cnn28", tuple(x.shape[1:]), 10)
        train(m, x[:64], y[:64], epochs=seed + 1, batch_size=8, lr=1e-3, generator=torch.Generator().manual_seed(seed))
        out.append({n: t.detach().clone() for n, t in m.state_dict().items()})
    return out


def test_cnn28_scores_are_the_modules_losses_on_real_mnist(mnist) -> None:
    x, y = mnist
    states = _trained_states(x, y, 3)
    scorer = Scorer(build_model("cnn28", (1, 28, 28), 10), x, y)
    assert scorer._cnn28 is not None  # the phase-patch path, not the fallback
    # As a peer receives them: decoded from the wire (plain contiguous tensors).
    received = [wire.decode(wire.encode_model(s, sender=1, request_id=1, step=1, version=1, n_samples=1)).tensors for s in states]
    for s, r in zip(states, received):
        want = _module_loss("cnn28", (1, 28, 28), s, x, y)
        assert scorer.mean_loss(s) == pytest.approx(want, rel=1e-6)
        assert scorer.mean_loss(r) == pytest.approx(want, rel=1e-6)
    losses = [scorer.mean_loss(s) for s in states]
    assert len(set(losses)) == 3 and min(losses) < 2.0  # trained models, told apart


def test_cnn28_logits_match_the_module_sample_by_sample(mnist) -> None:
    x, y = mnist
    (state,) = _trained_states(x, y, 1)
    m = build_model("cnn28", (1, 28, 28), 10)
    m.load_state_dict(state)
    m.eval()
    scorer = Scorer(build_model("cnn28", (1, 28, 28), 10), x, y)
    k = scorer._cnn28
    assert k is not None
    with torch.inference_mode():
        want = m(x)
        got = torch.cat([k.logits(state, k.prepare(state), lo, min(250, lo + 64)) for lo in range(0, 250, 64)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.argmax(1), want.argmax(1))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    batch=st.integers(1, 50),
    channels=st.sampled_from([1, 2, 3]),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_any_batching_channels_and_weights_give_the_modules_loss(n: int, batch: int, channels: int, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (channels, 28, 28)
    x = torch.randn(n, *shape, generator=g) * scale
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(seed)
    state = {k: v * scale for k, v in build_model("cnn28", shape, 10).state_dict().items()}
    got = Scorer(build_model("cnn28", shape, 10), x, y, batch_size=batch).mean_loss(state)
    # fc1 adds its 800 inputs in another order than the module. With inputs and weights
    # x5 the logits reach the hundreds and a loss of ~20 is a difference of large numbers,
    # so that order shows at ~2e-5 relative; a wrong kernel or a lost ReLU is off by far more.
    assert got == pytest.approx(_module_loss("cnn28", shape, state, x, y), rel=1e-4, abs=1e-6)


def test_on_mnist_the_background_windows_are_computed_once_per_batch(mnist) -> None:
    x, y = mnist
    states = _trained_states(x, y, 2)
    scorer = Scorer(build_model("cnn28", (1, 28, 28), 10), x, y, batch_size=100)
    k = scorer._cnn28
    assert k is not None and k.patches is None  # the background path
    # About half of MNIST's windows are the black field; each batch keeps one of them.
    assert k.blocks.shape[0] < 0.6 * x.shape[0] * k.rows
    dense = Scorer(build_model("cnn28", (1, 28, 28), 10), x, y, batch_size=100)
    dense._cnn28 = _CNN28Patches(x, 100, skip_background=False)
    assert dense._cnn28.patches is not None
    for s in states:
        assert scorer.mean_loss(s) == pytest.approx(dense.mean_loss(s), rel=1e-6)
        assert scorer.mean_loss(s) == pytest.approx(_module_loss("cnn28", (1, 28, 28), s, x, y), rel=1e-6)


def test_data_without_a_uniform_field_keep_every_window() -> None:
    x = torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    k = Scorer(build_model("cnn28", (1, 28, 28), 10), x, torch.zeros(20, dtype=torch.long))._cnn28
    assert k is not None and k.patches is not None


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 30),
    batch=st.integers(1, 40),
    channels=st.sampled_from([1, 3]),
    size=st.integers(4, 20),
    seed=st.integers(0, 2**16),
)
def test_images_on_a_uniform_field_give_the_modules_loss_and_logits(n: int, batch: int, channels: int, size: int, seed: int) -> None:
    """Blobs of any size and place on a per-channel constant field (as normalised digits
    are): the background path's losses, and its logits for ranges that are not the
    scorer's batches, are the module's."""
    g = torch.Generator().manual_seed(seed)
    shape = (channels, 28, 28)
    x = torch.randn(1, channels, 1, 1, generator=g).expand(n, *shape).clone()  # the field
    for i in range(n):
        r, c = (int(v) for v in torch.randint(4, 28 - size + 1, (2,), generator=g))  # the top-left window stays field
        x[i, :, r : r + size, c : c + size] = torch.randn(channels, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(seed)
    model = build_model("cnn28", shape, 10)
    state = model.state_dict()
    scorer = Scorer(build_model("cnn28", shape, 10), x, y, batch_size=batch)
    k = scorer._cnn28
    assert k is not None
    assert scorer.mean_loss(state) == pytest.approx(_module_loss("cnn28", shape, state, x, y), rel=1e-5, abs=1e-6)
    model.eval()
    step = max(1, batch // 2 + 1)  # ranges that straddle the scorer's batches
    with torch.inference_mode():
        got = torch.cat([k.logits(state, k.prepare(state), lo, min(n, lo + step)) for lo in range(0, n, step)])
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn32", (3, 32, 32))])
def test_other_models_score_through_the_module(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(30, *shape), torch.arange(30) % 10
    state = build_model(name, shape, 10).state_dict()
    scorer = Scorer(build_model(name, shape, 10), x, y, batch_size=7)
    assert scorer._cnn28 is None
    assert scorer.mean_loss(state) == _module_loss(name, shape, state, x, y, batch_size=7)


def test_bad_data_is_refused_when_the_scorer_is_built() -> None:
    m = build_model("cnn28", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        Scorer(m, torch.zeros(3, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no samples"):
        Scorer(m, torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
