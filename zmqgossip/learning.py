"""Local training, evaluation, weighted averaging of state dicts, best-validation checkpoint.

All functions work on CPU tensors already in memory: batches are slices of one
permuted copy per epoch (no DataLoader), and evaluation runs few large forward passes
under ``torch.inference_mode``. The number of torch threads is the caller's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["train", "mean_loss", "accuracy", "evaluate", "weighted_average", "Checkpoint", "EVAL_BATCH"]

#: Samples per forward pass when evaluating (a client's 400 training samples: 4 passes).
#: On CPU (CNN28/CNN32, 1 thread) passes of 100 cost the same per sample as one pass of
#: 400, but a pass of 400 has activations (~17 MB) big enough that glibc hands them back
#: to the OS after each pass and the next pass faults them in again, page by page.
EVAL_BATCH = 100


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> int:
    n = int(y.shape[0])
    if x.shape[0] != n:
        raise ValueError(f"{x.shape[0]} inputs but {n} labels")
    if n == 0:
        raise ValueError("no samples")
    return n


def _adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    """A fresh Adam; the fused CPU kernel (torch >= 2.4) if it applies, else foreach.

    At batch 8 the optimizer step is a sizeable part of a training step: fused Adam
    is one kernel for all parameters instead of several per parameter tensor.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> float:
    """Train ``model`` in place with a fresh Adam for ``epochs`` passes over (x, y).

    Each epoch visits the samples in an order drawn from ``generator`` (the last batch
    may be smaller). Returns the mean training loss over the last epoch's samples.
    """
    n = _check_xy(x, y)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    was_training = model.training
    model.train()
    opt = _adam(model, lr)
    total = torch.zeros(())
    try:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=generator)
            xs, ys = x[perm], y[perm]  # one gather per epoch; the batches are views of it
            total = torch.zeros(())
            for start in range(0, n, batch_size):
                xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * yb.shape[0]  # no .item() per step
    finally:
        model.train(was_training)
    return float(total) / n


def _sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, int, int]:
    """(sum of cross-entropy, number correct, n) in eval mode, restoring the model's mode."""
    n = _check_xy(x, y)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                logits = model(x[start : start + batch_size])
                yb = y[start : start + batch_size]
                loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
                correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    return float(loss_sum), int(correct), n


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Mean cross-entropy of ``model`` over all of (x, y)."""
    s, _, n = _sums(model, x, y, batch_size)
    return s / n


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Fraction of (x, y) that ``model`` classifies correctly."""
    _, c, n = _sums(model, x, y, batch_size)
    return c / n


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """(mean loss, accuracy) in one pass."""
    s, c, n = _sums(model, x, y, batch_size)
    return s / n, c / n


def normalised_weights(weights: Sequence[float], count: int, what: str) -> torch.Tensor:
    """The weights of a mean of ``count`` ``what`` (states, frames), checked (finite, >= 0,
    one per item, not all 0) and normalised to sum to 1, in float64."""
    if count == 0:
        raise ValueError(f"a weighted mean of no {what}")
    if len(weights) != count:
        raise ValueError(f"{count} {what} but {len(weights)} weights")
    w64 = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in w64):
        raise ValueError(f"weights must be finite and >= 0, got {w64}")
    total = math.fsum(w64)
    if total <= 0:
        raise ValueError("weights sum to 0")
    return torch.tensor([w / total for w in w64], dtype=torch.float64)


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    out: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts; weights are normalised to sum to 1.

    Floating tensors are averaged (one stack + one tensordot per tensor, whatever the
    number of states); other tensors (integer buffers) are copied from the first state.
    With ``out``, results are written into its tensors in place and ``out`` is returned.
    """
    wt = normalised_weights(weights, len(states), "states")
    keys = list(states[0].keys())
    for i, s in enumerate(states[1:], 1):
        if len(s) != len(keys) or any(k not in s for k in keys):
            missing = sorted(set(keys) ^ set(s.keys()))
            raise ValueError(f"state {i} has different tensors from state 0: {missing}")
    wcache: dict[torch.dtype, torch.Tensor] = {}
    result: dict[str, torch.Tensor] = {} if out is None else out
    for k in keys:
        first = states[0][k]
        if first.is_floating_point():
            w = wcache.get(first.dtype)
            if w is None:
                w = wcache[first.dtype] = wt.to(first.dtype)
            try:
                stacked = torch.stack([s[k] for s in states])
            except RuntimeError as e:
                raise ValueError(f"tensor {k!r} differs in shape or dtype between states: {e}") from e
            if stacked.dtype != first.dtype:  # stack promoted mixed dtypes: average in the first's
                stacked = stacked.to(first.dtype)
            avg = torch.tensordot(w, stacked, dims=1)
        else:
            avg = first
        if out is not None and k in out:
            out[k].copy_(avg)
        else:
            result[k] = avg if avg is not first else first.clone()
    return result


@dataclass
class Checkpoint:
    """The model state with the lowest validation loss seen so far."""

    best_loss: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_step: int = -1

    def offer(self, val_loss: float, model: nn.Module, step: int) -> bool:
        """Keep a copy of ``model`` if ``val_loss`` beats the best so far (NaN never does).

        Later improvements are copied into the same tensors: copy ``best_state`` to keep it.
        """
        if not val_loss < self.best_loss:
            return False
        state = model.state_dict()
        if self.best_state is not None and self.best_state.keys() == state.keys():
            for k, v in state.items():  # reuse the buffers: no allocation per improvement
                self.best_state[k].copy_(v)
        else:
            self.best_state = {k: v.detach().clone() for k, v in state.items()}
        self.best_loss = float(val_loss)
        self.best_step = int(step)
        return True

    def restore(self, model: nn.Module) -> None:
        """Load the best state into ``model``."""
        if self.best_state is None:
            raise ValueError("no checkpoint yet")
        model.load_state_dict(self.best_state)
