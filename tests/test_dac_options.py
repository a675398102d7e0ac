"""DAC's options beyond the paper (policies/dac.py, ``DACOptions``) on hand-made score
tables, and liveness against a real peer that dies (real sockets, real training).

Each option is off by default: the paper's rules are tests/test_policies.py and
tests/test_reference.py, which run with the defaults.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from zmqgossip import config, hosting
from zmqgossip.metrics import RunDir
from zmqgossip.policies import DAC, DAC_PLUS, DACOptions, Pulled, make_policy, softmax_weights, tau_schedule

from _helpers import tiny_experiment

PEERS = list(range(10))
ME = 0


def dac(seed: int = 0, *, tau: float = 30.0, variable: bool = False, n: int = 3, similarity_weighted: bool = False,
        **opts) -> DAC:
    return DAC(ME, PEERS, n, np.random.default_rng(seed), tau=tau, variable=variable,
               similarity_weighted=similarity_weighted, options=DACOptions(**opts))


def weight(p: DAC, peer: int) -> float:
    return float(p.p[p.index[peer]])


# ----------------------------------------------------------------------- defaults: the paper


def test_defaults_are_the_papers_rules_draw_for_draw():
    """With every option at its default a DAC instance makes the same draws, scores and
    weights as one built without options, round after round."""
    a = DAC(ME, PEERS, 3, np.random.default_rng(5), tau=30.0, variable=True)
    b = dac(5, variable=True)
    for t in range(6):
        ca, cb = a.choose(), b.choose()
        assert ca == cb
        pulled = [Pulled(j, 10 + j, 0.3 + 0.1 * j, {k: 1.0 / (k + 1) for k in PEERS if k != j}) for j in ca]
        a.pulls_failed([ca[0]])
        b.pulls_failed([cb[0]])
        a.update(pulled[1:])
        b.update(pulled[1:])
        assert a.s.tolist() == b.s.tolist() and a.p.tolist() == b.p.tolist()
        assert a.mix_weights(100, pulled[1:]) == b.mix_weights(100, pulled[1:])


@pytest.mark.parametrize("bad", [dict(unknown_score="median"), dict(explore=-1), dict(drop_ratio=0.5),
                                 dict(fail_decay=0.0), dict(fail_decay=1.5), dict(fail_limit=-1), dict(retry_rounds=0)])
def test_options_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        DACOptions(**bad)


def test_config_validates_and_dac_plus_takes_its_own_values_unless_set():
    cfg = config.validate({"method": "dac-plus"})
    pol = make_policy(cfg.method, ME, PEERS, n=3, rng=np.random.default_rng(0), clusters={}, dac_options=cfg.policy.dac_options())
    assert pol.name == "dac-plus" and pol.variable and pol.options == DAC_PLUS
    cfg = config.validate({"method": "dac-plus", "policy": {"drop_ratio": 0, "explore": 2}})
    pol = make_policy(cfg.method, ME, PEERS, n=3, rng=np.random.default_rng(0), clusters={}, dac_options=cfg.policy.dac_options())
    assert pol.options.drop_ratio == 0 and pol.options.explore == 2 and pol.options.unknown_score == DAC_PLUS.unknown_score
    pol = make_policy("dac-var", ME, PEERS, n=3, rng=np.random.default_rng(0), clusters={},
                      dac_options=config.validate({}).policy.dac_options())
    assert pol.options == DACOptions()
    for bad in ({"drop_ratio": 0.5}, {"fail_decay": 0}, {"unknown_score": "min"}, {"explore": -1}):
        with pytest.raises(config.ConfigError) as e:
            config.validate({"policy": bad})
        assert next(iter(bad)) in str(e.value)


# ------------------------------------------------------------------- unknown-peer score


def test_zero_unknown_score_ranks_an_unknown_peer_below_every_known_outsider():
    """The collapse the option addresses: with the paper's 0, a never-scored mate (9) is
    drawn less often than a known outsider whose loss is 7 times a mate's."""
    p = dac()
    p.update([Pulled(1, 10, 1.0), Pulled(2, 10, 7.0), Pulled(3, 10, 7.0)])
    assert weight(p, 9) < weight(p, 2) < weight(p, 1)


