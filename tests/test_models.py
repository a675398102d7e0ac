"""The paper's networks: exact parameter counts, shapes, names, determinism."""

from __future__ import annotations

import pytest
import torch

from zmqgossip.models import CNN28, CNN32, MLP, build_model, count_parameters, default_model_for




def test_parameter_counts() -> None:
    assert count_parameters(CNN32()) == 62_006
    assert count_parameters(CNN28()) == 56_714
    assert count_parameters(build_model("cnn32", (3, 32, 32), 10)) == 62_006
    assert count_parameters(build_model("cnn28", (1, 28, 28), 10)) == 56_714
    assert count_parameters(MLP((1, 8, 8), 10)) == 64 * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize(
    "name, shape", [("cnn32", (3, 32, 32)), ("cnn28", (1, 28, 28)), ("mlp", (1, 8, 8)), ("mlp", (1, 28, 28))]
)
@pytest.mark.parametrize("n", [1, 5])
def test_forward_shapes(name: str, shape: tuple[int, int, int], n: int) -> None:
    m = build_model(name, shape, 7)
    assert m(torch.randn(n, *shape)).shape == (n, 7)


def test_default_model_and_errors() -> None:
    assert default_model_for((3, 32, 32)) == "cnn32"
    assert default_model_for((1, 28, 28)) == "cnn28"
    assert default_model_for((1, 8, 8)) == "mlp"
    with pytest.raises(ValueError, match="unknown model 'resnet'.*cnn32.*cnn28.*mlp"):
        build_model("resnet", (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"CNN28 needs input \(C, 28, 28\)"):
        build_model("cnn28", (3, 32, 32), 10)


def test_deterministic_given_seed() -> None:
    torch.manual_seed(3)
    a = build_model("cnn28", (1, 28, 28), 10)
    torch.manual_seed(3)
    b = build_model("cnn28", (1, 28, 28), 10)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_state_dict_round_trips_through_contiguous_copies() -> None:
    # Conv weights are channels-last internally; a plain contiguous copy (as the wire
    # codec makes) must load back to an identical function.
    torch.manual_seed(0)
    a = CNN32().eval()
    b = CNN32().eval()
    b.load_state_dict({k: v.contiguous().clone() for k, v in a.state_dict().items()})
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(a(x), b(x))
    assert list(a.state_dict()) == [
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
        "classifier.1.weight", "classifier.1.bias", "classifier.3.weight", "classifier.3.bias",
        "classifier.5.weight", "classifier.5.bias",
    ]
