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

Options beyond the paper (:class:`DACOptions`), each off by default, so ``dac`` and
``dac-var`` stay the reference's rules; ``dac-plus`` (``DAC_PLUS``) turns on the ones the
measurements recommend:
- ``unknown_score``: rank a client with no score (never pulled, no two-hop value) at the
  mean or max of the known scores instead of 0, so it is not drawn after every known
  outsider (with 0 a small cluster can miss a mate for the whole run);
- ``relative_score``: the softmax sees s_i[j] / max_l s_i[l], so tau weighs loss ratios:
  1/L differs by only ~0.05 between a cluster mate and an outsider while every model's
  loss is ~2 (the first rounds), and by ~3 once the mates' losses are ~0.3;
- ``explore``: pull k more clients per round (unscored ones first), score them and use
  their scores and rows, but give their models no weight in the average;
- ``drop_ratio``: give no weight to a pulled model whose loss on my data is more than this
  many times the lowest loss pulled this round (the forced pick from another cluster);
- ``fail_decay`` / ``fail_limit`` / ``retry_rounds``: liveness. A failed pull multiplies
  that client's score by ``fail_decay``; after ``fail_limit`` failures in a row it is
  forgotten (score and count back to unknown) and not drawn for ``retry_rounds`` rounds,
  twice as long after each further failure; a good pull resets all of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .base import Policy, Pulled
from .sampling import choice_by_weight

LOSS_FLOOR = 1e-6


@dataclass(frozen=True)
class DACOptions:
    """DAC's options beyond the paper; the defaults are the paper's rules (module docstring)."""

    unknown_score: Literal["zero", "mean", "max"] = "zero"
    relative_score: bool = False
    explore: int = 0
    drop_ratio: float = 0.0  # 0: every pulled model is averaged in
    fail_decay: float = 1.0
    fail_limit: int = 0  # 0: a client that keeps failing stays drawable
    retry_rounds: int = 5

    def __post_init__(self) -> None:
        if self.unknown_score not in ("zero", "mean", "max"):
            raise ValueError(f"unknown_score must be zero, mean or max, not {self.unknown_score!r}")
        if self.explore < 0 or self.fail_limit < 0 or self.retry_rounds < 1:
            raise ValueError("explore and fail_limit must be >= 0, retry_rounds >= 1")
        if not (self.drop_ratio == 0 or self.drop_ratio > 1):
            raise ValueError("drop_ratio must be 0 (off) or > 1")
        if not 0 < self.fail_decay <= 1:
            raise ValueError("fail_decay must be in (0, 1]")


