"""DAC against a plain-numpy transcription of the reference rules (the seven steps in
``zmqgossip/policies/dac.py``'s docstring).

A real sequential run (real sockets, real data) logs, for every update, the peers it drew
and the losses it measured.  The transcription below replays those losses through the
seven rules written out independently of ``zmqgossip.policies.dac`` and must draw the same
peers in the same order at every step and end with the same sampling weights for every
client: any drift from the paper's algorithm fails here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from zmqgossip import config, hosting

FLOOR = 1e-6  # documented loss floor (numerical safety the reference lacks)


def _tau(tau: float, t: int, variable: bool) -> float:
    return 2 * tau / (1 + math.exp(-0.2 * t)) - tau + 1 if variable else tau


def _draw(rng: np.random.Generator, others: np.ndarray, p: np.ndarray | None, n: int) -> list[int]:
    if p is None:  # round 0: uniform
        return [int(x) for x in rng.choice(others, size=n, replace=False)]
    nz = np.flatnonzero(p > 0)
    if len(nz) >= n:
        idx = rng.choice(len(others), size=n, replace=False, p=p)
    else:  # documented fill: all non-zero ones, then uniform from the rest
        first = rng.choice(nz, size=len(nz), replace=False, p=p[nz] / p[nz].sum())
        rest = np.setdiff1d(np.arange(len(others)), nz)
        idx = np.concatenate([first, rng.choice(rest, size=n - len(nz), replace=False)])
    return [int(others[i]) for i in idx]


def replay(events: list[dict], peers: int, n: int, tau: float, variable: bool, seed: int) -> dict[int, np.ndarray]:
    """The reference rules, step by step; returns p_i over all clients (p_ii = 0)."""
    s = np.zeros((peers, peers))
    c = np.zeros((peers, peers), dtype=int)
    p: dict[int, np.ndarray | None] = {i: None for i in range(peers)}
    t = {i: 0 for i in range(peers)}
    rngs = {i: np.random.default_rng([seed, i]) for i in range(peers)}
    for ev in events:
        i = ev["peer"]
        others = np.array([j for j in range(peers) if j != i])
        pi = None if t[i] == 0 else p[i][others]
        assert _draw(rngs[i], others, pi, n) == ev["chosen"], f"peer {i} step {ev['step']}: draw differs"
        pulled, losses = ev["ok"], ev["loss"]
        for k in pulled:  # rule 2: counts before the two-hop rule
            c[i, k] += 1
        for k, loss in zip(pulled, losses):  # rule 3
            s[i, k] = 1.0 / max(loss, FLOOR)
        for j in range(peers):  # rule 4
            if j == i or c[i, j] != 0:
                continue
            informed = [(s[i, k], d, k) for d, k in enumerate(pulled) if s[k, j] > 0]
            if informed:
                _, _, best = max(informed)  # largest s_i[k]; ties: later in draw order
                s[i, j] = s[best, j]
        z = _tau(tau, t[i], variable) * s[i, others]  # rules 5-6
        e = np.exp(z - z.max())
        full = np.zeros(peers)
        full[others] = e / e.sum()
        p[i] = full
        t[i] += 1
    return {i: v for i, v in p.items() if v is not None}


@pytest.mark.parametrize("method", ["dac", "dac-var"])
def test_sequential_dac_matches_the_reference_rules_step_by_step(tmp_path, method):
    cfg = config.validate({
        "name": "reference", "method": method, "schedule": "sequential", "peers": 10, "rounds": 6, "seed": 3,
        "data": {"dataset": "digits", "shift": "label", "n_train": 30, "n_val": 10, "test_per_class": 20},
        "train": {"epochs": 1, "lr": 3e-3, "test_every": 0, "checkpoint_every": 0},
        "policy": {"n": 3, "tau": 30},
    })
    hosting.run_experiment(cfg, tmp_path / "run")
    events = []
    for f in (tmp_path / "run" / "events").glob("peer-*.jsonl"):
        events += [json.loads(line) for line in f.read_text().splitlines()]
    events.sort(key=lambda e: e["t"])  # the sequential schedule's global order
    assert len(events) == 60 and all(len(e["ok"]) == 3 for e in events)
    ref = replay(events, 10, 3, 30.0, method == "dac-var", seed=3)
    for i in range(10):
        got = json.loads((tmp_path / "run" / "peers" / f"peer-{i}.json").read_text())["sampling_weights"]
        ours = np.array([got.get(str(j), 0.0) for j in range(10)])
        np.testing.assert_allclose(ours, ref[i], rtol=1e-9, atol=1e-12, err_msg=f"peer {i}")
