"""Many learners' rounds pooled (fedmfs.learner.fleet) against each learner's own local_round.

Issue 16: the in-process simulator trains a round's devices together. Each device must get the update it
would compute alone: the same modality models (to 1e-5), scores, sizes, choice and Stage #2 fusion.
"""

import numpy as np
import pytest

from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.settings import TrainConfig
from fedmfs.learner.fleet import local_rounds, stage2_all
from fedmfs.learner.learner import Learner

CFG = TrainConfig(min_steps=30, fusion_steps=40, shapley_samples=20)


@pytest.fixture(scope="module")
def fleet():
    f = make_synthetic("headroom", 1)
    return Fleet(f.spec, [f.clients[i] for i in (0, 2, 6)], f.metadata)   # client 6 has no gloves


def _learners(fleet, cfg=CFG):
    return [Learner(fleet.spec, c, cfg, 3, i) for i, c in enumerate(fleet.clients)]


def test_pooled_rounds_equal_each_learners_own(fleet):
    alone, pooled = _learners(fleet), _learners(fleet)
    policy = SelectionPolicy()
    globals_: dict = {}
    for r in range(2):
        ua = [lr.local_round(r, globals_, "fp32") for lr in alone]
        ub = local_rounds([(lr, r, globals_, "fp32") for lr in pooled])
        for a, b, la, lb in zip(ua, ub, alone, pooled, strict=True):
            assert a.sizes == b.sizes and a.samples == b.samples
            for m in a.states:
                for k in a.states[m]:
                    np.testing.assert_allclose(a.states[m][k], b.states[m][k], atol=1e-5, rtol=0)
            assert a.shapley == pytest.approx(b.shapley, abs=1e-4)
            assert la.choose(a, policy) .modalities == lb.choose(b, policy).modalities
        # a global per modality: the first learner's model, so every learner starts round 1 from it
        globals_ = {m: ua[0].states[m] for m in ua[0].states}
        for lr in alone:
            lr.stage2(globals_, r)
        stage2_all([(lr, globals_, r) for lr in pooled])
        for la, lb in zip(alone, pooled, strict=True):
            assert la.evaluate() == pytest.approx(lb.evaluate(), abs=0.02)
            for p, q in zip(la.fusion.parameters(), lb.fusion.parameters(), strict=True):
                np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), atol=1e-4, rtol=0)


def test_reference_engine_learners_pool_too(fleet):
    """A learner on the reference engine trains alone inside the pool (its update is its local_round's)."""
    ref_cfg = TrainConfig(min_steps=20, fusion_steps=20, shapley_samples=10, engine="reference")
    a, b = _learners(fleet, ref_cfg)[:2], _learners(fleet, ref_cfg)[:2]
    ua = [lr.local_round(0, {}, "fp32") for lr in a]
    ub = local_rounds([(lr, 0, {}, "fp32") for lr in b])
    for x, y in zip(ua, ub, strict=True):
        for m in x.states:
            for k in x.states[m]:
                np.testing.assert_array_equal(x.states[m][k], y.states[m][k])
