"""Poisoned models: a malicious peer among honest ones, over real tcp sockets.

Six honest peers run DAC (``hosting.host_peers``); peer 6 is a hand-rolled server bound at
its endpoint in the directory that answers pings as a ready peer and every pull with a
poisoned model: NaN, +-Inf, a transposed shape, a missing or an extra tensor, the wrong
dtype, a value above ``network.max_abs``, or a valid model whose head claims to come from
another peer.  Each is refused by the puller (its structure by the decode on the event
loop, its values by the check in the compute thread) with its reason counted, never
averaged, never scored: the honest peers' accuracy is that of a run where peer 6 is
simply dead.  A second malicious server serves a valid but useless model claiming a
huge ``n_samples``: the cap keeps its share of every average at an equal share.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from pathlib import Path

import torch
import zmq
import zmq.asyncio

from zmqgossip import config, hosting, models, wire
from zmqgossip.checkpoint import load_checkpoint
from zmqgossip.metrics import summarize
from zmqgossip.net import make_directory
from zmqgossip.wire import Kind

HONEST = list(range(6))
EVIL = 6

#: poison -> the reason the puller's decode must count
POISONS = {
    "nan": "nonfinite", "shape": "schema", "magnitude": "magnitude", "sender": "sender",
    "inf": "nonfinite", "missing": "schema", "extra": "schema", "dtype": "schema", "neg_inf": "nonfinite",
}


def make_cfg(method: str = "dac", schedule: str = "async", **policy) -> config.ExperimentConfig:
    return config.validate({
        "name": "poisoned", "method": method, "schedule": schedule, "peers": 7, "rounds": 8, "seed": 3,
        "data": {"dataset": "digits", "n_train": 40, "n_val": 20, "test_per_class": 20},
        "train": {"model": "mlp", "epochs": 1, "lr": 3e-3, "test_every": 0, "checkpoint_every": 4},
        # tau = 1: an unscored peer keeps a fair chance to be drawn, so the poisoned one is
        # pulled again and again (with tau = 30 it would be dropped after round 0).
        "policy": {"n": 3, "tau": 1.0, **policy},
        "network": {"transport": "tcp", "timeout_s": 0.5, "max_abs": 1e4},
    })


def poisoned(kind: str, good: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    st = {k: v.clone() for k, v in good.items()}
    first, last = next(iter(st)), list(st)[-1]
    if kind == "nan":
        st[first].view(-1)[7] = float("nan")
    elif kind == "inf":
        st[last].view(-1)[0] = float("inf")
    elif kind == "neg_inf":
        st[first].view(-1)[-1] = float("-inf")
    elif kind == "shape":  # same bytes, another shape
        st[first] = st[first].reshape(st[first].shape[1], -1).t().contiguous().reshape(-1, st[first].shape[0] // 2)
    elif kind == "missing":
        del st[last]
    elif kind == "extra":
        st["backdoor.weight"] = torch.zeros(4, 4)
    elif kind == "dtype":
        st[first] = st[first].double()
    elif kind == "magnitude":
        st[first].view(-1)[3] = 1e6
    return st


async def malicious_server(ctx: zmq.asyncio.Context, endpoint: str, reply, served: Counter) -> None:
    """A raw ROUTER at ``endpoint``: pings get a ready/done status, pulls get ``reply(n, request_id)``."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    status = {"ready": True, "done": True, "finished": True, "step": 0}
    try:
        for n in itertools.count():
            rid, *frames = await sock.recv_multipart()
            req = wire.decode(frames, kinds=(Kind.PULL_REQUEST, Kind.PING))
            if req.kind is Kind.PING:
                await sock.send_multipart([rid, *wire.encode_request(EVIL, req.request_id, Kind.PONG, status)])
                continue
            kind, out = reply(n, req.request_id)
            served[kind] += 1
            await sock.send_multipart([rid, *out])
    finally:
        sock.close(0)


def run_honest(cfg: config.ExperimentConfig, out: Path, reply=None) -> tuple[dict, Counter]:
    """Run the honest peers with peer 6 malicious (``reply``) or dead (None)."""
    torch.set_num_threads(1)
    part = hosting.build_partition(cfg)
    rd = hosting.prepare_run(cfg, out, part)
    directory = make_directory("tcp", range(cfg.peers))
    served: Counter = Counter()

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        evil = None
        if reply is not None:
            evil = asyncio.create_task(malicious_server(ctx, directory[EVIL], reply, served))
        try:
            await hosting.host_peers(cfg, HONEST, directory, rd, t0=time.time(), part=part, ready_timeout_s=1.0)
        finally:
            if evil is not None:
                evil.cancel()
                await asyncio.gather(evil, return_exceptions=True)
            ctx.destroy(0)

    asyncio.run(asyncio.wait_for(main(), 60))
    return summarize(rd), served


def honest_state(cfg: config.ExperimentConfig) -> dict[str, torch.Tensor]:
    part = hosting.build_partition(cfg)
    torch.manual_seed(0)
    return models.build_model("mlp", part.input_shape, part.num_classes).state_dict()