@pytest.mark.parametrize("how", ["mean", "max"])
def test_unknown_score_mean_or_max_of_known_scores(how):
    p = dac(unknown_score=how, tau=2.0)
    p.update([Pulled(1, 10, 1.0), Pulled(2, 10, 7.0), Pulled(3, 10, 7.0, {4: 0.5})])
    known = [1.0, 1 / 7, 1 / 7, 0.5]  # direct 1, 2, 3 and two-hop 4
    value = np.mean(known) if how == "mean" else max(known)
    want = np.array([1.0, 1 / 7, 1 / 7, 0.5, *[value] * 5])  # peers 1..9
    assert p.p == pytest.approx(softmax_weights(want, 2.0))
    assert p.score_row() == pytest.approx({1: 1.0, 2: 1 / 7, 3: 1 / 7, 4: 0.5})  # not published
    if how == "mean":
        assert weight(p, 2) < weight(p, 9) < weight(p, 1)
    else:
        assert weight(p, 9) == pytest.approx(weight(p, 1))


def test_unknown_score_leaves_a_pulled_peer_with_infinite_loss_at_zero():
    p = dac(unknown_score="mean", tau=1.0)
    p.update([Pulled(1, 10, 1.0), Pulled(2, 10, math.inf)])
    assert weight(p, 2) < weight(p, 9) == pytest.approx(weight(p, 3))


def test_unknown_score_without_any_known_score_is_uniform():
    p = dac(unknown_score="max")
    p.update([])
    assert p.p == pytest.approx(np.full(9, 1 / 9))


# ---------------------------------------------------------------------------- exploration


def test_explore_pulls_k_more_never_scored_peers_first():
    p = dac(explore=2)
    p.update([Pulled(j, 10, 1.0) for j in (1, 2, 3, 4, 5, 6)])
    for _ in range(20):
        chosen = p.choose()
        assert len(chosen) == 5 and len(set(chosen)) == 5 and ME not in chosen
        assert chosen[3:] == p.explored
        unscored = {7, 8, 9} - set(chosen[:3])
        assert set(p.explored) <= unscored or unscored <= set(p.explored)


def test_explore_falls_back_to_scored_peers_and_never_exceeds_the_others():
    p = dac(explore=20)
    p.update([Pulled(j, 10, 1.0) for j in PEERS if j != ME])
    chosen = p.choose()
    assert sorted(chosen) == [j for j in PEERS if j != ME]


def test_explored_models_are_scored_but_get_no_weight():
    p = dac(explore=1)
    p.update([])
    chosen = p.choose()
    pulled = [Pulled(j, 100, 0.5) for j in chosen]
    p.update(pulled)
    for j in chosen:
        assert p.s[p.index[j]] == pytest.approx(2.0) and p.c[p.index[j]] == 1
    w = p.mix_weights(100, pulled)
    assert w[-1] == 0.0 and w[:-1] == pytest.approx([0.25] * 4) and sum(w) == pytest.approx(1.0)


def test_explore_in_round_zero_adds_to_the_uniform_draw():
    p = dac(explore=1)
    chosen = p.choose()
    assert len(chosen) == 4 and len(set(chosen)) == 4 and chosen[3:] == p.explored


# ------------------------------------------------------------------------ dropping far-worse


def test_drop_ratio_gives_no_weight_to_a_far_worse_forced_pick():
    """Two mates at loss ~1 and a forced outsider at 7: the outsider is not averaged in."""
    p = dac(drop_ratio=2.0)
    pulled = [Pulled(1, 100, 1.0), Pulled(2, 100, 7.0), Pulled(3, 100, 1.2)]
    p.update(pulled)
    assert p.mix_weights(100, pulled) == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3])
    assert score(p, 2) == pytest.approx(1 / 7)  # still scored


