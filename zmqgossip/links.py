"""Application-level link emulation: latency, jitter, bandwidth, loss, duplication, partitions.

No root and no kernel queueing discipline: the transport asks :meth:`Links.plan` before
every message it sends, and this module decides how long the message travels and whether
it arrives at all; the transport holds the message back that long on a timer of the event
loop.  Each message is delayed from its own send time, so a delayed message never holds up
a later one (no head-of-line blocking); bandwidth is a token bucket per directed link, so a
10 MB model over a 10 Mbit/s link takes about 8 s and two models back to back take twice
that.

Randomness is drawn per directed link from a generator seeded by (seed, src, dst), so the
same messages over the same link see the same delays and losses: runs with the
``sequential`` schedule are reproducible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Latency(_Strict):
    """One-way delay of a message, in milliseconds."""

    dist: Literal["constant", "uniform", "normal", "lognormal"] = Field("constant", description="distribution")
    mean_ms: float = Field(0.0, ge=0, description="constant value; mean of normal and lognormal")
    std_ms: float = Field(0.0, ge=0, description="standard deviation of normal and lognormal")
    low_ms: float = Field(0.0, ge=0, description="uniform: lower bound")
    high_ms: float = Field(0.0, ge=0, description="uniform: upper bound")
    jitter_ms: float = Field(0.0, ge=0, description="plus a uniform [0, jitter] on every message")

    @model_validator(mode="after")
    def _bounds(self) -> "Latency":
        if self.dist == "uniform" and self.high_ms < self.low_ms:
            raise ValueError("uniform latency needs high_ms >= low_ms")
        if self.dist == "lognormal" and self.std_ms > 0 and self.mean_ms <= 0:
            raise ValueError("lognormal latency needs mean_ms > 0")
        return self

    @property
    def is_zero(self) -> bool:
        return self.jitter_ms == 0 and (
            (self.dist in ("constant", "normal", "lognormal") and self.mean_ms == 0)
            or (self.dist == "uniform" and self.high_ms == 0)
        )

    def sample_ms(self, rng: np.random.Generator) -> float:
        if self.dist == "constant":
            v = self.mean_ms
        elif self.dist == "uniform":
            v = rng.uniform(self.low_ms, self.high_ms)
        elif self.dist == "normal":
            v = max(0.0, rng.normal(self.mean_ms, self.std_ms))
        else:  # lognormal with the given mean and std of the delay itself
            if self.mean_ms == 0:
                v = 0.0
            else:
                s2 = math.log1p((self.std_ms / self.mean_ms) ** 2)
                v = rng.lognormal(math.log(self.mean_ms) - s2 / 2, math.sqrt(s2))
        if self.jitter_ms:
            v += rng.uniform(0.0, self.jitter_ms)
        return float(v)


class LinkProfile(_Strict):
    """How one kind of link behaves."""

    latency: Latency = Latency()
    bandwidth_mbps: float | None = Field(None, gt=0, description="megabits per second per directed link (None: unlimited)")
    loss: float = Field(0.0, ge=0, le=1, description="probability a message is lost")
    duplicate: float = Field(0.0, ge=0, le=1, description="probability a message arrives twice")

    @property
    def is_ideal(self) -> bool:
        return self.latency.is_zero and self.bandwidth_mbps is None and self.loss == 0 and self.duplicate == 0


class LinkClass(_Strict):
    """A group of peers on a different kind of link (e.g. slow home connections)."""

    peers: list[int] = Field([], description="peer ids in this class")
    fraction: float | None = Field(None, ge=0, le=1, description="or: this share of the peers, drawn by seed")
    profile: LinkProfile


class ScenarioEvent(_Strict):
    """Something that happens to the network at a time or round."""

    at_s: float | None = Field(None, ge=0, description="seconds after the start")
    at_round: int | None = Field(None, ge=0, description="before this round (sequential schedule)")
    action: Literal["kill", "partition", "heal", "join", "rejoin"]
    peers: list[int] = Field([], description="kill / join / rejoin: which peers")
    groups: list[list[int]] = Field([], description="partition: peer groups that cannot reach each other")

    @model_validator(mode="after")
    def _when(self) -> "ScenarioEvent":
        if (self.at_s is None) == (self.at_round is None):
            raise ValueError("a scenario event needs exactly one of at_s or at_round")
        if self.action == "partition" and len(self.groups) < 2:
            raise ValueError("partition needs at least two groups")
        if self.action in ("kill", "join", "rejoin") and not self.peers:
            raise ValueError(f"{self.action} needs a list of peers")
        return self


class NetworkEmulation(_Strict):
    """The ``[links]`` table of an experiment."""

    default: LinkProfile = LinkProfile()
    classes: list[LinkClass] = []
    scenario: list[ScenarioEvent] = []

    @property
    def is_ideal(self) -> bool:
        return self.default.is_ideal and all(c.profile.is_ideal for c in self.classes) and not any(
            e.action in ("partition", "heal") for e in self.scenario
        )


@dataclass
class LinkStats:
    """What the emulator did, for the run directory and reports."""

    messages: int = 0
    delivered: int = 0
    dropped: int = 0
    partitioned: int = 0
    duplicated: int = 0
    delay_sum_s: float = 0.0
    delays_ms: list[float] = field(default_factory=list)  # a bounded sample
    max_samples: int = 20_000

    def record(self, delay_s: float) -> None:
        self.delivered += 1
        self.delay_sum_s += delay_s
        if len(self.delays_ms) < self.max_samples:
            self.delays_ms.append(delay_s * 1e3)

    def as_dict(self) -> dict:
        q = (lambda p: float(np.percentile(self.delays_ms, p)) if self.delays_ms else None)
        return {
            "messages": self.messages, "delivered": self.delivered, "dropped": self.dropped,
            "partitioned": self.partitioned, "duplicated": self.duplicated,
            "delay_mean_ms": (self.delay_sum_s / self.delivered * 1e3) if self.delivered else None,
            "delay_p50_ms": q(50), "delay_p90_ms": q(90), "delay_p99_ms": q(99),
        }


class Links:
    """The link emulator of one process (shared by the peers it hosts)."""

    def __init__(self, emulation: NetworkEmulation, peers: int, seed: int) -> None:
        self.emulation = emulation
        self.seed = seed
        self.stats = LinkStats()
        self._class_of = _assign_classes(emulation.classes, peers, seed)
        self._rngs: dict[tuple[int, int], np.random.Generator] = {}
        self._free_at: dict[tuple[int, int], float] = {}  # token bucket: when the link is idle again
        self._group: dict[int, int] | None = None

    # -- partitions
    def partition(self, groups: Sequence[Iterable[int]]) -> None:
        self._group = {p: g for g, members in enumerate(groups) for p in members}

    def heal(self) -> None:
        self._group = None

    def reachable(self, src: int, dst: int) -> bool:
        g = self._group
        if g is None:
            return True
        # Peers named in no group form one more group of their own.
        return g.get(src, -1) == g.get(dst, -1)

    # -- per message
    def profile(self, src: int, dst: int) -> LinkProfile:
        """The class of either end decides (the receiver's first): a slow end slows the link."""
        c = self._class_of.get(dst, self._class_of.get(src))
        return self.emulation.classes[c].profile if c is not None else self.emulation.default

    def _rng(self, link: tuple[int, int]) -> np.random.Generator:
        r = self._rngs.get(link)
        if r is None:
            r = self._rngs[link] = np.random.default_rng([self.seed, link[0], link[1]])
        return r

    def plan(self, src: int, dst: int, nbytes: int, now: float | None = None) -> tuple[int, float]:
        """Decide one message's fate: (copies delivered: 0, 1 or 2; delay in seconds)."""
        self.stats.messages += 1
        if not self.reachable(src, dst):
            self.stats.partitioned += 1
            return 0, 0.0
        prof = self.profile(src, dst)
        if prof.is_ideal:
            self.stats.record(0.0)
            return 1, 0.0
        link = (src, dst)
        rng = self._rng(link)
        if prof.loss and rng.random() < prof.loss:
            self.stats.dropped += 1
            return 0, 0.0
        delay = prof.latency.sample_ms(rng) / 1e3
        if prof.bandwidth_mbps is not None:
            now = time.monotonic() if now is None else now
            tx = nbytes * 8 / (prof.bandwidth_mbps * 1e6)
            start = max(now, self._free_at.get(link, 0.0))
            self._free_at[link] = start + tx
            delay += start + tx - now
        copies = 2 if prof.duplicate and rng.random() < prof.duplicate else 1
        self.stats.duplicated += copies - 1
        self.stats.record(delay)
        return copies, delay


def _assign_classes(classes: Sequence[LinkClass], peers: int, seed: int) -> dict[int, int]:
    """peer -> index of its link class; explicit peers first, then fractions by seed."""
    out: dict[int, int] = {}
    for c, lc in enumerate(classes):
        for p in lc.peers:
            out.setdefault(p, c)
    rng = np.random.default_rng([seed, 0x11AC])
    free = [p for p in rng.permutation(peers).tolist() if p not in out]
    for c, lc in enumerate(classes):
        if lc.fraction:
            k = int(round(lc.fraction * peers))
            for p in free[:k]:
                out[p] = c
            free = free[k:]
    return out
