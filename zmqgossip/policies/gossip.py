"""Random gossip: pull n peers chosen uniformly at random, average by data size."""

from __future__ import annotations

from .base import Policy


class RandomGossip(Policy):
    name = "random"

    def choose(self) -> list[int]:
        return self.uniform(self.n)
