"""Weighted sampling without replacement, draw for draw as numpy's ``Generator.choice``.

DAC draws its n peers with ``rng.choice(m, size=n, replace=False, p=p)``, as the paper's
reference code does. numpy answers that with a loop of array calls (``cumsum``,
``searchsorted``, ``unique`` per pass, one pass per new peer when p is peaked), each with
a fixed per-call cost that dominates at a few dozen peers, on the event loop of every
peer-round. This is the same algorithm on Python lists, which has no such cost. It consumes the generator exactly as numpy
does (the same ``rng.random`` calls) and returns the same indices in the same order, so
seeded runs stay bit-identical; ``tests/test_policies.py`` checks that against numpy.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

import numpy as np


def choice_by_weight(rng: np.random.Generator, p: Sequence[float] | np.ndarray, k: int) -> list[int]:
    """``rng.choice(len(p), size=k, replace=False, p=p)`` as a list, with the same draws.

    ``p`` must be a probability vector with at least ``k`` positive entries (DAC's draw
    guarantees both; numpy's own checks of p are not repeated here).
    """
    w = p.tolist() if isinstance(p, np.ndarray) else [float(v) for v in p]  # a copy: zeroed below
    found: list[int] = []
    while len(found) < k:
        # numpy's pass: fresh uniforms for the missing ones, the found ones zeroed, the
        # normalised running sum searched from the right, repeats dropped in draw order.
        x = rng.random(k - len(found)).tolist()
        for i in found:
            w[i] = 0.0
        cdf = list(accumulate(w))  # add.accumulate is sequential: the same sums
        total = cdf[-1]
        cdf = [c / total for c in cdf]
        new: set[int] = set()
        for u in x:
            i = bisect_right(cdf, u)
            if i not in new:  # a found one has zero width: it cannot come back
                new.add(i)
                found.append(i)
    return found