def test_drop_ratio_keeps_models_within_the_ratio_and_an_all_bad_round():
    p = dac(drop_ratio=2.0)
    close = [Pulled(1, 100, 1.0), Pulled(2, 100, 1.9), Pulled(3, 100, 2.0)]
    assert p.mix_weights(100, close) == pytest.approx([0.25] * 4)
    alike = [Pulled(1, 100, 7.0), Pulled(2, 100, 7.5)]  # round 0 of a small cluster: all outsiders
    assert p.mix_weights(100, alike) == pytest.approx([1 / 3] * 3)
    bad = [Pulled(1, 100, 1.0), Pulled(2, 100, math.nan), Pulled(3, 100, math.inf)]
    assert p.mix_weights(100, bad) == pytest.approx([0.5, 0.5, 0.0, 0.0])


def test_drop_ratio_with_similarity_weights_renormalises_the_rest():
    p = dac(drop_ratio=2.0, similarity_weighted=True, tau=1.0)
    pulled = [Pulled(1, 100, 1.0), Pulled(2, 100, 5.0), Pulled(3, 100, 1.5)]
    p.update(pulled)
    base = DAC(ME, PEERS, 3, np.random.default_rng(0), tau=1.0, similarity_weighted=True)
    base.update(pulled)
    w0 = base.mix_weights(100, pulled)
    want = np.array([w0[0], w0[1], 0.0, w0[3]])
    assert p.mix_weights(100, pulled) == pytest.approx((want / want.sum()).tolist())


def score(p: DAC, peer: int) -> float:
    return float(p.s[p.index[peer]])


# -------------------------------------------------------------------------------- liveness


def test_fail_decay_lowers_the_score_of_a_peer_whose_pull_failed():
    p = dac(fail_decay=0.5, tau=1.0)
    p.update([Pulled(1, 10, 0.5), Pulled(2, 10, 0.5)])
    p.pulls_failed([1, 42])  # 42: not a peer, ignored
    p.update([])
    assert score(p, 1) == pytest.approx(1.0) and score(p, 2) == pytest.approx(2.0)
    assert weight(p, 1) < weight(p, 2)


def test_fail_limit_forgets_and_excludes_then_retries_with_doubling():
    p = dac(fail_decay=0.5, fail_limit=2, retry_rounds=3, unknown_score="mean")
    p.update([Pulled(1, 10, 0.5), Pulled(2, 10, 0.5), Pulled(3, 10, 0.5)])  # t: 0 -> 1
    p.pulls_failed([1])
    p.update([])  # t 1 -> 2: one failure, score halved, still drawn
    assert score(p, 1) == pytest.approx(1.0) and weight(p, 1) > 0
    p.pulls_failed([1])
    p.update([])  # t 2 -> 3: second failure in a row: forgotten, out for 3 rounds
    assert score(p, 1) == 0 and p.c[p.index[1]] == 0 and weight(p, 1) == 0
    assert p.banned_until[p.index[1]] == 2 + 1 + 3
    for t in range(3, 6):  # rounds 3, 4, 5: never drawn, even by the score rows of others
        assert 1 not in p.choose()
        p.update([Pulled(2, 10, 0.5, {1: 9.0})])
        assert (weight(p, 1) == 0) == (p.t < 6)  # p is for round p.t
    assert p.t == 6 and weight(p, 1) > 0  # drawable again in round 6 (with the two-hop value)
    p.pulls_failed([1])
    p.update([])  # a third failure: out for twice as long
    assert p.banned_until[p.index[1]] == 6 + 1 + 6 and weight(p, 1) == 0


