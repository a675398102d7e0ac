"""A transport's settings and counters, and the error it raises when it cannot be set up."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..config import DEFAULT_FLOOD_SHARE, DEFAULT_HWM, DEFAULT_TIMEOUT_S, SMALL_POOL
from ..wire import Limits


class TransportError(RuntimeError):
    """A transport cannot be set up (bad endpoint, limits too low, ...)."""


@dataclass(frozen=True)
class TransportConfig:
    """Socket options and bounds; defaults suit a few thousand peers on one machine."""

    pool_size: int = SMALL_POOL  # outgoing DEALERs kept per peer (LRU)
    timeout_s: float = DEFAULT_TIMEOUT_S  # default per-pull timeout
    hwm: int = DEFAULT_HWM  # messages queued per socket before refusing: models are big
    limits: Limits = wire.DEFAULT_LIMITS
    check_sender: bool = True
    flood_share: float = DEFAULT_FLOOD_SHARE  # see net/admission.py; 1.0 answers everything


@dataclass
class Counters:
    """Traffic and outcome counters of one peer's transport."""

    msgs_in: int = 0
    msgs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pulls_ok: int = 0
    pulls_failed: int = 0
    served: int = 0
    #: why pulls I made failed: "timeout", "unknown_peer", "socket", "refused:<reason>", a WireError reason
    pull_failures: Counter = field(default_factory=Counter)
    #: why requests that reached my inbox got no model: WireError reasons, "not_ready", "dropped_hwm",
    #: "shed" (a stranger's message dropped unread: the flood budget was spent, net/admission.py);
    #: with CURVE also connections refused at the handshake: "auth" (key not in the roster),
    #: "handshake" (no key / plaintext, wrong server key, not ZeroMQ)
    refusals: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if not isinstance(v, Counter)}
        d["pull_failures"] = dict(self.pull_failures)
        d["refusals"] = dict(self.refusals)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Counters":
        c = cls(**{k: int(v) for k, v in d.items() if k not in ("pull_failures", "refusals")})
        c.pull_failures.update(d.get("pull_failures", {}))
        c.refusals.update(d.get("refusals", {}))
        return c


def routing_id(peer_id: int) -> bytes:
    """The identity a peer's pulling sockets present to an inbox."""
    return b"p%d" % peer_id
