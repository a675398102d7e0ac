"""The paper's networks and a small MLP; all take (N, C, H, W) input and return logits."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["CNN32", "CNN28", "MLP", "MODELS", "build_model", "default_model_for", "count_parameters"]


class CNN32(nn.Module):
    """LeNet-style CNN for 32x32x3 images (CIFAR-10): 62,006 parameters for 10 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

        # Channels-last conv weights make oneDNN keep activations NHWC, where CPU max-pooling
        # is several times faster than in NCHW.
        # Values are unchanged; only strides differ (state dicts stay correct tensors).
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN28(nn.Module):
    """Two-conv CNN for 28x28x1 images (MNIST, Fashion-MNIST): 56,714 parameters for 10 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 5 * 5, 64), nn.ReLU(),
            nn.Linear(64, num_classes),
        )

        # Channels-last conv weights make oneDNN keep activations NHWC, where CPU max-pooling
        # is several times faster than in NCHW.
        # Values are unchanged; only strides differ (state dicts stay correct tensors).
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Small MLP for tiny images (8x8 digits): flatten -> hidden -> ReLU -> classes."""

    def __init__(self, input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        n_in = 1
        for s in input_shape:
            n_in *= int(s)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _cnn(cls: type[nn.Module], hw: int) -> Callable[[tuple[int, ...], int], nn.Module]:
    def make(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3 or tuple(input_shape[1:]) != (hw, hw):
            raise ValueError(f"{cls.__name__} needs input (C, {hw}, {hw}), got {tuple(input_shape)}")
        return cls(num_classes=num_classes, in_channels=int(input_shape[0]))

    return make


# name -> factory(input_shape, num_classes); read-only after import.
MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "cnn32": _cnn(CNN32, 32),
    "cnn28": _cnn(CNN28, 28),
    "mlp": lambda input_shape, num_classes: MLP(tuple(input_shape), num_classes),
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A fresh model by name; weights come from the current torch RNG (seed it for determinism)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return factory(tuple(input_shape), num_classes)


def default_model_for(input_shape: tuple[int, ...]) -> str:
    """The paper's network for the input shape: cnn32 for (C,32,32), cnn28 for (C,28,28), else mlp."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3 and shape[1:] == (32, 32):
        return "cnn32"
    if len(shape) == 3 and shape[1:] == (28, 28):
        return "cnn28"
    return "mlp"


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
