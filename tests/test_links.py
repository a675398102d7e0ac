"""Link emulation over real sockets: latency, bandwidth, loss, partitions, kills, late joiners.

Two levels: :meth:`Links.plan` drawn many times for the shape of a distribution (cheap,
exact), and real pulls through :class:`Transport` (inproc, one event loop) for what a
peer actually sees.  The scenario tests run DAC / gossip peers with ``hosting.run_experiment``
and read the run directory's events: every event line says when its pulls started
(``t - dt``), how long they took (``pull_s``) and which succeeded (``ok``).

Links direct a message's profile by its receiver's class first (then the sender's), so
putting the server in a class with a delay and the pullers in an ideal class delays the
requests only; the reverse delays the replies only.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time

import numpy as np
import pytest
import torch

from zmqgossip import config, hosting
from zmqgossip.links import Latency, LinkProfile, Links, LinkStats, NetworkEmulation
from zmqgossip.metrics import RunDir
from zmqgossip.net import make_directory
from zmqgossip.wire import ModelPayload

from _helpers import close_all, started

SERVER = 0


# ------------------------------------------------------------------ helpers


def emulation(server_profile: dict | None = None, puller_profile: dict | None = None, *, pullers=(),
              default: dict | None = None) -> NetworkEmulation:
    classes = []
    if server_profile is not None:
        classes.append({"peers": [SERVER], "profile": server_profile})
    if puller_profile is not None:
        classes.append({"peers": list(pullers), "profile": puller_profile})
    return NetworkEmulation.model_validate({"default": default or {}, "classes": classes})


def payload_of(nbytes: int) -> ModelPayload:
    state = {"w": torch.randn(max(1, nbytes // 4), generator=torch.Generator().manual_seed(0))}
    return ModelPayload.build(state, step=0, version=1, n_samples=1)


def lognormal_quantiles(mean: float, std: float, qs) -> list[float]:
    s2 = math.log1p((std / mean) ** 2)
    mu = math.log(mean) - s2 / 2
    return [math.exp(mu + math.sqrt(s2) * statistics.NormalDist().inv_cdf(q)) for q in qs]


def dac_cfg(method: str = "dac", *, peers: int = 10, rounds: int = 4, schedule: str = "async",
            seconds: float | None = None, links: dict | None = None, network: dict | None = None,
            seed: int = 0, **sections) -> config.ExperimentConfig:
    raw = {
        "name": "links", "method": method, "peers": peers, "rounds": rounds, "schedule": schedule, "seed": seed,
        "data": {"dataset": "digits", "shift": "label", "n_train": 20, "n_val": 10, "test_per_class": 30},
        "train": {"model": "mlp", "epochs": 1, "lr": 3e-3, "test_every": 0},
        "policy": {"n": 3},
        "network": {"timeout_s": 0.5, **(network or {})},
        "links": links or {},
    }
    if seconds is not None:
        raw["seconds"] = seconds
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return config.validate(raw)


def pulls_of(rd: RunDir, peers: int) -> list[tuple[int, int, float, float]]:
    """(puller, pulled, pull start, pull end) of every successful pull, times from t0."""
    out = []
    for i in range(peers):
        for e in rd.events(i):
            start = e.t - e.dt
            for j in e.ok:
                out.append((i, j, start, start + e.pull_s))
    return out


# ------------------------------------------------------------------ latency


QS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


@pytest.mark.parametrize(
    "latency, expected",
    [
        ({"dist": "constant", "mean_ms": 50, "jitter_ms": 10}, lambda q: 50 + 10 * q),
        ({"dist": "uniform", "low_ms": 10, "high_ms": 30}, lambda q: 10 + 20 * q),
        ({"dist": "normal", "mean_ms": 40, "std_ms": 5}, lambda q: statistics.NormalDist(40, 5).inv_cdf(q)),
        ({"dist": "lognormal", "mean_ms": 50, "std_ms": 30}, None),
    ],
    ids=["constant+jitter", "uniform", "normal", "lognormal"],
)
def test_planned_delays_follow_the_configured_distribution(latency, expected):
    links = Links(NetworkEmulation(default=LinkProfile(latency=Latency(**latency))), 4, seed=1)
    n = 20_000
    delays = np.array([links.plan(i % 3, 3, 1000)[1] for i in range(n)]) * 1e3
    want = [expected(q) for q in QS] if expected else lognormal_quantiles(50, 30, QS)
    got = np.quantile(delays, QS)
    np.testing.assert_allclose(got, want, rtol=0.03, atol=0.3)
    if latency["dist"] == "lognormal":  # mean and std are those of the delay itself
        assert delays.mean() == pytest.approx(50, rel=0.03) and delays.std() == pytest.approx(30, rel=0.06)
    assert links.stats.delivered == n and links.stats.dropped == 0


@pytest.mark.parametrize("dist", ["uniform", "lognormal"])
def test_real_pulls_are_delayed_by_the_configured_distribution(dist, actx, run_async):
    """200 pulls (40 pullers x 5, after one warm-up pull each that also connects) whose
    requests cross a delayed link while the replies are ideal: a pull's latency is its
    request's delay plus the transport's own cost (small when idle, larger when 40 pulls wake
    at once on a busy machine).

    Measured quantiles sit just above those of the delays the emulator drew for these very
    requests (so no request waited for another), and those draws follow the configured
    distribution (within the sampling error of 200 draws; the shape is tested exactly on
    20,000 draws above)."""
    lat = {"dist": "uniform", "low_ms": 20, "high_ms": 60} if dist == "uniform" else \
          {"dist": "lognormal", "mean_ms": 40, "std_ms": 15}
    pullers = range(1, 41)
    links = Links(emulation({"latency": lat}, {}, pullers=pullers), 41, seed=2)
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    want = np.array([20 + 40 * q for q in qs] if dist == "uniform" else lognormal_quantiles(40, 15, qs))

    async def body() -> list[float]:
        ts = await started(actx, make_directory("inproc", range(41)), range(41), links=links)
        ts[SERVER].publish(payload_of(1024))
        try:
            async def puller(i: int, n: int) -> list[float]:
                out = []
                for _ in range(n):
                    r = await ts[i].pull(SERVER)
                    assert r.ok, r
                    out.append(r.latency_s * 1e3)
                return out

            await asyncio.gather(*(puller(i, 1) for i in pullers))  # connect
            links.stats = LinkStats()
            return [x for xs in await asyncio.gather(*(puller(i, 5) for i in pullers)) for x in xs]
        finally:
            await close_all(ts)

    measured = run_async(body(), 30)
    planned = [d for d in links.stats.delays_ms if d > 0]  # the requests' (replies are ideal: 0)
    got, drawn = np.quantile(measured, qs), np.quantile(planned, qs)
    print(f"{dist}: measured {got.round(1)} ms, drawn {drawn.round(1)} ms, configured {want.round(1)} ms")
    assert len(measured) == len(planned) == 200
    assert np.all(got >= drawn - 0.5) and np.all(got <= drawn + 10.0)
    np.testing.assert_allclose(drawn, want, rtol=0.12)


@pytest.mark.parametrize("direction", ["request", "reply"])
def test_each_message_is_delayed_from_its_own_send_time(direction, actx, run_async):
    """Two pulls 50 ms apart over a 200 ms link complete ~50 ms apart, not 200: a delayed
    message never waits behind an earlier delayed one (the server's replies included)."""
    slow = {"latency": {"dist": "constant", "mean_ms": 200}}
    em = emulation(slow, {}, pullers=[1, 2]) if direction == "request" else emulation({}, slow, pullers=[1, 2])
    links = Links(em, 3, seed=0)

    async def body() -> tuple[float, float, float, float]:
        ts = await started(actx, make_directory("inproc", range(3)), range(3), links=links)
        ts[SERVER].publish(payload_of(1024))
        try:
            t0 = time.perf_counter()

            async def pull_at(i: int, at: float) -> tuple[float, float]:
                await asyncio.sleep(at)
                r = await ts[i].pull(SERVER)
                assert r.ok, r
                return time.perf_counter() - t0, r.latency_s

            (done_a, lat_a), (done_b, lat_b) = await asyncio.gather(pull_at(1, 0.0), pull_at(2, 0.05))
            return done_a, done_b, lat_a, lat_b
        finally:
            await close_all(ts)

    done_a, done_b, lat_a, lat_b = run_async(body(), 20)
    print(f"{direction}: pulls done at {done_a * 1e3:.0f} and {done_b * 1e3:.0f} ms, latencies "
          f"{lat_a * 1e3:.0f} and {lat_b * 1e3:.0f} ms")
    assert 0.199 <= lat_a <= 0.26 and 0.199 <= lat_b <= 0.26
    assert 0.03 <= done_b - done_a <= 0.09


# ------------------------------------------------------------------ bandwidth


def test_planned_bandwidth_is_a_token_bucket_per_directed_link():
    links = Links(NetworkEmulation(default=LinkProfile(bandwidth_mbps=10)), 3, seed=0)
    ten_mb = 10_000_000
    assert links.plan(0, 1, ten_mb, now=100.0)[1] == pytest.approx(8.0)  # 10 MB over 10 Mbit/s
    assert links.plan(0, 1, ten_mb, now=100.0)[1] == pytest.approx(16.0)  # queued behind the first
    assert links.plan(1, 0, ten_mb, now=100.0)[1] == pytest.approx(8.0)  # the other direction is free
    assert links.plan(0, 1, ten_mb, now=130.0)[1] == pytest.approx(8.0)  # idle again later


def test_a_bandwidth_limited_pull_takes_size_over_bandwidth(actx, run_async):
    """1 MB over 80 Mbit/s: 0.1 s on top of the same pull over an ideal link (within 10%)."""
    payload = payload_of(1_000_000)
    expected = payload.nbytes * 8 / 80e6

    async def pulls(links: Links | None) -> float:
        ts = await started(actx, make_directory("inproc", range(2)), range(2), links=links)
        ts[SERVER].publish(payload)
        try:
            lat = []
            for _ in range(4):
                r = await ts[1].pull(SERVER)
                assert r.ok and r.nbytes >= payload.nbytes, r
                lat.append(r.latency_s)
            return statistics.median(lat[1:])  # the first one also connects
        finally:
            await close_all(ts)

    ideal = run_async(pulls(None), 20)
    limited = run_async(pulls(Links(NetworkEmulation(default=LinkProfile(bandwidth_mbps=80)), 2, seed=0)), 20)
    print(f"1 MB pull: ideal {ideal * 1e3:.1f} ms, at 80 Mbit/s {limited * 1e3:.1f} ms, "
          f"expected extra {expected * 1e3:.1f} ms")
    assert limited - ideal == pytest.approx(expected, rel=0.10)


# ------------------------------------------------------------------ loss, duplication, partitions (plan)


def test_planned_loss_and_duplication_rates():
    links = Links(NetworkEmulation(default=LinkProfile(loss=0.3, duplicate=0.1)), 10, seed=5)
    n = 20_000
    copies = np.array([links.plan(i % 10, (i + 1) % 10, 100)[0] for i in range(n)])
    lost = float(np.mean(copies == 0))
    dup = float(np.mean(copies[copies > 0] == 2))
    assert lost == pytest.approx(0.3, abs=0.015)
    assert dup == pytest.approx(0.1, abs=0.01)
    s = links.stats
    assert s.dropped == int(np.sum(copies == 0)) and s.duplicated == int(np.sum(copies == 2))


def test_planned_partition_drops_only_across_groups_until_healed():
    links = Links(NetworkEmulation(), 6, seed=0)
    links.partition([[0, 1], [2, 3]])  # 4 and 5 are in no group: a group of their own
    assert links.plan(0, 1, 10)[0] == 1 and links.plan(2, 3, 10)[0] == 1 and links.plan(4, 5, 10)[0] == 1
    assert links.plan(0, 2, 10)[0] == 0 and links.plan(3, 1, 10)[0] == 0 and links.plan(4, 0, 10)[0] == 0
    assert links.stats.partitioned == 3
    links.heal()
    assert all(links.plan(a, b, 10)[0] == 1 for a in range(6) for b in range(6) if a != b)


def test_same_seed_same_fates_per_link():
    def fates(seed: int) -> list:
        em = NetworkEmulation(default=LinkProfile(latency=Latency(dist="lognormal", mean_ms=20, std_ms=10), loss=0.2))
        links = Links(em, 5, seed)
        return [links.plan(i % 5, (i * 3 + 1) % 5, 1000) for i in range(500) if i % 5 != (i * 3 + 1) % 5]

    assert fates(7) == fates(7) and fates(7) != fates(8)


# ------------------------------------------------------------------ DAC under lossy links


def test_dac_with_30_percent_loss_finishes_with_all_peers_done(tmp_path):
    """Requests and replies are each lost with p=0.3: about 1 - 0.7^2 = 51% of pulls fail
    (a lost message ends in the pull's timeout), and every peer still does all its rounds."""
    cfg = dac_cfg("dac", peers=10, rounds=4, links={"default": {"loss": 0.3}}, network={"timeout_s": 0.3})
    s = hosting.run_experiment(cfg, tmp_path)
    rd = RunDir(tmp_path)
    assert s["failed_peers"] == [] and s["peer_rounds"] == 10 * 4
    assert all(r["status"] == "done" and r["steps"] == 4 for r in rd.results().values())
    failed = s["pulls_failed"] / (s["pulls_ok"] + s["pulls_failed"])
    print(f"pulls ok {s['pulls_ok']}, failed {s['pulls_failed']} ({failed:.0%})")
    assert 0.3 <= failed <= 0.72
    stats = json.loads((tmp_path / "links-0.json").read_text())
    assert stats["dropped"] / stats["messages"] == pytest.approx(0.3, abs=0.1)


def test_dac_label_shift_with_lognormal_latency_loss_and_slow_peers_still_clusters(tmp_path):
    """The label-digits preset, reduced (20 peers, 12 rounds): lognormal latency (mean 20 ms),
    20% loss, peers 0-2 five times slower. Within-cluster pulls over the last 20% of rounds
    still >= 0.8."""
    cfg = config.load("label-digits", [
        "rounds=12", "data.n_train=30", "data.n_val=10", "train.epochs=2", "train.test_every=0",
        "network.timeout_s=0.4", "compute.slow_peers=[0, 1, 2]", "compute.slow_factor=5",
        "links.default.loss=0.2",
        "links.default.latency={dist = 'lognormal', mean_ms = 20, std_ms = 10}",
    ])
    s = hosting.run_experiment(cfg, tmp_path)
    w = s["within_cluster_pull_fraction"]
    print(f"within all {w['all']:.3f}, last 20% {w['last_20pct']:.3f}, pulls ok {s['pulls_ok']} "
          f"failed {s['pulls_failed']}, test acc {s['test_acc']['mean']:.3f}, wall {s['wall_s']:.1f}s")
    assert s["failed_peers"] == [] and s["peer_rounds"] == 20 * 12
    assert s["pulls_failed"] > 0
    assert w["last_20pct"] >= 0.8


# ------------------------------------------------------------------ scenarios


def test_partition_stops_cross_group_pulls_until_healed(tmp_path):
    """Gossip (uniform choice, so cross-group pulls are frequent) with the network split in
    two from 1.5 s to 3.5 s: no pull across the split completes while it holds."""
    groups = [list(range(0, 5)), list(range(5, 10))]
    cut, heal = 1.5, 3.5
    cfg = dac_cfg("random", peers=10, rounds=1000, seconds=5.5, network={"timeout_s": 0.3}, links={"scenario": [
        {"at_s": cut, "action": "partition", "groups": groups},
        {"at_s": heal, "action": "heal"},
    ]})
    s = hosting.run_experiment(cfg, tmp_path)
    rd = RunDir(tmp_path)
    side = {p: g for g, members in enumerate(groups) for p in members}
    windows = {"before": (0.0, cut), "partitioned": (cut + 0.05, heal), "healed": (heal + 0.05, 99.0)}
    cross = {k: 0 for k in windows}
    same = {k: 0 for k in windows}
    for i, j, _, end in pulls_of(rd, 10):
        for k, (a, b) in windows.items():
            if a <= end < b:
                (cross if side[i] != side[j] else same)[k] += 1
    print(f"cross-group pulls {cross}, same-group {same}")
    assert s["failed_peers"] == []
    assert cross["partitioned"] == 0
    assert cross["before"] > 0 and cross["healed"] > 0
    assert same["partitioned"] > 0  # the groups go on inside themselves
    stats = json.loads((tmp_path / "links-0.json").read_text())
    assert stats["partitioned"] > 0


def test_killed_peers_stop_answering_and_the_rest_finish(tmp_path):
    kill_at = 1.5
    victims = [2, 7]
    cfg = dac_cfg("random", peers=10, rounds=1000, seconds=4.0, network={"timeout_s": 0.3},
                  links={"scenario": [{"at_s": kill_at, "action": "kill", "peers": victims}]})
    s = hosting.run_experiment(cfg, tmp_path)
    rd = RunDir(tmp_path)
    # The kill takes effect when the event loop gets to it, late on a busy machine: the
    # summary's scenario log says when.  No pull that starts after it may reach a victim
    # (one already answered may still be read a moment later by a busy puller).
    [applied] = s["scenario"]
    assert applied["action"] == "kill" and applied["here"] == victims and applied["applied_s"] >= kill_at
    killed_at = applied["applied_s"]
    pulls = pulls_of(rd, 10)
    late_ok = [(i, j, start) for i, j, start, _ in pulls if j in victims and start > killed_at]
    early_ok = [(i, j) for i, j, _, end in pulls if j in victims and end < kill_at]
    failed_at_victims = [why for i in range(10) if i not in victims for e in rd.events(i)
                         if e.t > killed_at + 0.5 for j, why in e.failed.items() if int(j) in victims]
    print(f"pulls of the victims before the kill {len(early_ok)}, after {len(late_ok)}; "
          f"failed pulls of them later: {len(failed_at_victims)}")
    assert early_ok and not late_ok
    assert failed_at_victims and set(failed_at_victims) <= {"timeout", "unreachable"}
    for pid, r in rd.results().items():
        evs = rd.events(pid)
        if pid in victims:
            assert r["status"] == "killed" and evs[-1].t < killed_at + 1.0  # stopped after the update in progress
        else:
            assert r["status"] == "done" and evs[-1].t > cfg.seconds - 1.0
    assert s["failed_peers"] == victims


def test_a_late_joiner_catches_up(tmp_path):
    """Peer 9 joins 2 s in, after the others have done most of their rounds; it still does
    all its rounds (pulling the others' trained models) and ends as accurate as its cluster."""
    join_at, rounds, joiner = 2.0, 8, 9
    cfg = dac_cfg("dac", peers=10, rounds=rounds, links={"scenario": [
        {"at_s": join_at, "action": "join", "peers": [joiner]}]}, data={"n_train": 40}, train={"epochs": 2})
    s = hosting.run_experiment(cfg, tmp_path)
    rd = RunDir(tmp_path)
    results = rd.results()
    assert s["failed_peers"] == [] and s["peer_rounds"] == 10 * rounds
    evs = rd.events(joiner)
    assert len(evs) == rounds and evs[0].t - evs[0].dt >= join_at
    assert results[joiner]["status"] == "done" and results[joiner]["steps"] == rounds
    # Its first pulls already get models trained by the others (their steps are ahead).
    assert sum(evs[0].lag) < 0
    mates = [r["test_acc"] for p, r in results.items() if p != joiner and r["cluster"] == results[joiner]["cluster"]]
    print(f"late joiner test acc {results[joiner]['test_acc']:.3f}, its cluster "
          f"{np.mean(mates):.3f} (min {min(mates):.3f}); first pulls' lag {evs[0].lag}")
    assert results[joiner]["test_acc"] >= np.mean(mates) - 0.1


def test_sequential_with_links_is_reproducible(tmp_path):
    links = {"default": {"latency": {"dist": "lognormal", "mean_ms": 5, "std_ms": 3}, "loss": 0.1, "duplicate": 0.1}}
    cfg = dac_cfg("dac", peers=6, rounds=3, schedule="sequential", links=links, seed=3)
    a = hosting.run_experiment(cfg, tmp_path / "a")
    b = hosting.run_experiment(cfg, tmp_path / "b")
    assert a["pulls_failed"] > 0  # the links did something
    for key in ("test_acc", "final_test_acc", "within_cluster_pull_fraction", "peer_rounds", "pulls_ok",
                "pulls_failed", "bytes_sent"):
        assert a[key] == b[key], key
    assert (tmp_path / "a" / "pulls.json").read_text() == (tmp_path / "b" / "pulls.json").read_text()
    for pid in range(6):
        ea, eb = RunDir(tmp_path / "a").events(pid), RunDir(tmp_path / "b").events(pid)
        assert [(e.chosen, e.ok, e.failed, e.loss, e.val_loss) for e in ea] == \
               [(e.chosen, e.ok, e.failed, e.loss, e.val_loss) for e in eb]
    la = json.loads((tmp_path / "a" / "links-0.json").read_text())
    lb = json.loads((tmp_path / "b" / "links-0.json").read_text())
    assert la == lb and la["dropped"] > 0


def test_a_reply_delayed_past_the_pullers_timeout_is_counted_not_lost(actx, run_async, caplog):
    """The puller gives up (timeout) and drops its socket; the delayed reply then has nowhere
    to go: the server counts it as ``unreachable`` (EHOSTUNREACH), nothing is logged."""
    links = Links(emulation({}, {"latency": {"dist": "constant", "mean_ms": 300}}, pullers=[1]), 2, seed=0)

    async def body() -> tuple:
        ts = await started(actx, make_directory("inproc", range(2)), range(2), links=links)
        ts[SERVER].publish(payload_of(1024))
        try:
            r = await ts[1].pull(SERVER, timeout=0.1)
            await asyncio.sleep(0.4)  # the reply leaves the server at 0.3 s
            return r, dict(ts[SERVER].counters.refusals), ts[SERVER].counters.served
        finally:
            await close_all(ts)

    r, refusals, served = run_async(body(), 10)
    assert not r.ok and r.reason == "timeout"
    assert refusals == {"unreachable": 1} and served == 0
    assert "never retrieved" not in caplog.text