def test_a_good_pull_restores_a_direct_score_and_clears_failures():
    p = dac(fail_decay=0.5, fail_limit=2)
    p.update([Pulled(1, 10, 0.5)])
    p.pulls_failed([1])
    p.update([])
    p.update([Pulled(1, 10, 0.25)])
    assert score(p, 1) == pytest.approx(4.0) and p.fails[p.index[1]] == 0 and p.banned_until[p.index[1]] == 0
    p.pulls_failed([1])
    p.update([])  # one failure only: not excluded
    assert weight(p, 1) > 0


def test_every_peer_excluded_falls_back_to_the_scores():
    p = DAC(ME, [0, 1, 2], 1, np.random.default_rng(0), options=DACOptions(fail_limit=1))
    p.update([])
    p.pulls_failed([1, 2])
    p.update([])
    assert np.isfinite(p.p).all() and p.p.sum() == pytest.approx(1.0)
    assert p.choose()[0] in (1, 2)


def test_liveness_state_survives_a_restore():
    p = dac(fail_limit=1, explore=1)
    p.update([Pulled(1, 10, 0.5)])
    p.pulls_failed([1])
    p.update([])
    p.choose()
    q = dac(fail_limit=1, explore=1)
    q.restore(p.state())
    assert q.fails == p.fails and q.banned_until == p.banned_until and q.explored == p.explored
    assert q.choose() == p.choose()


# ------------------------------------------------------------------ a real peer that dies


def test_dac_plus_stops_pulling_a_peer_that_died(tmp_path):
    """Twelve async peers on real sockets; two are killed a second in. With liveness each
    puller fails at most twice on a dead peer before leaving it out (retry_rounds is longer
    than the rest of the run), while the paper's DAC-var keeps drawing them."""
    kill_at, victims = 1.0, [3, 8]
    counts = {}
    for method in ("dac-var", "dac-plus"):
        raw = tiny_experiment(method=method, rounds=1000, seconds=5.0, network={"timeout_s": 0.3},
                              policy={"n": 3, "retry_rounds": 1000},
                              links={"scenario": [{"at_s": kill_at, "action": "kill", "peers": victims}]})
        out = tmp_path / method
        s = hosting.run_experiment(config.validate(raw), out)
        assert s["failed_peers"] == victims
        killed_at = s["scenario"][0]["applied_s"]
        rd = RunDir(out)
        late, failed_per_pair = 0, {}
        for i in range(12):
            if i in victims:
                continue
            for e in rd.events(i):
                if e.t - e.dt <= killed_at + 0.1:
                    continue  # the update in progress at the kill may still have reached a victim
                for j in e.chosen:
                    if j in victims:
                        late += 1
                        failed_per_pair[(i, j)] = failed_per_pair.get((i, j), 0) + 1
        counts[method] = (late, max(failed_per_pair.values(), default=0))
        if method == "dac-plus":
            assert max(failed_per_pair.values(), default=0) <= 2, failed_per_pair
    print(f"pulls of dead peers after the kill (total, most by one puller of one victim): {counts}")
    assert counts["dac-var"][0] > counts["dac-plus"][0]


# ------------------------------------------------------------------------- relative score


def test_relative_score_divides_by_the_best_known_score():
    """Early losses (all ~2) and late ones (mate 0.3, outsider 7) give the same weights
    when their ratios are the same."""
    early, late = dac(relative_score=True, tau=10.0), dac(relative_score=True, tau=10.0)
    early.update([Pulled(1, 10, 2.0), Pulled(2, 10, 4.0)])
    late.update([Pulled(1, 10, 0.3), Pulled(2, 10, 0.6)])
    assert early.p == pytest.approx(late.p)
    assert early.p == pytest.approx(softmax_weights(np.array([1.0, 0.5, *[0.0] * 7]), 10.0))
    plain = dac(tau=10.0)
    plain.update([Pulled(1, 10, 2.0), Pulled(2, 10, 4.0)])
    assert weight(plain, 1) / weight(plain, 2) < weight(early, 1) / weight(early, 2)
    assert early.score_row() == pytest.approx({1: 0.5, 2: 0.25})  # what travels is still 1/L
