"""Scale: a couple of hundred learning peers in one process, sockets bounded per peer.

Digits has 1,797 images; with 30 test images per class held out, the label-shift pools
are ~600 images for classes {0,1,8,9} and ~900 for {2..7}.  ``LabelShift`` never lets two
clients share a sample (``data.allow_overlap`` applies to the rotation and permutation
shifts only, and only across clusters), so 200 peers get 5 training + 2 validation images
each: 80 x 7 = 560 and 120 x 7 = 840 images, without any reuse.
"""

from __future__ import annotations

import time

from zmqgossip import config, hosting
from zmqgossip.metrics import RunDir
from zmqgossip.stress import fd_count
from zmqgossip.net import socket_budget

PEERS, ROUNDS, POOL = 200, 4, 4


def test_two_hundred_dac_peers_in_one_process_finish_with_bounded_sockets(tmp_path):
    cfg = config.validate({
        "name": "scale-200", "method": "dac", "peers": PEERS, "rounds": ROUNDS, "schedule": "async", "seed": 0,
        "data": {"dataset": "digits", "shift": "label", "n_train": 5, "n_val": 2, "test_per_class": 30},
        "train": {"model": "mlp", "epochs": 1, "batch_size": 8, "lr": 3e-3, "test_every": 0},
        "policy": {"n": 3},
        "network": {"pool_size": POOL, "timeout_s": 10.0},
    })
    fds_before = fd_count()
    peak = {"fds": 0, "events": 0}

    def on_event(_: object) -> None:
        peak["events"] += 1
        if peak["events"] % 20 == 0:
            peak["fds"] = max(peak["fds"], fd_count())

    t0 = time.perf_counter()
    s = hosting.run_experiment(cfg, tmp_path, on_event=on_event)
    wall = time.perf_counter() - t0
    budget = socket_budget(PEERS, POOL, "inproc")
    used = peak["fds"] - fds_before
    print(f"{PEERS} DAC peers x {ROUNDS} rounds: wall {wall:.1f} s, {s['peer_rounds'] / wall:.0f} peer-rounds/s, "
          f"pulls ok {s['pulls_ok']} failed {s['pulls_failed']}, fds used at peak {used} "
          f"({used / PEERS:.1f} per peer, budget {budget.fds}), test acc {s['test_acc']['mean']:.3f}")
    assert s["failed_peers"] == [] and s["peer_rounds"] == PEERS * ROUNDS
    assert s["pulls_failed"] == 0 and s["pulls_ok"] == PEERS * ROUNDS * 3
    # Bounded per peer: an inbox, at most POOL outgoing sockets and one being reaped.
    assert 0 < used <= budget.fds and used / PEERS <= 2 + POOL
    rd = RunDir(tmp_path)
    assert all(len(r["counters"]) and r["steps"] == ROUNDS for r in rd.results().values())
