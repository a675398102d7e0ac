"""Oracle: pull n peers uniformly from my true cluster (knowledge no real peer has)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .base import Policy


class Oracle(Policy):
    name = "oracle"

    def __init__(
        self, me: int, peers: Sequence[int], n: int, rng: np.random.Generator, *, clusters: Mapping[int, int]
    ) -> None:
        super().__init__(me, peers, n, rng)
        mine = clusters[me]
        self.mates = np.array([p for p in self.others if clusters[int(p)] == mine], dtype=np.int64)

    def choose(self) -> list[int]:
        k = min(self.n, len(self.mates))
        return [int(x) for x in self.rng.choice(self.mates, size=k, replace=False)] if k else []
