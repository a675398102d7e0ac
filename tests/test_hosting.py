"""The hosting path: a resumed peer is exactly the peer that was checkpointed; the
sequential schedule draws a fresh order each round; the report after a resume counts
what summary.json counts."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from zmqgossip import config, hosting, report
from zmqgossip.hosting.scenario import Scenario
from zmqgossip.metrics import Event, RunDir, summarize
from zmqgossip.net import make_directory


def tiny(method: str = "dac-var", **over) -> config.ExperimentConfig:
    raw = {
        "name": "hosting", "method": method, "peers": 6, "rounds": 4, "schedule": "sequential", "seed": 5,
        "data": {"dataset": "digits", "shift": "label", "n_train": 24, "n_val": 10, "test_per_class": 10},
        "train": {"epochs": 1, "lr": 3e-3, "test_every": 2, "checkpoint_every": 1, "checkpoint_min_s": 0},
        "policy": {"n": 2},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return config.validate(raw)


def _snapshot(p) -> dict:
    """Everything a resume must bring back, as plain values."""
    return {
        "policy": p.policy.state(),
        "weights": p.policy.sampling_weights(),
        "step": p.state.step,
        "state": dict(vars(p.state)),
        "counters": p.transport.counters.as_dict(),
        "model": {k: v.clone() for k, v in p.model.state_dict().items()},
        "best": None if p.checkpoint.best_state is None else {k: v.clone() for k, v in p.checkpoint.best_state.items()},
        "best_loss": p.checkpoint.best_loss,
        "best_step": p.checkpoint.best_step,
        "generator": p.generator.get_state().clone(),
    }


def _same(a: dict, b: dict) -> None:
    assert a["policy"] == b["policy"]
    assert a["weights"] == b["weights"]
    assert a["step"] == b["step"] and a["state"] == b["state"]
    assert a["counters"] == b["counters"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (a["best"] is None) == (b["best"] is None)
    if a["best"] is not None:
        assert all(torch.equal(a["best"][k], b["best"][k]) for k in a["best"])
    assert (a["best_loss"], a["best_step"]) == (b["best_loss"], b["best_step"])
    assert torch.equal(a["generator"], b["generator"])


@pytest.mark.parametrize("method", ["dac-var", "pens"])
def test_a_resumed_peer_goes_on_from_exactly_what_its_checkpoint_holds(tmp_path, run_async, method):
    """Peers take 3 real updates over inproc sockets and checkpoint; fresh peers built from
    the same config resume through the hosting path's resume. Model, best checkpoint,
    policy (scores, counts, weights, its step and random state), peer state, counters and
    the training generator all equal the originals, and the next draw of each policy is
    the same peers. (Adam is fresh every round, as in the paper: no optimizer state.)"""
    cfg = tiny(method)
    torch.set_num_threads(1)
    part = hosting.build_partition(cfg)
    rd = hosting.prepare_run(cfg, tmp_path / "run", part)
    ids = list(range(cfg.peers))
    before: dict[int, dict] = {}
    next_draw: dict[int, list[int]] = {}

    async def first() -> None:
        hosted = hosting.build_peers(cfg, part, ids, make_directory("inproc", ids), rd, time.time())
        try:
            for p in hosted.peers.values():
                await p.transport.start()
            for p in hosted.peers.values():
                await p.warmup()
            for _ in range(3):
                for p in hosted.peers.values():
                    await p.step()
            for pid, p in hosted.peers.items():
                p.save(p.checkpoint_path)
                before[pid] = _snapshot(p)
                state = p.policy.rng.bit_generator.state
                next_draw[pid] = p.policy.choose()
                p.policy.rng.bit_generator.state = state
        finally:
            await hosted.close()

    async def second() -> None:
        hosted = hosting.build_peers(cfg, part, ids, make_directory("inproc", ids), rd, time.time())
        scenario = Scenario(cfg, hosted.peers, None, None, None)
        try:
            for pid, p in hosted.peers.items():
                fresh = _snapshot(p)
                if method.startswith("dac"):  # nothing learned yet: a resume that skipped the policy would show
                    assert fresh["policy"] != before[pid]["policy"]
                await scenario.resume(p, done=False)
                assert p.resumed_from == 3 and p.state.status == "running"
                after = _snapshot(p)
                after["state"]["status"] = before[pid]["state"]["status"]
                # Resuming publishes the restored model once: one version more, and the
                # snapshot's compute time on top of the restored total.
                assert after["state"].pop("version") == before[pid]["state"]["version"] + 1
                assert after["state"].pop("compute_s") >= before[pid]["state"]["compute_s"]
                after["state"]["version"] = before[pid]["state"]["version"]
                after["state"]["compute_s"] = before[pid]["state"]["compute_s"]
                _same(before[pid], after)
                assert p.policy.choose() == next_draw[pid]
        finally:
            await hosted.close()

    run_async(first(), timeout=120)
    run_async(second(), timeout=120)


def test_the_sequential_schedule_draws_a_fresh_random_order_every_round(tmp_path):
    """The reference code shuffles its clients every round: the order of updates in each
    round is a permutation of all peers, it differs from round to round, and it is not
    simply ascending ids. It is the seed's: a second run gives the same orders."""
    cfg = tiny("random", peers=8, rounds=6, train={"checkpoint_every": 0, "test_every": 0})

    def orders(out) -> list[list[int]]:
        seen: list[Event] = []
        hosting.run_experiment(cfg, out, on_event=seen.append)
        by_round: dict[int, list[int]] = {}
        for e in seen:
            by_round.setdefault(e.step, []).append(e.peer)
        return [by_round[r] for r in range(cfg.rounds)]

    a = orders(tmp_path / "a")
    assert all(sorted(o) == list(range(cfg.peers)) for o in a)
    assert len({tuple(o) for o in a}) == cfg.rounds  # a fresh order each round
    assert all(o != sorted(o) for o in a)
    assert orders(tmp_path / "b") == a
    rng = np.random.default_rng([cfg.seed, 2**31 - 1])  # the schedule's own generator, as documented
    assert a == [rng.permutation(cfg.peers).tolist() for _ in range(cfg.rounds)]


