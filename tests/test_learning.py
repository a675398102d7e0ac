"""Training, evaluation, weighted averaging and the best-validation checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zmqgossip.data import Dataset, load_dataset
from zmqgossip.learning import Checkpoint, accuracy, evaluate, mean_loss, train, weighted_average
from zmqgossip.models import build_model




@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", test_per_class=30, seed=0)


def test_mlp_learns_digits(digits: Dataset) -> None:
    torch.manual_seed(0)
    m = build_model("mlp", (1, 8, 8), 10)
    assert digits.test_x is not None and digits.test_y is not None
    before = accuracy(m, digits.test_x, digits.test_y)
    gen = torch.Generator().manual_seed(0)
    losses = [train(m, digits.x, digits.y, epochs=1, batch_size=32, lr=3e-3, generator=gen) for _ in range(4)]
    acc = accuracy(m, digits.test_x, digits.test_y)
    assert before < 0.3 and acc > 0.85
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)


def test_train_deterministic_and_keeps_mode(digits: Dataset) -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        m = build_model("cnn28", (1, 28, 28), 10)
        m.eval()
        x = torch.randn(24, 1, 28, 28)
        y = torch.arange(24) % 10
        loss = train(m, x, y, epochs=2, batch_size=8, lr=1e-3, generator=torch.Generator().manual_seed(5))
        assert not m.training and loss > 0
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_train_uses_generator_order(digits: Dataset) -> None:
    out = []
    for seed in (0, 1):
        torch.manual_seed(0)
        m = build_model("mlp", (1, 8, 8), 10)
        train(m, digits.x[:64], digits.y[:64], epochs=1, batch_size=8, lr=1e-2, generator=torch.Generator().manual_seed(seed))
        out.append(m.state_dict()["net.1.weight"])
    assert not torch.equal(out[0], out[1])


def test_mean_loss_and_accuracy_match_per_sample_reference(digits: Dataset) -> None:
    torch.manual_seed(0)
    m = build_model("cnn28", (1, 28, 28), 10)
    x = torch.randn(50, 1, 28, 28)
    y = torch.randint(0, 10, (50,))
    m.train()
    with torch.no_grad():
        m.eval()
        per = [F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).item() for i in range(50)]
        hits = [int(m(x[i : i + 1]).argmax().item() == y[i].item()) for i in range(50)]
        m.train()
    ref = sum(per) / 50
    for bs in (7, 2048):
        assert mean_loss(m, x, y, batch_size=bs) == pytest.approx(ref, rel=1e-5)
        assert accuracy(m, x, y, batch_size=bs) == sum(hits) / 50
    loss, acc = evaluate(m, x, y)
    assert loss == pytest.approx(ref, rel=1e-5) and acc == sum(hits) / 50
    assert m.training  # mode restored
    with pytest.raises(ValueError, match="no samples"):
        mean_loss(m, x[:0], y[:0])


def test_weighted_average_exact() -> None:
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([-1.5]), "n": torch.tensor(9)}
    avg = weighted_average([a, b], [1.0, 3.0])
    assert torch.equal(avg["w"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(avg["b"], torch.tensor([-1.0]))
    assert avg["n"].item() == 7 and avg["n"] is not a["n"]  # integer buffer copied from the first
    out = {k: torch.zeros_like(v) for k, v in a.items()}
    res = weighted_average([a, b], [400, 400], out=out)
    assert res is out and torch.equal(out["w"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]))


def test_weighted_average_of_models_matches_float64_reference() -> None:
    torch.manual_seed(0)
    states = [build_model("cnn28", (1, 28, 28), 10).state_dict() for _ in range(6)]
    ws = [400.0, 100.0, 250.0, 400.0, 50.0, 1.0]
    avg = weighted_average(states, ws)
    total = sum(ws)
    for k in states[0]:
        ref = sum(s[k].double() * (w / total) for s, w in zip(states, ws))
        assert torch.allclose(avg[k].double(), ref, atol=1e-7)
        assert avg[k].shape == states[0][k].shape and avg[k].dtype == torch.float32


@pytest.mark.parametrize(
    "states, weights, match",
    [
        ([], [], "no states"),
        ([{"w": torch.ones(2)}], [1.0, 2.0], "1 states but 2 weights"),
        ([{"w": torch.ones(2)}, {"w": torch.ones(2)}], [1.0, -1.0], ">= 0"),
        ([{"w": torch.ones(2)}, {"w": torch.ones(2)}], [0.0, 0.0], "sum to 0"),
        ([{"w": torch.ones(2)}, {"v": torch.ones(2)}], [1.0, 1.0], "different tensors"),
        ([{"w": torch.ones(2)}, {"w": torch.ones(3)}], [1.0, 1.0], "'w' differs"),
    ],
)
def test_weighted_average_errors(states: list, weights: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_average(states, weights)


def test_checkpoint_keeps_lowest_validation_loss() -> None:
    torch.manual_seed(0)
    m = build_model("mlp", (1, 8, 8), 10)
    ck = Checkpoint()
    assert ck.best_state is None and ck.best_loss == math.inf
    assert ck.offer(2.0, m, 0)
    kept = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    assert not ck.offer(2.5, m, 1)  # worse: ignored
    assert not ck.offer(float("nan"), m, 2)
    assert ck.best_step == 0 and all(torch.equal(ck.best_state[k], kept[k]) for k in kept)  # type: ignore[index]
    assert ck.offer(1.0, m, 3)  # better: replaces (a copy, not the live tensors)
    improved = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.0)
    assert ck.best_loss == 1.0 and ck.best_step == 3
    ck.restore(m)
    assert all(torch.equal(m.state_dict()[k], improved[k]) for k in improved)