#: What ``dac-plus`` runs: DAC-var with the options the measurements recommend.
DAC_PLUS = DACOptions(unknown_score="mean", relative_score=True, drop_ratio=2.0, fail_decay=0.5, fail_limit=2,
                      retry_rounds=5)


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
        options: DACOptions | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(me, peers, n, rng)
        self.tau = tau
        self.variable = variable
        self.similarity_weighted = similarity_weighted
        self.options = options or DACOptions()
        self.name = name or ("dac-var" if variable else "dac")
        self.index = {int(p): i for i, p in enumerate(self.others)}  # peer id -> column
        self._others: list[int] = self.others.tolist()  # column -> peer id, as Python ints
        m = len(self.others)
        self.s = np.zeros(m)  # s_i[j]: 1/loss for pulled peers, copied two-hop values otherwise
        self.c = np.zeros(m, dtype=np.int64)  # how often i pulled j
        self.p = np.full(m, 1.0 / m) if m else np.zeros(0)
        # Options beyond the paper (all stay at these values when they are off):
        self.fails = [0] * m  # failed pulls of j in a row
        self.banned_until = [0] * m  # j is not drawn in rounds before this one
        self.explored: list[int] = []  # this round's exploration picks: scored, not averaged

    # -- step 1
    def choose(self) -> list[int]:
        chosen = self.uniform(self.n) if self.t == 0 else self._draw(self.p, self.n)
        if self.options.explore:
            self.explored = self._explore(chosen, self.options.explore)
            return [*chosen, *self.explored]
        return chosen

    def _explore(self, chosen: Sequence[int], k: int) -> list[int]:
        """k more clients to score: never-pulled ones first (uniformly), then any other."""
        taken = {self.index[j] for j in chosen if j in self.index}
        free = [i for i in range(len(self._others)) if i not in taken and self.banned_until[i] <= self.t]
        fresh = [i for i in free if self.c[i] == 0]
        stale = [i for i in free if self.c[i] != 0]
        picks: list[int] = []
        for pool in (fresh, stale):
            want = min(k - len(picks), len(pool))
            if want > 0:
                picks += [pool[int(x)] for x in self.rng.choice(len(pool), size=want, replace=False)]
        return [self._others[i] for i in picks]

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

    def pulls_failed(self, peers: Sequence[int]) -> None:
        """Liveness (an option): a failed pull lowers j's score; ``fail_limit`` in a row
        forget j and keep it out of the draw for a while (see the module docstring)."""
        o = self.options
        if o.fail_decay == 1.0 and not o.fail_limit:
            return  # the paper: a failed pull changes nothing
        for j in peers:
            col = self.index.get(j)
            if col is None:
                continue
            self.fails[col] += 1
            self.s[col] *= o.fail_decay
            if o.fail_limit and self.fails[col] >= o.fail_limit:
                self.s[col] = 0.0
                self.c[col] = 0
                self.banned_until[col] = self.t + 1 + o.retry_rounds * 2 ** (self.fails[col] - o.fail_limit)

    # -- steps 2 to 6
    def update(self, pulled: Sequence[Pulled]) -> None:
        # Steps 2-4 on Python lists (a few hundred scalar reads and writes of numpy arrays
        # cost more than the rest of the update); the softmax stays in numpy.
        got = [r for r in pulled if r.loss is not None and r.peer in self.index]
        cols = [self.index[r.peer] for r in got]
        s, c = self.s.tolist(), self.c.tolist()
        for col in cols:  # step 2: counts before the two-hop rule
            c[col] += 1
            self.fails[col] = 0  # a good pull ends any run of failures
            self.banned_until[col] = 0
        for r, col in zip(got, cols):  # step 3
            loss = r.loss if math.isfinite(r.loss) else math.inf  # a NaN loss scores 0, like inf
            s[col] = 1.0 / max(loss, LOSS_FLOOR)
        self._two_hop(got, cols, s, c)  # step 4
        self.s = np.array(s, dtype=np.float64)
        self.c = np.array(c, dtype=np.int64)
        self.p = softmax_weights(self._ranked(), tau_schedule(self.tau, self.t, self.variable))  # steps 5-6
        super().update(pulled)

    def _ranked(self) -> np.ndarray:
        """The scores the softmax sees: s itself unless an option ranks unknown or banned
        clients otherwise."""
        o = self.options
        z = self.s
        if o.unknown_score != "zero":
            known = z > 0
            if known.any():
                z = z.copy()
                z[~known & (self.c == 0)] = z[known].mean() if o.unknown_score == "mean" else z[known].max()
        if o.relative_score:
            top = z.max()
            if top > 0:
                z = z / top
        nxt = self.t + 1  # the round this p is drawn in
        banned = [i for i, u in enumerate(self.banned_until) if u > nxt]
        if banned and len(banned) < len(z):
            z = z.astype(np.float64, copy=True)
            z[banned] = -np.inf
        return z

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
        w = self._mix_weights(own_samples, pulled)
        o = self.options
        if not pulled or not (o.explore or o.drop_ratio):
            return w
        # Options: exploration picks and far-worse models get no weight; the rest renormalised.
        losses = [r.loss for r in pulled if r.loss is not None and math.isfinite(r.loss)]
        limit = o.drop_ratio * max(min(losses), LOSS_FLOOR) if o.drop_ratio and losses else math.inf
        explored = set(self.explored)
        keep = [1.0, *(0.0 if r.peer in explored or (o.drop_ratio and r.loss is not None and not r.loss <= limit)
                       else 1.0 for r in pulled)]
        kept = [a * b for a, b in zip(w, keep)]
        total = sum(kept)
        return [v / total for v in kept]

    def _mix_weights(self, own_samples: int, pulled: Sequence[Pulled]) -> list[float]:
        if not self.similarity_weighted or not pulled:
            return super().mix_weights(own_samples, pulled)
        # Own share as by data size; the pulled share split by p_ij instead of by size.
        total = own_samples + sum(r.n_samples for r in pulled)
        own = own_samples / total
        q = np.array([self.p[self.index[r.peer]] if r.peer in self.index else 0.0 for r in pulled])
        q = q / q.sum() if q.sum() > 0 else np.full(len(pulled), 1.0 / len(pulled))
        return [own, *((1.0 - own) * q).tolist()]

    def state(self) -> dict[str, Any]:
        return {**super().state(), "s": self.s.tolist(), "c": self.c.tolist(), "p": self.p.tolist(),
                "fails": list(self.fails), "banned_until": list(self.banned_until), "explored": list(self.explored)}

    def restore(self, state: Mapping[str, Any]) -> None:
        super().restore(state)
        self.s = np.asarray(state["s"], dtype=np.float64)
        self.c = np.asarray(state["c"], dtype=np.int64)
        self.p = np.asarray(state["p"], dtype=np.float64)
        m = len(self._others)
        self.fails = [int(v) for v in state.get("fails", [0] * m)]
        self.banned_until = [int(v) for v in state.get("banned_until", [0] * m)]
        self.explored = [int(v) for v in state.get("explored", [])]

    def score_row(self) -> dict[int, float]:
        others = self._others
        return {others[i]: v for i, v in enumerate(self.s.tolist()) if v}

    def sampling_weights(self) -> dict[int, float]:
        return {int(p): float(w) for p, w in zip(self.others, self.p)}
