"""PENS: Performance-based Neighbor Selection (Onoszko et al., 2021).

Phase 1 (the first ``phase1_rounds`` updates): pull ``sampled`` random peers, score each
on my training data, aggregate only the ``n`` with the lowest loss, and count how often
each peer made that top-n.  Phase 2: the neighbours are the peers selected more often
than chance would give (expected count = selections so far * n / (number of others));
gossip uniformly among them (all others if none qualify).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .base import Policy, Pulled


class PENS(Policy):
    name = "pens"

    def __init__(
        self,
        me: int,
        peers: Sequence[int],
        n: int,
        rng: np.random.Generator,
        *,
        sampled: int | None = None,
        phase1_rounds: int = 10,
    ) -> None:
        super().__init__(me, peers, n, rng)
        self.sampled = sampled if sampled is not None else 2 * n
        self.phase1_rounds = phase1_rounds
        self.selected = {int(p): 0 for p in self.others}
        self.sampled_count = {int(p): 0 for p in self.others}
        self._neighbours: np.ndarray | None = None
        self._last_top: set[int] | None = None  # phase-1 top-n of the latest update

    @property
    def in_phase1(self) -> bool:
        return self.t < self.phase1_rounds

    def choose(self) -> list[int]:
        if self.in_phase1:
            return self.uniform(self.sampled)
        if self._neighbours is None:
            self._neighbours = self._expected_neighbours()
        k = min(self.n, len(self._neighbours))
        return [int(x) for x in self.rng.choice(self._neighbours, size=k, replace=False)]

    def _expected_neighbours(self) -> np.ndarray:
        # A peer sampled s times would be in the top-n about s * n / sampled times by chance.
        chance = {p: c * self.n / max(self.sampled, 1) for p, c in self.sampled_count.items()}
        good = [p for p, c in self.selected.items() if c > chance[p] and c > 0]
        return np.array(good if good else list(self.selected), dtype=np.int64)

    def state(self) -> dict[str, Any]:
        nb = None if self._neighbours is None else self._neighbours.tolist()
        return {**super().state(), "selected": list(self.selected.items()),
                "sampled_count": list(self.sampled_count.items()), "neighbours": nb}

    def restore(self, state: Mapping[str, Any]) -> None:
        super().restore(state)
        self.selected = {int(k): int(v) for k, v in state["selected"]}
        self.sampled_count = {int(k): int(v) for k, v in state["sampled_count"]}
        nb = state.get("neighbours")
        self._neighbours = None if nb is None else np.asarray(nb, dtype=np.int64)

    def _top(self, pulled: Sequence[Pulled]) -> set[int]:
        scored = [r for r in pulled if r.loss is not None]
        scored.sort(key=lambda r: r.loss)
        return {r.peer for r in scored[: self.n]}

    def update(self, pulled: Sequence[Pulled]) -> None:
        self._last_top = None
        if self.in_phase1:
            self._last_top = self._top(pulled)
            for r in pulled:
                if r.peer in self.sampled_count:
                    self.sampled_count[r.peer] += 1
            for p in self._last_top:
                if p in self.selected:
                    self.selected[p] += 1
        super().update(pulled)

    def mix_weights(self, own_samples: int, pulled: Sequence[Pulled]) -> list[float]:
        # Called after update(): phase 1 aggregates only that update's top-n.
        top = self._last_top
        if top is None:
            return super().mix_weights(own_samples, pulled)
        w = np.array([own_samples, *(r.n_samples if r.peer in top else 0 for r in pulled)], dtype=np.float64)
        return (w / w.sum()).tolist()

    @property
    def scores_models(self) -> bool:  # type: ignore[override]
        """Only phase 1 needs losses; phase 2 is plain gossip."""
        return self.in_phase1
