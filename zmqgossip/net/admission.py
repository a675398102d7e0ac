"""Which requests an inbox answers when more arrive than it should spend its time on.

An inbox answers every request while it keeps up. Under a flood (garbage, or valid
requests from sockets that never read their replies) answering everything would take
the process's time from training and delay honest pullers: ZeroMQ reads connections in
turn, so an honest request waits behind a message of every flooding connection.

So senders are told apart by their routing id. A sender whose last message was answered
with a model or a pong is *trusted* and always answered at once. Answering any other
sender is charged (in CPU time) to a budget of ``share`` of the wall time (refilled
continuously, up to ``burst_s`` saved while calm); while the budget is spent their messages are read and
dropped unanswered ("shed", a fraction of the cost of refusing one). A sender whose
message was refused or whose reply was dropped loses its trust.

Without CURVE a routing id is whatever the client says it is; with CURVE only roster
peers get past the handshake, so strangers never reach this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Admission:
    """One inbox's trusted senders and its budget of time for answering the others."""

    share: float = 0.1  # of the wall time, at most, answering untrusted senders under a flood
    burst_s: float = 0.02  # budget saved while calm, spent before anything is shed
    max_trusted: int = 4096  # routing ids remembered (the oldest are forgotten)
    _trusted: dict[bytes, None] = field(default_factory=dict, repr=False)
    _budget: float = 0.0
    _t: float = field(default_factory=time.perf_counter, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        self._budget = self.burst_s

    def refill(self, now: float) -> None:
        """Add the budget earned since the last call."""
        dt = now - self._t
        self._t = now
        self._budget = min(self.burst_s, self._budget + dt * self.share)

    @property
    def may_answer(self) -> bool:
        """Whether an untrusted message may be answered now (else it is shed)."""
        return self._budget > 0.0

    def charge(self, seconds: float) -> None:
        """Answering an untrusted message took ``seconds`` of CPU time."""
        self._budget -= seconds

    def is_trusted(self, rid: bytes) -> bool:
        return rid in self._trusted

    def trust(self, rid: bytes) -> None:
        t = self._trusted
        if rid not in t:
            if len(t) >= self.max_trusted:
                del t[next(iter(t))]
            t[rid] = None

    def distrust(self, rid: bytes) -> None:
        self._trusted.pop(rid, None)