def test_after_a_resume_the_report_counts_each_step_once_like_the_summary(tmp_path):
    """A resumed peer runs again the steps after its checkpoint, so its event file holds
    some steps twice. summary.json and the report both read events through RunDir and
    count the re-run step once (its last line)."""
    cfg = tiny("dac-var", train={"checkpoint_every": 0, "test_every": 0})
    out = tmp_path / "run"
    hosting.run_experiment(cfg, out)
    rd = RunDir(out)
    # Append re-runs of steps 2 and 3 of peer 0 (as a resume after a checkpoint at step 2 writes them).
    rerun = [e for e in rd.events(0) if e.step >= 2]
    for e in rerun:
        rd.append_event(0, Event(**{**e.as_dict(), "ok": [1], "chosen": [1]}))
    rd.close()
    lines = (out / "events" / "peer-0.jsonl").read_text().splitlines()
    assert len(lines) == cfg.rounds + len(rerun)
    s = summarize(rd)
    events = report.load_events(out)
    assert [e.step for e in events[0]] == list(range(cfg.rounds))  # once each, in order
    assert sum(len(v) for v in events.values()) == s["peer_rounds"] == cfg.peers * cfg.rounds
    m = report.pull_counts(out)
    once = sum(len(e.ok) for evs in events.values() for e in evs)
    every_line = once + sum(len(e.ok) for e in rerun)
    assert int(m.sum()) == once < every_line
    assert m[0, 1] >= len(rerun) and np.array_equal(m, np.asarray(rd.pulls()["counts"]))
    # Rebuilt from the events (no pulls.json): the same matrix.
    (out / "pulls.json").unlink()
    assert np.array_equal(report.pull_counts(out), m)


def test_run_experiment_takes_a_place(tmp_path):
    """A place is where workers run; the run directory and summary do not depend on it."""
    cfg = tiny("random", schedule="async", train={"checkpoint_every": 0, "test_every": 0})

    class Counting(hosting.Tasks):
        calls = 0

        def host(self, *a, **kw):  # the real in-process place, counted
            Counting.calls += 1
            return super().host(*a, **kw)

    s = hosting.run_experiment(cfg, tmp_path / "run", place=Counting())
    assert Counting.calls == 1
    assert s["failed_peers"] == [] and s["peer_rounds"] == cfg.peers * cfg.rounds


def test_liveness_rules_name_their_phases():
    from zmqgossip.hosting import liveness

    start = liveness.at_start(300.0)
    assert start.silent_s == 300.0 and start.cut_needs_answer and start.cut_s == liveness.GONE_WHEN_CUT_S
    end = liveness.at_end(10.0)
    assert end.silent_s == 30.0 and not end.cut_needs_answer
    assert liveness.AT_ONCE.silent_s == 0.0


def test_workers_split_peers_contiguously():
    assert hosting.split_peers(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert hosting.split_peers(2, 2) == [[0], [1]]
