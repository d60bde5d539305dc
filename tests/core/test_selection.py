"""Priority and selection: hand-computed priorities, knapsack against brute force (hypothesis)."""

from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmfs.core.selection import (
    AllSelector,
    Alphas,
    NoneSelector,
    PrioritySelector,
    RandomSelector,
    SelectionInput,
    SelectionPolicy,
    evidence_priority,
    knapsack,
    minmax,
    priority,
    top_gamma,
)


def test_priority_by_hand():
    phi = np.array([1.0, 3.0, 2.0])
    sizes = np.array([100, 300, 500])
    p = priority(phi, sizes, Alphas(0.2, 0.8))
    # norm phi = [0, 1, .5]; norm size = [0, .5, 1]
    np.testing.assert_allclose(p, [0.2 * 0 + 0.8 * 1, 0.2 * 1 + 0.8 * 0.5, 0.2 * 0.5 + 0.8 * 0])
    pr = priority(phi, sizes, Alphas(0, 0, 1), rounds_since_upload=np.array([1, 4, 2]), round_index=3)
    np.testing.assert_allclose(pr, [0.25, 1.0, 0.5])


def test_minmax_constant_is_zero():
    assert np.all(minmax(np.array([2.0, 2.0])) == 0)


def test_top_gamma_ties_and_bounds():
    assert top_gamma(np.array([0.5, 0.9, 0.9, 0.1]), 2) == [1, 2]
    assert top_gamma(np.array([0.5, 0.9]), 5) == [0, 1]
    assert top_gamma(np.array([0.5, 0.9]), 0) == []


@settings(max_examples=300, deadline=None)
@given(
    prio=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=8),
    data=st.data(),
)
def test_knapsack_equals_brute_force(prio, data):
    m = len(prio)
    sizes = data.draw(st.lists(st.integers(1, 1000), min_size=m, max_size=m))
    cap = data.draw(st.integers(0, 3000))
    gamma = data.draw(st.one_of(st.none(), st.integers(1, m)))
    chosen = knapsack(np.array(prio), sizes, cap, gamma)
    assert sum(sizes[i] for i in chosen) <= cap
    if gamma is not None:
        assert len(chosen) <= gamma
    best = 0.0
    for k in range(1, (gamma or m) + 1):
        for s in combinations(range(m), k):
            if sum(sizes[i] for i in s) <= cap:
                best = max(best, sum(prio[i] for i in s))
    assert abs(sum(prio[i] for i in chosen) - best) < 1e-6
    if any(sz <= cap for sz in sizes):
        assert chosen, "something fits, so something is chosen"


def _inp(cap=None, gamma=1):
    return SelectionInput(("eye", "emg", "tactile"), np.array([1.0, 5.0, 9.0]), np.array([100, 200, 5000]),
                          np.ones(3), 0, gamma, cap)


def test_selectors():
    rng = np.random.default_rng(0)
    # small + informative emg wins with alpha_s = alpha_c = .5: eye .5, emg .5*.5+.5*.98, tactile .5
    chosen, p = PrioritySelector(Alphas(0.5, 0.5)).select(_inp(), rng)
    assert chosen == ["emg"]
    chosen, _ = PrioritySelector(Alphas(1.0, 0.0)).select(_inp(), rng)
    assert chosen == ["tactile"]
    # the paper's formula sends eye (the weakest) beside emg under a cap; the evidence priority does
    # not: eye's score is below a fifth of the best
    chosen, _ = PrioritySelector(Alphas(0.5, 0.5), kind="paper").select(_inp(cap=1000, gamma=3), rng)
    assert chosen == ["eye", "emg"]
    chosen, _ = PrioritySelector(Alphas(0.5, 0.5)).select(_inp(cap=1000, gamma=3), rng)
    assert chosen == ["emg"]
    assert AllSelector().select(_inp(), rng)[0] == ["eye", "emg", "tactile"]
    assert AllSelector().select(_inp(cap=400), rng)[0] == ["eye", "emg"]
    assert NoneSelector().select(_inp(), rng)[0] == []
    picks = {tuple(RandomSelector().select(_inp(gamma=1), np.random.default_rng(s))[0]) for s in range(40)}
    assert picks == {("eye",), ("emg",), ("tactile",)}
    assert all(len(RandomSelector().select(_inp(cap=150, gamma=2), np.random.default_rng(s))[0]) <= 1
               for s in range(10))


