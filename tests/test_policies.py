"""Each policy rule on hand-made score tables: no sockets, no training.

The DAC rules are the seven steps of ``zmqgossip/policies/dac.py``'s docstring (DAC as the
paper's reference code runs it): a ``Pulled`` list is what one update of client i sees, in
draw order (peer, n_samples, loss of that peer's model on i's training data, that peer's
published score row).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqgossip.policies import (
    DAC,
    METHODS,
    PENS,
    Local,
    Oracle,
    Pulled,
    RandomGossip,
    make_policy,
    softmax_weights,
    tau_schedule,
)
from zmqgossip.policies.dac import LOSS_FLOOR
from zmqgossip.policies.sampling import choice_by_weight

PEERS = list(range(10))  # client ids 0..9
ME = 0


def dac(n: int = 3, seed: int = 0, *, tau: float = 30.0, variable: bool = False, **kw) -> DAC:
    return DAC(ME, PEERS, n, np.random.default_rng(seed), tau=tau, variable=variable, **kw)


def score(p: DAC, peer: int) -> float:
    return float(p.s[p.index[peer]])


def expected_p(p: DAC, tau_t: float) -> dict[int, float]:
    """p_i[j] = exp(tau_t s_i[j]) / sum_{l != i} exp(tau_t s_i[l]), written out naively."""
    s = {j: score(p, j) for j in PEERS if j != ME}
    m = max(tau_t * v for v in s.values())
    e = {j: math.exp(tau_t * v - m) for j, v in s.items()}
    z = sum(e.values())
    return {j: v / z for j, v in e.items()}


# ----------------------------------------------------------------------------- DAC: step 1


def test_round0_chooses_n_distinct_uniformly_never_me():
    counts: Counter[int] = Counter()
    trials = 600
    for seed in range(trials):
        chosen = dac(n=3, seed=seed).choose()
        assert len(chosen) == 3 and len(set(chosen)) == 3
        assert ME not in chosen
        assert all(c in PEERS for c in chosen)
        counts.update(chosen)
    assert set(counts) == set(PEERS) - {ME}  # every other peer appears
    # Uniform: each of the 9 others is drawn 3/9 of the time (200 of 600), give or take.
    expected = trials * 3 / 9
    for peer, c in counts.items():
        assert abs(c - expected) < 0.25 * expected, (peer, c)


def test_round0_is_uniform_even_with_scores_set_before():
    """Round 0 ignores p: a policy whose p is skewed still draws uniformly at t = 0."""
    counts: Counter[int] = Counter()
    for seed in range(300):
        p = dac(n=1, seed=seed)
        p.p = np.zeros_like(p.p)
        p.p[0] = 1.0  # would always give peer 1
        counts.update(p.choose())
    assert len(counts) == 9


def test_after_round0_draws_follow_p():
    """Later draws use p from the previous update: frequencies of a single draw match p."""
    p = dac(n=1, seed=1, tau=1.0)
    p.update([Pulled(3, 10, 0.5), Pulled(5, 10, 1.0)])
    want = expected_p(p, 1.0)
    counts: Counter[int] = Counter(p.choose()[0] for _ in range(4000))
    for j, q in want.items():
        assert abs(counts[j] / 4000 - q) < 0.03, (j, counts[j] / 4000, q)


@settings(max_examples=300, deadline=None)
@given(
    scores=st.lists(st.one_of(st.just(0.0), st.floats(0.01, 50.0)), min_size=1, max_size=40),
    tau=st.sampled_from([1.0, 5.0, 30.0, 300.0]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_weighted_draw_is_numpys_draw_for_draw(scores, tau, seed, data):
    """DAC's sampler returns what ``Generator.choice(replace=False, p=p)`` returns and
    leaves the generator in the same state, also for peaked p with underflowed zeros."""
    p = softmax_weights(np.array(scores), tau)
    k = data.draw(st.integers(1, int((p > 0).sum())))
    ours, theirs = np.random.default_rng(seed), np.random.default_rng(seed)
    want = [int(i) for i in theirs.choice(len(p), size=k, replace=False, p=p)]
    assert choice_by_weight(ours, p, k) == want
    assert ours.bit_generator.state == theirs.bit_generator.state


def test_draw_keeps_n_distinct_after_round0():
    p = dac(n=4, seed=2)
    p.update([Pulled(1, 10, 0.3), Pulled(2, 10, 0.4), Pulled(3, 10, 2.0), Pulled(4, 10, 2.5)])
    for _ in range(200):
        c = p.choose()
        assert len(c) == 4 and len(set(c)) == 4 and ME not in c


# ---------------------------------------------------------------------------- DAC: steps 2-4


def test_direct_score_is_inverse_loss():
    p = dac()
    p.update([Pulled(4, 10, 0.5), Pulled(7, 10, 2.0), Pulled(2, 10, 0.125)])
    assert score(p, 4) == pytest.approx(2.0)
    assert score(p, 7) == pytest.approx(0.5)
    assert score(p, 2) == pytest.approx(8.0)
    for j in (1, 3, 5, 6, 8, 9):
        assert score(p, j) == 0.0
    assert p.c[p.index[4]] == 1 and p.c[p.index[1]] == 0
    assert p.t == 1


def test_direct_score_overwrites_older_direct_score():
    p = dac()
    p.update([Pulled(4, 10, 0.5)])
    p.update([Pulled(4, 10, 4.0)])  # worse now: the newer value wins, no max / mean
    assert score(p, 4) == pytest.approx(0.25)
    assert p.c[p.index[4]] == 2


def test_direct_score_overwrites_an_earlier_two_hop_value():
    p = dac()
    p.update([Pulled(1, 10, 1.0, {5: 9.0})])
    assert score(p, 5) == pytest.approx(9.0)  # two-hop, copied as is
    p.update([Pulled(5, 10, 0.25)])
    assert score(p, 5) == pytest.approx(4.0)


def test_two_hop_only_for_never_pulled_clients():
    p = dac()
    p.update([Pulled(3, 10, 0.5)])  # 3 pulled once: s = 2
    # Peer 1 reports 3 (pulled before), 2 (pulled in this very round) and 6 (never pulled).
    p.update([Pulled(1, 10, 1.0, {3: 50.0, 2: 50.0, 6: 7.0}), Pulled(2, 10, 0.5)])
    assert score(p, 3) == pytest.approx(2.0)  # keeps its last direct score
    assert score(p, 2) == pytest.approx(2.0)  # counts rise before the two-hop rule
    assert score(p, 6) == pytest.approx(7.0)


def test_pulled_client_keeps_its_last_direct_score_however_old():
    p = dac()
    p.update([Pulled(3, 10, 0.5)])
    for r in range(5):
        p.update([Pulled(1 + (r % 2) * 3, 10, 1.0, {3: 100.0 + r})])  # neighbours disagree
    assert score(p, 3) == pytest.approx(2.0)


def test_two_hop_ignores_non_positive_scores_me_and_unknown_ids():
    p = dac()
    p.update([Pulled(1, 10, 0.5, {ME: 5.0, 6: 0.0, 7: -3.0, 99: 4.0, 8: 1.5})])
    assert score(p, 6) == 0.0 and score(p, 7) == 0.0
    assert score(p, 8) == pytest.approx(1.5)
    assert 99 not in p.index and ME not in p.index


def test_two_hop_takes_the_best_scored_informer_after_step3():
    p = dac()
    p.update([Pulled(1, 10, 0.1)])  # s[1] = 10 from an old round
    # This round 1 scores 1/1 = 1 and 2 scores 1/0.5 = 2: peer 2 is now the best informer,
    # although 1 had the larger score before step 3.
    p.update([Pulled(1, 10, 1.0, {6: 11.0}), Pulled(2, 10, 0.5, {6: 3.0})])
    assert score(p, 6) == pytest.approx(3.0)
    # Draw order does not matter when the scores differ.
    q = dac()
    q.update([Pulled(1, 10, 0.1)])
    q.update([Pulled(2, 10, 0.5, {6: 3.0}), Pulled(1, 10, 1.0, {6: 11.0})])
    assert score(q, 6) == pytest.approx(3.0)


def test_two_hop_only_informed_peers_compete():
    """The best-scored pulled peer does not know j (or scores it 0): the next one informs."""
    p = dac()
    p.update([Pulled(1, 10, 0.1, {6: 0.0}), Pulled(2, 10, 1.0, {6: 4.0}), Pulled(3, 10, 0.5, {7: 1.0})])
    assert score(p, 6) == pytest.approx(4.0)
    assert score(p, 7) == pytest.approx(1.0)


def test_two_hop_tie_goes_to_the_later_in_draw_order():
    p = dac()
    p.update([Pulled(1, 10, 0.5, {6: 7.0}), Pulled(2, 10, 0.5, {6: 3.0})])
    assert score(p, 6) == pytest.approx(3.0)
    q = dac()
    q.update([Pulled(2, 10, 0.5, {6: 3.0}), Pulled(1, 10, 0.5, {6: 7.0})])
    assert score(q, 6) == pytest.approx(7.0)


def test_two_hop_overwrites_an_earlier_two_hop_value():
    p = dac()
    p.update([Pulled(1, 10, 0.5, {6: 7.0})])
    p.update([Pulled(2, 10, 2.0, {6: 0.3})])  # even a smaller value, from a worse informer
    assert score(p, 6) == pytest.approx(0.3)
    p.update([Pulled(3, 10, 2.0, {})])  # no one informs: the value stays
    assert score(p, 6) == pytest.approx(0.3)


def test_score_row_publishes_nonzero_scores_including_two_hop():
    p = dac()
    p.update([Pulled(1, 10, 0.5, {6: 7.0}), Pulled(2, 10, 0.25)])
    assert p.score_row() == pytest.approx({1: 2.0, 2: 4.0, 6: 7.0})


def test_failed_pulls_leave_scores_and_counts_alone():
    """A round with fewer replies than chosen (timeouts) updates only what arrived."""
    p = dac()
    p.update([Pulled(1, 10, 0.5)])
    p.update([])
    assert score(p, 1) == pytest.approx(2.0) and p.c[p.index[1]] == 1 and p.t == 2
    assert np.isfinite(p.p).all() and p.p.sum() == pytest.approx(1.0)


# ---------------------------------------------------------------------------- DAC: steps 5-6


def test_sampling_weights_are_softmax_over_others_with_unknown_weight_one():
    tau = 2.0
    p = dac(tau=tau)
    p.update([Pulled(1, 10, 0.5), Pulled(2, 10, 2.0, {7: 1.0})])
    want = expected_p(p, tau)
    got = p.sampling_weights()
    assert set(got) == set(PEERS) - {ME}  # p_i[i] is not a choice
    assert sum(got.values()) == pytest.approx(1.0)
    for j in PEERS[1:]:
        assert got[j] == pytest.approx(want[j], rel=1e-12)
    # Unknown clients (s = 0) weigh exp(0) = 1 relative to exp(tau s) of known ones.
    assert got[5] / got[1] == pytest.approx(math.exp(0) / math.exp(tau * 2.0))
    assert got[5] == pytest.approx(got[9])
    assert got[7] / got[5] == pytest.approx(math.exp(tau * 1.0))


def test_softmax_weights_max_subtracted_and_me_excluded():
    s = np.array([0.0, 1000.0, 999.0, 0.0])
    w = softmax_weights(s, 30.0)
    assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)
    assert w[1] == pytest.approx(1.0 / (1.0 + math.exp(-30.0)))
    w2 = softmax_weights(np.array([1.0, 2.0, 3.0]), 1.0, me_index=2)
    assert w2[2] == 0.0 and w2[:2] == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)])


@pytest.mark.parametrize("tiny", [1e-12, 0.0])
def test_tiny_or_zero_loss_is_floored_no_nan_and_choose_fills(tiny):
    p = dac(n=3, seed=3, tau=30.0)
    p.update([Pulled(4, 10, tiny), Pulled(5, 10, 1.0), Pulled(6, 10, 0.8)])
    assert score(p, 4) == pytest.approx(1.0 / LOSS_FLOOR)
    assert np.isfinite(p.s).all() and np.isfinite(p.p).all()
    assert p.p.sum() == pytest.approx(1.0)
    # exp underflows for all but peer 4: fewer than n non-zero probabilities.
    assert np.count_nonzero(p.p) < 3
    fills: Counter[int] = Counter()
    for _ in range(300):
        c = p.choose()
        assert len(c) == 3 and len(set(c)) == 3 and ME not in c
        assert 4 in c  # the one with non-zero weight is always taken
        fills.update(x for x in c if x != 4)
    assert set(fills) == set(PEERS) - {ME, 4}  # the rest is filled uniformly


def test_two_tiny_losses_are_both_taken_then_one_fill():
    p = dac(n=3, seed=4)
    p.update([Pulled(4, 10, 0.0), Pulled(5, 10, 1e-12), Pulled(6, 10, 1.0)])
    assert np.count_nonzero(p.p) == 2
    for _ in range(100):
        c = p.choose()
        assert {4, 5} <= set(c) and len(set(c)) == 3 and ME not in c


def test_numerical_safety_does_not_change_ordinary_results():
    """Where the naive formula is finite, the policy gives the same p."""
    p = dac(tau=30.0)
    p.update([Pulled(1, 10, 2.3), Pulled(2, 10, 1.1), Pulled(3, 10, 0.9, {8: 0.4})])
    s = np.array([score(p, j) for j in PEERS[1:]])
    naive = np.exp(30.0 * s) / np.exp(30.0 * s).sum()
    assert np.isfinite(naive).all()
    assert p.p == pytest.approx(naive, rel=1e-9)


def test_dac_var_tau_schedule():
    assert tau_schedule(30.0, 0, True) == pytest.approx(1.0)
    for t in range(0, 60, 7):
        assert tau_schedule(30.0, t, True) == pytest.approx(2 * 30.0 / (1 + math.exp(-0.2 * t)) - 30.0 + 1)
        assert tau_schedule(30.0, t, False) == 30.0
    assert tau_schedule(30.0, 200, True) == pytest.approx(31.0)  # tends to tau + 1
    vals = [tau_schedule(30.0, t, True) for t in range(50)]
    assert all(a < b for a, b in zip(vals, vals[1:]))


def test_dac_var_uses_its_own_round_index():
    p = dac(tau=30.0, variable=True)
    assert p.name == "dac-var"
    p.update([Pulled(1, 10, 0.5)])  # t = 0: tau_0 = 1
    assert p.sampling_weights() == pytest.approx(expected_p(p, 1.0))
    p.update([Pulled(2, 10, 0.25)])  # t = 1
    assert p.sampling_weights() == pytest.approx(expected_p(p, tau_schedule(30.0, 1, True)))
    q = dac(tau=30.0, variable=False)
    q.update([Pulled(1, 10, 0.5)])
    assert q.name == "dac" and q.sampling_weights() == pytest.approx(expected_p(q, 30.0))


# ------------------------------------------------------------------------------ DAC: step 7


def test_default_mix_weights_by_training_set_size():
    p = dac()
    pulled = [Pulled(1, 100, 0.5), Pulled(2, 300, 0.7)]
    p.update(pulled)
    assert p.mix_weights(100, pulled) == pytest.approx([0.2, 0.2, 0.6])
    assert p.mix_weights(100, []) == pytest.approx([1.0])
    for pol in (RandomGossip(ME, PEERS, 2, np.random.default_rng(0)), Oracle(ME, PEERS, 2, np.random.default_rng(0), clusters={i: 0 for i in PEERS})):
        assert pol.mix_weights(100, pulled) == pytest.approx([0.2, 0.2, 0.6])


def test_similarity_weighted_mix_weights():
    p = dac(tau=1.0, similarity_weighted=True)
    pulled = [Pulled(1, 100, 0.5), Pulled(2, 300, 1.0)]
    p.update(pulled)
    w = p.mix_weights(200, pulled)
    own = 200 / 600  # own share by data size
    p1, p2 = p.p[p.index[1]], p.p[p.index[2]]
    assert w[0] == pytest.approx(own)
    assert w[1:] == pytest.approx([(1 - own) * p1 / (p1 + p2), (1 - own) * p2 / (p1 + p2)])
    assert sum(w) == pytest.approx(1.0)
    assert w[1] / w[2] == pytest.approx(math.exp(1.0 * (2.0 - 1.0)))  # p ratio, not sizes


# --------------------------------------------------------------------------- the baselines


def test_random_gossip_n_distinct_uniform():
    counts: Counter[int] = Counter()
    pol = RandomGossip(ME, PEERS, 3, np.random.default_rng(0))
    for _ in range(900):
        c = pol.choose()
        assert len(c) == 3 and len(set(c)) == 3 and ME not in c
        counts.update(c)
        pol.update([Pulled(x, 10) for x in c])
    assert set(counts) == set(PEERS) - {ME}
    for c in counts.values():
        assert abs(c - 300) < 75
    assert not pol.scores_models and pol.score_row() is None and pol.sampling_weights() is None


def test_oracle_only_same_cluster():
    clusters = {i: (0 if i < 6 else 1) for i in PEERS}  # 0..5 and 6..9
    pol = Oracle(ME, PEERS, 3, np.random.default_rng(0), clusters=clusters)
    seen: set[int] = set()
    for _ in range(200):
        c = pol.choose()
        assert len(c) == 3 and len(set(c)) == 3
        assert set(c) <= {1, 2, 3, 4, 5}
        seen |= set(c)
    assert seen == {1, 2, 3, 4, 5}
    small = Oracle(7, PEERS, 5, np.random.default_rng(0), clusters=clusters)  # mates 6, 8, 9
    assert sorted(small.choose()) == [6, 8, 9]
    alone = Oracle(0, PEERS, 3, np.random.default_rng(0), clusters={i: (0 if i == 0 else 1) for i in PEERS})
    assert alone.choose() == []


def test_local_chooses_nothing():
    pol = Local(ME, PEERS, 3, np.random.default_rng(0))
    assert pol.choose() == []
    pol.update([])
    assert pol.t == 1 and pol.mix_weights(50, []) == [1.0]


def _pens(n: int = 2, sampled: int = 4, phase1: int = 5, seed: int = 0) -> PENS:
    return PENS(ME, PEERS, n, np.random.default_rng(seed), sampled=sampled, phase1_rounds=phase1)


def test_pens_phase1_samples_and_aggregates_only_the_n_lowest_loss():
    pol = _pens()
    assert _pens(n=3, sampled=None).sampled == 6  # default 2n
    assert pol.in_phase1 and pol.scores_models
    for _ in range(50):
        c = pol.choose()
        assert len(c) == 4 and len(set(c)) == 4 and ME not in c
    pulled = [Pulled(3, 100, 0.9), Pulled(5, 100, 0.2), Pulled(7, 300, 0.5), Pulled(8, 100, 1.5)]
    pol.update(pulled)
    w = pol.mix_weights(100, pulled)
    assert w == pytest.approx([100 / 500, 0.0, 100 / 500, 300 / 500, 0.0])  # own, 5 and 7 by size
    assert pol.selected[5] == 1 and pol.selected[7] == 1 and pol.selected[3] == 0
    assert all(pol.sampled_count[p] == 1 for p in (3, 5, 7, 8))


def test_pens_phase2_chooses_only_peers_selected_more_than_expected():
    pol = _pens(n=2, sampled=4, phase1=6)
    good = {2, 5}
    rng = np.random.default_rng(1)
    for _ in range(6):
        others = [int(x) for x in rng.choice([1, 3, 4, 6, 7, 8, 9], size=2, replace=False)]
        pulled = [Pulled(p, 10, 0.1 if p in good else 2.0) for p in [*others, 2, 5]]
        pol.update(pulled)
    assert not pol.in_phase1 and not pol.scores_models
    # 2 and 5: sampled 6 times, selected 6 > 6 * n / sampled = 3; the rest never selected.
    seen: set[int] = set()
    for _ in range(100):
        c = pol.choose()
        assert len(c) == 2 and set(c) <= good
        seen |= set(c)
        pol.update([Pulled(p, 10) for p in c])
        assert pol.mix_weights(10, [Pulled(p, 10) for p in c]) == pytest.approx([1 / 3] * 3)
    assert seen == good


def test_pens_phase2_falls_back_to_all_when_none_qualify():
    pol = _pens(n=2, sampled=4, phase1=1)
    pol.update([Pulled(1, 10), Pulled(2, 10)])  # unscored: nobody makes a top-n
    seen: set[int] = set()
    for _ in range(200):
        seen |= set(pol.choose())
    assert seen == set(PEERS) - {ME}


def test_make_policy_builds_each_method_and_rejects_unknown():
    rng = np.random.default_rng(0)
    clusters = {i: 0 for i in PEERS}
    kinds = {"local": Local, "random": RandomGossip, "oracle": Oracle, "pens": PENS, "dac": DAC, "dac-var": DAC, "dac-plus": DAC}
    assert set(kinds) == set(METHODS)
    for name, cls in kinds.items():
        pol = make_policy(name, ME, PEERS, n=3, rng=rng, clusters=clusters)
        assert isinstance(pol, cls) and pol.name == name
    with pytest.raises(ValueError) as e:
        make_policy("dack", ME, PEERS, n=3, rng=rng, clusters=clusters)
    msg = str(e.value)
    assert "dack" in msg
    for name in METHODS:
        assert name in msg
