"""Compute saving (issue 17 point 4): a device skips training the modalities it neither sends nor will
send soon, and says so in its record; the pooled simulator skips exactly what a device alone skips."""

import numpy as np
import pytest

from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.errors import PayloadError
from fedmfs.core.records import RoundRecord
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.settings import TrainConfig
from fedmfs.learner.fleet import local_rounds
from fedmfs.learner.learner import Learner

CFG = TrainConfig(min_steps=20, fusion_steps=30, shapley_samples=20, idle_every=2)


@pytest.fixture(scope="module")
def fleet():
    f = make_synthetic("headroom", 2)        # ten modalities, four of them pure noise
    return Fleet(f.spec, [f.clients[i] for i in (0, 7)], f.metadata)


def _round(lr, r, policy):
    before = {m: {k: v.detach().numpy().copy() for k, v in lr.models[m].state_dict().items()} for m in lr.present}
    upd = lr.local_round(r, {}, "fp32")
    choice = lr.choose(upd, policy)
    rec = lr.record(upd, choice)
    changed = {m for m in lr.present
               if any(not np.array_equal(before[m][k], upd.states[m][k]) for k in before[m])}
    return upd, choice, rec, changed


def test_an_idle_modality_trains_every_idle_every_th_round_and_the_record_says_so(fleet):
    lr = Learner(fleet.spec, fleet.clients[0], CFG, 5, 0)
    policy = SelectionPolicy(gamma=2)
    upd, choice, rec, changed = _round(lr, 0, policy)
    assert upd.skipped == () and rec.skipped == () and changed == set(lr.present)
    idle = {m for m, r in lr.history.idle_since.items() if r == 0}
    # what was idle: not sent, and no evidence of value (a score at or below 0, or below a fifth of the best);
    # a modality that helps but ranks below the sent ones keeps training (the fusion leans on it)
    best = max(upd.shapley.values())
    assert idle and idle == {m for m in lr.present
                             if m not in choice.modalities and not (upd.shapley[m] > 0 and upd.shapley[m] >= 0.2 * best)}
    assert any(m.startswith("noise") for m in idle), "pure noise shows no value"
    retrained = skipped_any = False
    for r in (1, 2, 3, 4):
        since = dict(lr.history.idle_since)
        # idle since round s: it trains on while its streak is shorter than 2 rounds, then skips the
        # rounds r with (r - s) % 2 != 0 and trains on the others (a modality that became useful is seen)
        expect = {m for m, s0 in since.items() if r - s0 >= 2 and (r - s0) % 2 != 0}
        upd, choice, rec, changed = _round(lr, r, policy)
        assert set(upd.skipped) == set(rec.skipped) == expect
        # a skipped model is the one it kept (one that trained may keep its weights too: early stopping
        # on a validation loss that never fell returns the weights it started from)
        assert not (expect & changed)
        retrained |= any(r - s0 >= 2 and (r - s0) % 2 == 0 for s0 in since.values())
        skipped_any = skipped_any or bool(expect)
        assert set(rec.skipped) <= set(rec.sizes) and rec.shapley.keys() == rec.sizes.keys()
    assert skipped_any and retrained, "an idle streak skipped a round and trained again"
    # off by default: every modality trains every round, idle or not
    lr0 = Learner(fleet.spec, fleet.clients[0], TrainConfig(), 5, 0)
    lr0.history.idle_since = dict(lr.history.idle_since)
    assert lr0.begin_round(5, {}).train == lr0.present


def test_pooled_rounds_skip_what_each_device_skips_alone(fleet):
    alone = [Learner(fleet.spec, c, CFG, 5, i) for i, c in enumerate(fleet.clients)]
    pooled = [Learner(fleet.spec, c, CFG, 5, i) for i, c in enumerate(fleet.clients)]
    policy = SelectionPolicy(gamma=1)
    for r in range(4):
        ua = [lr.local_round(r, {}, "fp32") for lr in alone]
        ub = local_rounds([(lr, r, {}, "fp32") for lr in pooled])
        for a, b, la, lb in zip(ua, ub, alone, pooled, strict=True):
            assert a.skipped == b.skipped
            for m in a.states:
                for k in a.states[m]:
                    np.testing.assert_allclose(a.states[m][k], b.states[m][k], atol=1e-5, rtol=0)
            assert la.choose(a, policy).modalities == lb.choose(b, policy).modalities
    assert any(u.skipped for u in ua), "something was skipped by round 3"


def test_a_record_names_what_it_skipped_and_refuses_what_it_does_not_have():
    rec = RoundRecord("d1", 3, 40, {"a": 0.5, "b": 0.0}, {"a": 3, "b": 5}, {"a": 1.0, "b": 0.0}, ("a",), 0.5, ("b",))
    assert RoundRecord.from_dict(rec.to_dict()) == rec
    old = rec.to_dict()
    del old["skipped"]                   # a record from a device that skips nothing (or an older one)
    assert RoundRecord.from_dict(old).skipped == ()
    with pytest.raises(PayloadError, match="skipped"):
        RoundRecord.from_dict({**rec.to_dict(), "skipped": ["c"]})


def test_what_is_idle_under_each_priority(fleet):
    """Under the evidence priority a modality is idle when it shows no value, not when it merely ranks
    below the sent ones (the fusion leans on it: skipping it cost 7 points on the noisy family's
    validation seeds); under the paper's formula, a priority at most half the gamma-th's."""
    from fedmfs.core.selection import Alphas, SelectionInput

    lr = Learner(fleet.spec, fleet.clients[0], CFG, 5, 0)
    mods = ("a", "b", "c", "d")
    inp = SelectionInput(mods, np.array([1.0, 0.3, 0.1, -0.2]), np.array([100, 100, 100, 100]), np.ones(4), 4, 1)
    lr._note_idle(mods, ["a"], np.array([0.9, 0.3, 0.0, 0.0]), inp, SelectionPolicy(gamma=1))
    assert lr.history.idle_since == {"c": 4, "d": 4}            # b helps (0.3 >= 0.2 x 1.0): it trains
    lr.history.idle_since.clear()
    paper = SelectionPolicy(gamma=1, priority="paper", alphas=Alphas())
    lr._note_idle(mods, ["a"], np.array([0.9, 0.5, 0.4, 0.1]), inp, paper)
    assert lr.history.idle_since == {"c": 4, "d": 4}            # at most half of 0.9
    lr._note_idle(mods, ["a"], np.array([0.9, 0.5, 0.4, 0.1]), inp, paper)   # the same round again: the same
    assert lr.history.idle_since == {"c": 4, "d": 4}