def test_bad_alphas():
    with pytest.raises(ValueError):
        Alphas(-1, 1)
    with pytest.raises(ValueError):
        Alphas(0, 0, 0)


def test_a_slack_cap_changes_nothing():
    """Issue 8: a cap that fits every model dropped modalities of priority 0 (the sum of priorities
    gains nothing from them), so a cap changed what gamma meant."""
    inp = SelectionInput(("a", "b", "c"), np.array([1.0, 0.5, 0.1]), np.array([10, 20, 30]), np.ones(3), 0, 3)
    capped = SelectionInput(*[getattr(inp, f) for f in ("modalities", "shapley", "sizes", "rounds_since_upload",
                                                          "round_index", "gamma")], cap_bytes=10**6)
    for rule in ("impact", "priority"):
        for kind, want in (("paper", ["a", "b", "c"]), ("evidence", ["a", "b"])):   # c: below a fifth of a
            sel = PrioritySelector(Alphas(1.0, 0.0, 0.0), cap_rule=rule, kind=kind)
            assert sel.select(capped, np.random.default_rng(0))[0] == sel.select(inp, np.random.default_rng(0))[0] \
                == want


def test_under_a_binding_cap_the_impact_rule_sends_the_informative_model():
    """Issue 8: with gamma = 8 and a cap the largest, most informative model fits, the sum-of-priorities
    rule sent the many small models (the priority rewards small size) and never the large one."""
    mods = ("big", "n1", "n2", "n3", "n4", "n5", "n6")
    inp = SelectionInput(mods, np.array([10.0] + [0.5] * 6), np.array([50_000] + [5_000] * 6), np.ones(7),
                         3, 8, cap_bytes=55_000)
    old, _ = PrioritySelector(Alphas(), cap_rule="priority", kind="paper").select(inp, np.random.default_rng(0))
    new, _ = PrioritySelector(Alphas(), cap_rule="impact").select(inp, np.random.default_rng(0))
    assert "big" not in old and len(old) == 6
    assert "big" in new and sum(inp.sizes[mods.index(m)] for m in new) <= 55_000
    # gamma still bounds the count, and the rule is part of the policy the coordinator sends
    one, _ = PrioritySelector(Alphas(), cap_rule="impact").select(
        SelectionInput(mods, inp.shapley, inp.sizes, inp.rounds_since_upload, 3, 1, 55_000), np.random.default_rng(0))
    assert one == ["big"]
    assert SelectionPolicy(cap_rule="priority").selector().cap_rule == "priority"
    assert SelectionPolicy.from_dict(SelectionPolicy(cap_rule="priority").to_dict()).cap_rule == "priority"
    with pytest.raises(ValueError, match="cap_rule"):
        SelectionPolicy(cap_rule="greedy")


def test_under_a_binding_cap_the_impact_rule_spends_no_bytes_on_what_has_no_impact():
    """Issue 8: bytes left under the cap went to modalities of zero or negative impact (pure noise under
    a signed score) because their recency bonus alone made them worth something; a capped round must
    not send more bytes than the impact it buys."""
    mods = ("inf", "weak", "noise_a", "noise_b")
    inp = SelectionInput(mods, np.array([2.0, 0.4, -0.1, 0.0]), np.array([40_000, 10_000, 5_000, 5_000]),
                         np.array([1.0, 3.0, 6.0, 6.0]), 5, 4, cap_bytes=58_000)
    chosen, _ = PrioritySelector(Alphas(), cap_rule="impact").select(inp, np.random.default_rng(0))
    assert chosen == ["inf", "weak"]
    # staleness still raises what helps: of two equally sized helpful models that do not both fit, the
    # one not sent for longer wins when their impact is close
    inp2 = SelectionInput(("a", "b"), np.array([1.0, 0.9]), np.array([10_000, 10_000]), np.array([1.0, 6.0]),
                          5, 2, cap_bytes=15_000)
    assert PrioritySelector(Alphas(), cap_rule="impact").select(inp2, np.random.default_rng(0))[0] == ["b"]