def test_poisoned_models_are_refused_never_averaged_never_scored(tmp_path):
    """The reference code's sequential schedule, so both runs are reproducible: a refused
    poison and a pull from a dead peer leave exactly the same trace in the models."""
    cfg = make_cfg(schedule="sequential")
    good = honest_state(cfg)
    kinds = list(POISONS)

    def reply(n: int, request_id: int):
        kind = kinds[n % len(kinds)]
        if kind == "sender":  # a valid model, but the head says it is honest peer 1's
            return kind, wire.encode_model(good, sender=1, request_id=request_id, step=5, version=9, n_samples=40)
        return kind, wire.encode_model(poisoned(kind, good), sender=EVIL, request_id=request_id, step=5, version=9,
                                       n_samples=40)

    t = time.perf_counter()
    poisoned_run, served = run_honest(cfg, tmp_path / "poisoned", reply)
    t_poisoned = time.perf_counter() - t
    dead_run, _ = run_honest(cfg, tmp_path / "dead", None)
    print(f"\nserved poisons {dict(served)}; test acc poisoned {poisoned_run['test_acc']['mean']:.3f} "
          f"vs dead {dead_run['test_acc']['mean']:.3f}; runs {t_poisoned:.1f}s + {time.perf_counter() - t - t_poisoned:.1f}s")

    root = tmp_path / "poisoned"
    from zmqgossip.metrics import RunDir

    rd = RunDir(root)
    results = rd.results()
    # No honest peer crashed; all finished every round.
    assert sorted(results) == HONEST
    assert all(r["status"] == "done" and r["steps"] == cfg.rounds for r in results.values())
    assert poisoned_run["failed_peers"] == [EVIL]
    # Every poison served was refused with its reason, and counted.
    assert sum(served.values()) >= 8 and len(served) >= 4, served
    failures = Counter()
    for r in results.values():
        failures.update(r["counters"]["pull_failures"])
    want = Counter()
    for kind, count in served.items():
        want[POISONS[kind]] += count
    assert failures == want, (failures, want)
    # Never averaged: peer 6 is in no event's pulled list, mix or loss.
    events = [e for pid in HONEST for e in rd.events(pid)]
    assert len(events) == len(HONEST) * cfg.rounds
    chose_evil = [e for e in events if EVIL in e.chosen]
    assert len(chose_evil) == sum(served.values())
    for e in events:
        assert EVIL not in e.ok
        assert len(e.mix) == len(e.ok) + 1 and len(e.loss) == len(e.ok)
        if EVIL in e.chosen:
            assert e.failed[str(EVIL)] in set(POISONS.values())
    # Never scored: DAC's score, pull count (and so its published score row) for peer 6 stay 0.
    for pid in HONEST:
        _, meta = load_checkpoint(rd.checkpoint_path(pid))
        others = [p for p in range(cfg.peers) if p != pid]
        col = others.index(EVIL)
        assert meta["policy"]["s"][col] == 0.0 and meta["policy"]["c"][col] == 0
        assert all(v > 0 for k, v in enumerate(meta["policy"]["s"]) if meta["policy"]["c"][k])
    # Accuracy exactly as if peer 6 were dead: peer by peer, best-validation and final.
    dead = RunDir(tmp_path / "dead").results()
    for pid in HONEST:
        assert results[pid]["test_acc"] == dead[pid]["test_acc"], pid
        assert results[pid]["final_test_acc"] == dead[pid]["final_test_acc"], pid
    assert poisoned_run["test_acc"]["mean"] > 0.6


def test_a_huge_n_samples_claim_cannot_dominate_the_mix(tmp_path):
    """Peer 6 serves a valid but useless model (all zeros) claiming 2**62 samples.
    Random gossip keeps pulling it.  Capped (``policy.max_sample_ratio = 1``, the default)
    it gets an equal share of each average it enters; with the cap lifted to 1e6 it takes
    nearly all of it, and the honest peers learn far less."""
    good = honest_state(make_cfg("random"))
    junk = {k: torch.zeros_like(v) for k, v in good.items()}

    def reply(n: int, request_id: int):
        return "liar", wire.encode_model(junk, sender=EVIL, request_id=request_id, step=1, version=n + 1,
                                         n_samples=2**62)

    from zmqgossip.metrics import RunDir

    out = {}
    for name, ratio in (("capped", 1.0), ("uncapped", 1e6)):
        summary, served = run_honest(make_cfg("random", max_sample_ratio=ratio), tmp_path / name, reply)
        rd = RunDir(tmp_path / name)
        with_liar = [e for pid in HONEST for e in rd.events(pid) if EVIL in e.ok]
        assert len(with_liar) >= 5 and served["liar"] == len(with_liar)
        assert all(r["status"] == "done" for r in rd.results().values())
        shares = [e.mix[1 + e.ok.index(EVIL)] for e in with_liar]
        out[name] = (summary["final_test_acc"]["mean"], shares, with_liar)
    acc_c, shares_c, events_c = out["capped"]
    acc_u, shares_u, _ = out["uncapped"]
    print(f"\nliar's share of the mix: capped max {max(shares_c):.3f}, uncapped min {min(shares_u):.6f}; "
          f"final test acc capped {acc_c:.3f} vs uncapped {acc_u:.3f}")
    for e, share in zip(events_c, shares_c):
        assert share <= 1.0 / len(e.mix) + 1e-9, e.mix  # no more than an equal share
        assert abs(e.mix[0] - share) < 1e-9  # the puller's own model weighs as much
    assert min(shares_u) > 0.99  # what the claim would buy without the cap
    assert acc_c > acc_u + 0.1, (acc_c, acc_u)
