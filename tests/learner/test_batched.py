"""The batched engine (fedmfs.learner.batched) against the reference path, model by model.

Issue 16: the simulator and a device train their modality models in batched steps. Each model must be
the one ``sgd_epochs`` (one nn.LSTM, torch.optim.SGD) trains alone: the same steps, the same early
stop, weights equal to float tolerance (1e-5); fusion models the ones torch.optim.Adam fits.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.settings import TrainConfig
from fedmfs.learner.batched import FusionJob, ModalityJob, _Adam, fit_fusion_reference, fit_fusions, train_modalities
from fedmfs.learner.models import FusionModel, ModalityModel
from fedmfs.learner.training import sgd_epochs


def _reference(job: ModalityJob, cfg: TrainConfig) -> tuple[ModalityModel, int]:
    model = copy.deepcopy(job.model)
    rng = copy.deepcopy(job.rng)
    x = torch.from_numpy(np.asarray(job.x)[job.rows])
    y = torch.from_numpy(np.asarray(job.y)[job.rows])
    loss = nn.NLLLoss()
    val = None
    if job.val_rows is not None and len(job.val_rows):
        xv = torch.from_numpy(np.asarray(job.x)[job.val_rows])
        yv = torch.from_numpy(np.asarray(job.y)[job.val_rows])
        val = lambda: float(loss(model(xv), yv))
    steps = sgd_epochs(model, lambda b: loss(model(x[b]), y[b]), len(y), cfg, rng, val_loss=val)
    return model, steps


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.fixture(scope="module")
def headroom():
    return make_synthetic("headroom", 0)


def _jobs(fleet, clients, val_every=5, seed=0):
    """A job per (client, modality): the client's training windows, every val_every-th held out."""
    jobs = []
    for ci, client in enumerate(clients):
        idx = np.flatnonzero(client.train)
        held = np.arange(len(idx)) % val_every == 0 if val_every else np.zeros(len(idx), bool)
        for mi, m in enumerate(fleet.spec.names):
            if m not in client.x:
                continue
            torch.manual_seed(seed + 100 * ci + mi)
            jobs.append(ModalityJob(ModalityModel(fleet.spec[m], fleet.spec.num_classes), client.x[m], client.y,
                                    np.random.default_rng([seed, ci, mi]), idx[~held], idx[held]))
    return jobs


@pytest.mark.parametrize("cfg", [TrainConfig(min_steps=40), TrainConfig(patience=0, min_steps=20, epochs=2),
                                 TrainConfig(batch_size=7, min_steps=0, epochs=3, patience=1, lr=0.05)],
                         ids=["defaults", "no-early-stop", "short-batches"])
def test_every_model_is_the_one_it_trains_alone(headroom, cfg):
    """Two clients, every modality (widths 2 to 256, tactile missing on one): the same steps and
    weights within 1e-5 of the reference, whichever epoch each one stops at."""
    jobs = _jobs(headroom, [headroom.clients[0], headroom.clients[7]])
    refs = [_reference(j, cfg) for j in jobs]
    steps = train_modalities(jobs, cfg)
    assert steps == [s for _, s in refs]
    assert len(set(steps)) > 1 or cfg.patience == 0       # early stopping did differ between models
    worst = max(_max_diff(j.model, m) for j, (m, _) in zip(jobs, refs, strict=True))
    assert worst < 1e-5
    # and training moved models (some keep their start: their best validation loss was before training)
    fresh = _jobs(headroom, [headroom.clients[0], headroom.clients[7]])
    moved = [_max_diff(j.model, f.model) > 1e-3 for j, f in zip(jobs, fresh, strict=True)]
    assert sum(moved) >= 3


def test_models_of_other_hidden_sizes_train_together():
    spec = DatasetSpec((ModalitySpec("a", (3,), 8), ModalitySpec("b", (5,), 12), ModalitySpec("c", (3,), 12)), 4, 6)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 40)
    jobs = []
    for i, ms in enumerate(spec.modalities):
        torch.manual_seed(i)
        x = (rng.standard_normal((40, 6, *ms.feature_shape)) + y[:, None, None]).astype(np.float32)
        jobs.append(ModalityJob(ModalityModel(ms, 4), x, y, np.random.default_rng(i), np.arange(30), np.arange(30, 40)))
    cfg = TrainConfig(min_steps=10, batch_size=8)
    refs = [_reference(j, cfg) for j in jobs]
    assert train_modalities(jobs, cfg) == [s for _, s in refs]
    assert max(_max_diff(j.model, m) for j, (m, _) in zip(jobs, refs, strict=True)) < 1e-5


def test_a_model_cannot_be_trained_twice_at_once(headroom):
    j = _jobs(headroom, [headroom.clients[0]])[0]
    twin = ModalityJob(j.model, j.x, j.y, np.random.default_rng(1), j.rows, j.val_rows)
    with pytest.raises(ValueError, match="its own model"):
        train_modalities([j, twin], TrainConfig())


def _fusion_jobs(k=5, n=60, m=4, c=6):
    out = []
    for i in range(k):
        torch.manual_seed(i)
        f = FusionModel(m, c, 16)
        g = torch.Generator().manual_seed(100 + i)
        p = torch.rand(n + i, m, c, generator=g)
        mask = (torch.rand(m, generator=g) > 0.3).float().expand(n + i, m).clone()
        out.append(FusionJob(f, p / p.sum(-1, keepdim=True), mask, torch.randint(0, c, (n + i,), generator=g)))
    return out


def test_fusions_fitted_together_are_those_fitted_alone():
    jobs = _fusion_jobs()
    refs = [FusionJob(copy.deepcopy(j.model), j.probs, j.mask, j.y) for j in jobs]
    for r in refs:
        fit_fusion_reference(r, 50, 0.01)
    fit_fusions(jobs, 50, 0.01)
    assert max(_max_diff(j.model, r.model) for j, r in zip(jobs, refs, strict=True)) < 1e-5
    assert _max_diff(jobs[0].model, _fusion_jobs()[0].model) > 1e-3


def test_the_written_out_adam_is_torchs_bit_for_bit():
    torch.manual_seed(0)
    a = [torch.randn(7, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    opt, mine = torch.optim.Adam(a, lr=0.01), _Adam(b, 0.01)
    for step in range(30):
        for ps in (a, b):
            for p in ps:
                p.grad = torch.sin(p.detach() * (step + 1))
        opt.step()
        mine.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_memory_mapped_windows_train_the_same_models(headroom, tmp_path):
    """A device's client file is memory-mapped and its windows are read a batch at a time (no copy of
    the training rows): the models are those trained from windows in memory, bit for bit."""
    client = headroom.clients[0]
    in_memory, mapped = [], []
    idx = np.flatnonzero(client.train)
    for i, m in enumerate(("eye", "tactile_left", "noise64")):
        np.save(tmp_path / f"{m}.npy", client.x[m])
        torch.manual_seed(i)
        model = ModalityModel(headroom.spec[m], headroom.spec.num_classes)
        in_memory.append(ModalityJob(model, client.x[m], client.y, np.random.default_rng(i), idx[9:], idx[:9]))
        mm = np.load(tmp_path / f"{m}.npy", mmap_mode="r")
        assert isinstance(mm, np.memmap)
        mapped.append(ModalityJob(copy.deepcopy(model), mm, client.y, np.random.default_rng(i), idx[9:], idx[:9]))
    cfg = TrainConfig(min_steps=30)
    assert train_modalities(in_memory, cfg) == train_modalities(mapped, cfg, copy_limit=0)   # read per batch
    for a, b in zip(in_memory, mapped, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
