"""Local training only: the floor every collaborative method must beat."""

from __future__ import annotations

from .base import Policy


class Local(Policy):
    name = "local"

    def choose(self) -> list[int]:
        return []