def test_the_evidence_priority_by_hand():
    phi = np.array([4.0, 1.0, 0.5, -0.2, 0.0])
    sizes = np.array([1000, 250, 500, 100, 100])
    since = np.array([1.0, 2.0, 4.0, 4.0, 4.0])
    p, ok = evidence_priority(phi, sizes, Alphas(0.2, 0.2, 0.6), since, 3, evidence=0.2)
    # eligible: phi > 0 and phi >= 0.2 * 4 = 0.8: the first two; impact phi / 4, size 1 - size / 1000
    np.testing.assert_array_equal(ok, [True, True, False, False, False])
    np.testing.assert_allclose(p, [0.2 * 1 + 0.2 * 0 + 0.6 * 0.25, 0.2 * 0.25 + 0.2 * 0.75 + 0.6 * 0.5, 0, 0, 0])
    # nothing helps: nothing is eligible
    p, ok = evidence_priority(np.array([-1.0, 0.0]), np.array([10, 20]), Alphas(), np.ones(2), 0)
    assert not ok.any() and not p.any()
    # evidence 0: every modality above zero
    _, ok = evidence_priority(phi, sizes, Alphas(), since, 3, evidence=0.0)
    np.testing.assert_array_equal(ok, [True, True, True, False, False])


def test_small_or_overdue_noise_is_never_sent_under_the_evidence_priority():
    """Issue 17: P = 0.2 norm(phi) + 0.2 (1 - norm(size)) + 0.6 recency sent a small noise model as often
    as a large informative one (0 + 0.2 + recency against 0.2 + 0 + recency), and min-max gave the
    weakest informative modality the same 0 as noise; recency then lifted every modality in turn.
    Under the evidence priority a modality without evidence of value is never sent, however small or
    stale; recency and size re-rank the modalities that help."""
    mods = ("big_good", "small_good", "weak_good", "noise4", "noise64")
    phi = np.array([1.0, 0.6, 0.25, 0.01, -0.02])
    sizes = np.array([80_000, 3_000, 20_000, 1_500, 9_000])
    rng = np.random.default_rng(0)
    sent_paper, sent_evidence = set(), set()
    last = {m: -1 for m in mods}
    for paper in (True, False):
        last = {m: -1 for m in mods}
        for t in range(30):
            since = np.array([t - last[m] for m in mods], dtype=float)
            inp = SelectionInput(mods, phi, sizes, since, t, 1)
            chosen, _ = PrioritySelector(Alphas(), kind="paper" if paper else "evidence").select(inp, rng)
            for m in chosen:
                last[m] = t
            (sent_paper if paper else sent_evidence).update(chosen)
    assert {"noise4", "noise64"} <= sent_paper          # the paper's formula sends noise in turn
    assert sent_evidence == {"big_good", "small_good", "weak_good"}   # every helpful one, never noise
    # the paper's formula stays selectable, through the policy the coordinator sends
    pol = SelectionPolicy(priority="paper")
    assert pol.selector().kind == "paper"
    assert SelectionPolicy.from_dict(pol.to_dict()) == pol
    assert SelectionPolicy.from_dict({"evidence": 0.5}).selector().evidence == 0.5
    with pytest.raises(ValueError, match="priority must be one of"):
        SelectionPolicy(priority="greedy")
    with pytest.raises(ValueError, match="evidence must be"):
        SelectionPolicy(evidence=1.5)


def test_fewer_than_gamma_are_sent_when_fewer_show_value():
    inp = SelectionInput(("a", "b", "c"), np.array([1.0, -0.1, 0.05]), np.array([10, 20, 30]), np.ones(3), 2, 3)
    assert PrioritySelector(Alphas()).select(inp, None)[0] == ["a"]
    assert PrioritySelector(Alphas(), kind="paper").select(inp, None)[0] == ["a", "b", "c"]
    # under a cap too: the knapsack never fills the bytes left with what shows no value
    capped = SelectionInput(inp.modalities, inp.shapley, inp.sizes, inp.rounds_since_upload, 2, 3, cap_bytes=45)
    for rule in ("impact", "priority"):
        assert PrioritySelector(Alphas(), cap_rule=rule).select(capped, None)[0] == ["a"]
