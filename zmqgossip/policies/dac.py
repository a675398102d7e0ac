"""DAC: Decentralized Adaptive Clustering (Listo Zec et al., 2022, arXiv 2206.08839).

Each client i keeps a score s_i[j] for every other client j and samples whom to pull
from the softmax of tau * s_i.  One update, as the paper's reference code runs it:

1. choose n distinct peers: uniformly in round 0, afterwards by p_i (draw order kept);
2. for each chosen k: L_ik = mean loss of k's model on i's training data; c_i[k] += 1;
3. direct scores s_i[k] = 1 / L_ik (overwriting any older value, direct or two-hop);
4. two-hop: for every j never pulled (c_i[j] == 0) that some chosen k scores
   positively, copy s_k[j] from the informed k with the largest s_i[k] (ties: the later
   in draw order), overwriting an older two-hop value;
5. tau_t = tau (DAC) or 2 tau / (1 + exp(-0.2 t)) - tau + 1 (DAC-var);
6. p_i[j] = softmax over j != i of tau_t s_i[j]; unknown clients (s = 0) keep exp(0);
7. aggregate own and pulled models weighted by training-set size (the paper), or,
   as an option beyond it, the pulled ones by p_ij.

Numerical safety the reference code lacks, none of which changes a result where the
reference runs without error:
- the loss is floored at ``LOSS_FLOOR`` before 1/L (a loss of exactly 0 happens);
- the maximum is subtracted before exp (tau/L overflowed to inf, then NaN);
- when fewer than n peers have non-zero probability (exp underflow), the draw takes all
  of those and fills the rest uniformly from the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .base import Policy, Pulled
from .sampling import choice_by_weight

LOSS_FLOOR = 1e-6


def tau_schedule(tau: float, t: int, variable: bool) -> float:
    """DAC uses a fixed tau; DAC-var ramps it from 1 (t = 0) towards tau."""
    if not variable:
        return tau
    return 2.0 * tau / (1.0 + math.exp(-0.2 * t)) - tau + 1.0


def softmax_weights(scores: np.ndarray, tau_t: float, me_index: int | None = None) -> np.ndarray:
    """p[j] proportional to exp(tau_t * s[j]), max-subtracted; p[me] = 0."""
    z = tau_t * scores.astype(np.float64)
    if me_index is not None:
        z[me_index] = -np.inf
    z -= z.max()
    e = np.exp(z)
    return e / e.sum()


class DAC(Policy):
    """DAC with a fixed tau; ``variable=True`` gives DAC-var."""

    name = "dac"
    scores_models = True
    publishes_scores = True

    def __init__(
        self,
        me: int,
        peers: Sequence[int],
        n: int,
        rng: np.random.Generator,
        *,
        tau: float = 30.0,
        variable: bool = False,
        similarity_weighted: bool = False,
    ) -> None:
        super().__init__(me, peers, n, rng)
        self.tau = tau
        self.variable = variable
        self.similarity_weighted = similarity_weighted
        self.name = "dac-var" if variable else "dac"
        self.index = {int(p): i for i, p in enumerate(self.others)}  # peer id -> column
        self._others: list[int] = self.others.tolist()  # column -> peer id, as Python ints
        m = len(self.others)
        self.s = np.zeros(m)  # s_i[j]: 1/loss for pulled peers, copied two-hop values otherwise
        self.c = np.zeros(m, dtype=np.int64)  # how often i pulled j
        self.p = np.full(m, 1.0 / m) if m else np.zeros(0)

    # -- step 1
    def choose(self) -> list[int]:
        if self.t == 0:
            return self.uniform(self.n)
        return self._draw(self.p, self.n)

    def _draw(self, p: np.ndarray, k: int) -> list[int]:
        # On Python lists: this runs on the event loop once per peer-round, and a few
        # numpy calls on 20 numbers cost more there than the whole draw.
        k = min(k, len(self.others))
        w = p.tolist()
        if sum(v > 0 for v in w) >= k:
            idx = choice_by_weight(self.rng, w, k)  # = rng.choice(m, k, replace=False, p=p)
        else:
            # Too few peers with non-zero weight: all of them, then uniform fill.
            nonzero = np.flatnonzero(p > 0)
            first = [int(nonzero[i]) for i in choice_by_weight(self.rng, p[nonzero] / p[nonzero].sum(), len(nonzero))]
            rest = np.array([i for i in range(len(self.others)) if not p[i] > 0], dtype=np.int64)
            idx = [*first, *self.rng.choice(rest, size=k - len(nonzero), replace=False).tolist()]
        others = self._others
        return [others[i] for i in idx]

    # -- steps 2 to 6
    def update(self, pulled: Sequence[Pulled]) -> None:
        # Steps 2-4 on Python lists (a few hundred scalar reads and writes of numpy arrays
        # cost more than the rest of the update); the softmax stays in numpy.
        got = [r for r in pulled if r.loss is not None and r.peer in self.index]
        cols = [self.index[r.peer] for r in got]
        s, c = self.s.tolist(), self.c.tolist()
        for col in cols:  # step 2: counts before the two-hop rule
            c[col] += 1
        for r, col in zip(got, cols):  # step 3
            loss = r.loss if math.isfinite(r.loss) else math.inf  # a NaN loss scores 0, like inf
            s[col] = 1.0 / max(loss, LOSS_FLOOR)
        self._two_hop(got, cols, s, c)  # step 4
        self.s = np.array(s, dtype=np.float64)
        self.c = np.array(c, dtype=np.int64)
        self.p = softmax_weights(self.s, tau_schedule(self.tau, self.t, self.variable))  # steps 5-6
        super().update(pulled)

    def _two_hop(self, got: Sequence[Pulled], cols: Sequence[int], s: list[float], c: list[int]) -> None:
        # Informed peers in ascending order of s_i[k]; with a stable sort, equal scores
        # keep draw order, so the last writer is the best-scored, later-drawn one.
        order = sorted(range(len(got)), key=lambda a: s[cols[a]])
        index = self.index
        for a in order:
            row = got[a].scores
            if not row:
                continue
            for j, v in row.items():
                col = index.get(j)
                if col is None or v <= 0 or c[col] != 0:
                    continue
                s[col] = v

    def mix_weights(self, own_samples: int, pulled: Sequence[Pulled]) -> list[float]:
        if not self.similarity_weighted or not pulled:
            return super().mix_weights(own_samples, pulled)
        # Own share as by data size; the pulled share split by p_ij instead of by size.
        total = own_samples + sum(r.n_samples for r in pulled)
        own = own_samples / total
        q = np.array([self.p[self.index[r.peer]] if r.peer in self.index else 0.0 for r in pulled])
        q = q / q.sum() if q.sum() > 0 else np.full(len(pulled), 1.0 / len(pulled))
        return [own, *((1.0 - own) * q).tolist()]

    def state(self) -> dict[str, Any]:
        return {**super().state(), "s": self.s.tolist(), "c": self.c.tolist(), "p": self.p.tolist()}

    def restore(self, state: Mapping[str, Any]) -> None:
        super().restore(state)
        self.s = np.asarray(state["s"], dtype=np.float64)
        self.c = np.asarray(state["c"], dtype=np.int64)
        self.p = np.asarray(state["p"], dtype=np.float64)

    def score_row(self) -> dict[int, float]:
        others = self._others
        return {others[i]: v for i, v in enumerate(self.s.tolist()) if v}

    def sampling_weights(self) -> dict[int, float]:
        return {int(p): float(w) for p, w in zip(self.others, self.p)}
