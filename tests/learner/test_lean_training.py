"""A device's training with less memory (issue 16 point 3): the groups a device trains one after the
other (TrainConfig.pool_batch_mb) and the validation loss computed without keeping every step's states
change no model."""

import numpy as np
import pytest
import torch

from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.settings import TrainConfig
from fedmfs.learner.batched import _steps
from fedmfs.learner.learner import Learner
from fedmfs.learner.models import state_to_numpy

CFG = dict(min_steps=20, fusion_steps=20, shapley_samples=10)


@pytest.fixture(scope="module")
def headroom():
    return make_synthetic("headroom", 0)


def _round(fleet, pool_batch_mb: float) -> tuple[Learner, dict]:
    lr = Learner(fleet.spec, fleet.clients[0], TrainConfig(pool_batch_mb=pool_batch_mb, **CFG), 5, 0)
    upd = lr.local_round(0, {}, "fp32")
    return lr, upd


def test_groups_follow_the_budget(headroom):
    lr = Learner(headroom.spec, headroom.clients[0], TrainConfig(pool_batch_mb=0.5, **CFG), 5, 0)
    jobs = lr.training_jobs(lr.begin_round(0, {}))
    groups = lr.training_groups(jobs)
    assert sorted(id(j) for g in groups for j in g) == sorted(id(j) for j in jobs)
    size = lambda j: 4 * lr.config.batch_size * int(np.prod(j.x.shape[1:]))
    for g in groups:
        assert len(g) == 1 or sum(size(j) for j in g) <= 0.5 * (1 << 20)
    assert 1 < len(groups) < len(jobs)
    assert len(Learner(headroom.spec, headroom.clients[0], TrainConfig(pool_batch_mb=1e6, **CFG), 5, 0)
               .training_groups(jobs)) == 1
    assert all(len(g) == 1 for g in Learner(headroom.spec, headroom.clients[0], TrainConfig(pool_batch_mb=0, **CFG),
                                            5, 0).training_groups(jobs))


def test_every_grouping_trains_the_same_models_bit_for_bit(headroom):
    ref, u_ref = _round(headroom, 1e6)                        # all modalities in one pool
    for mb in (0.0, 0.5):                                     # each alone; a few groups
        lr, upd = _round(headroom, mb)
        for m in ref.present:
            a, b = state_to_numpy(ref.models[m]), state_to_numpy(lr.models[m])
            assert all(np.array_equal(a[k], b[k]) for k in a), (mb, m)
        assert upd.shapley == u_ref.shapley and upd.sizes == u_ref.sizes


def test_the_recurrence_without_kept_states_gives_the_same_output():
    g = torch.Generator().manual_seed(0)
    gx, bias, w_hh = torch.randn(3, 32, 7, 5, generator=g), torch.randn(3, 32, 1, generator=g), \
        torch.randn(3, 32, 8, generator=g) * 0.3
    kept, saved = _steps(gx, bias, w_hh, keep=True)
    lean, none = _steps(gx, bias, w_hh, keep=False)
    assert torch.equal(kept, lean) and none == () and saved[0].shape == (7, 3, 32, 5)
