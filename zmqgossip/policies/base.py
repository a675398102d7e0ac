"""What every policy is asked: whom to pull, what it learned from them, how to mix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Pulled:
    """One model that arrived this round, in draw order."""

    peer: int
    n_samples: int
    loss: float | None = None  # its mean loss on my training data, when the policy scores
    scores: dict[int, float] | None = None  # the sender's published score row


class Policy:
    """Base class: choose peers, observe what was pulled, give aggregation weights.

    A policy belongs to one peer (``me``) and knows the ids of all the others.  It draws
    from its own ``rng`` so the same seed gives the same choices.
    """

    name: str = "policy"
    #: whether pulled models must be scored (mean loss on my training data)
    scores_models: bool = False
    #: whether my score row travels with my model (DAC's two-hop needs it)
    publishes_scores: bool = False

    def __init__(self, me: int, peers: Sequence[int], n: int, rng: np.random.Generator) -> None:
        self.me = me
        self.others = np.array([p for p in peers if p != me], dtype=np.int64)
        self.n = n
        self.rng = rng
        self.t = 0  # my number of completed updates: the round index in DAC-var's schedule

    def choose(self) -> list[int]:
        raise NotImplementedError

    def pulls_failed(self, peers: Sequence[int]) -> None:
        """This round's pulls of ``peers`` failed (called before :meth:`update`); the
        paper's methods ignore that."""

    def update(self, pulled: Sequence[Pulled]) -> None:
        """Take in this round's pulled models (draw order) and advance ``t``."""
        self.t += 1

    def mix_weights(self, own_samples: int, pulled: Sequence[Pulled]) -> list[float]:
        """Aggregation weights for [own, *pulled]: by training-set size, as the paper."""
        w = np.array([own_samples, *(p.n_samples for p in pulled)], dtype=np.float64)
        return (w / w.sum()).tolist()

    def score_row(self) -> dict[int, float] | None:
        """What this peer publishes beside its model (None: nothing)."""
        return None

    def sampling_weights(self) -> dict[int, float] | None:
        """The current probability of drawing each peer, for metrics; None if uniform."""
        return None

    def state(self) -> dict[str, Any]:
        """Everything needed to resume this policy (JSON-serialisable)."""
        return {"t": self.t, "rng": self.rng.bit_generator.state}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.t = int(state["t"])
        self.rng.bit_generator.state = state["rng"]

    def uniform(self, k: int) -> list[int]:
        k = min(k, len(self.others))
        return [int(x) for x in self.rng.choice(self.others, size=k, replace=False)]
