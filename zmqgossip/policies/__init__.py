"""Who to pull from and how to mix: one small class per method of the DAC paper."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from .base import Policy, Pulled
from .dac import DAC, DAC_PLUS, DACOptions, softmax_weights, tau_schedule
from .gossip import RandomGossip
from .local import Local
from .oracle import Oracle
from .pens import PENS

METHODS = ("local", "random", "oracle", "pens", "dac", "dac-var", "dac-plus")

__all__ = [
    "DAC", "DAC_PLUS", "DACOptions", "PENS", "Local", "METHODS", "Oracle", "Policy", "Pulled", "RandomGossip",
    "make_policy", "softmax_weights", "tau_schedule",
]


def make_policy(
    method: str,
    me: int,
    peers: Sequence[int],
    *,
    n: int,
    rng: np.random.Generator,
    clusters: Mapping[int, int],
    tau: float = 30.0,
    similarity_weighted: bool = False,
    pens_sampled: int | None = None,
    pens_phase1_rounds: int = 10,
    dac_options: Mapping[str, object] | None = None,
) -> Policy:
    """Build the policy named on the command line / in a config.

    ``dac_options``: DAC's options beyond the paper (:class:`DACOptions` fields); a field
    left out or None is the method's own: off for dac and dac-var, ``DAC_PLUS`` for dac-plus.
    """
    if method == "local":
        return Local(me, peers, n, rng)
    if method == "random":
        return RandomGossip(me, peers, n, rng)
    if method == "oracle":
        return Oracle(me, peers, n, rng, clusters=clusters)
    if method == "pens":
        return PENS(me, peers, n, rng, sampled=pens_sampled, phase1_rounds=pens_phase1_rounds)
    if method in ("dac", "dac-var", "dac-plus"):
        base = DAC_PLUS if method == "dac-plus" else DACOptions()
        given = {k: v for k, v in (dac_options or {}).items() if v is not None}
        options = dataclasses.replace(base, **given)  # type: ignore[arg-type]
        return DAC(me, peers, n, rng, tau=tau, variable=method != "dac", similarity_weighted=similarity_weighted,
                   options=options, name=method)
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
