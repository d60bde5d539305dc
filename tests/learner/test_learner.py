"""fedmfs.learner: the Learner (local round, choice, record), its files (store) and the SGD loop
(training), on one client of the small synthetic fleet."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.payload import Codec, decode_model, state_digest
from fedmfs.core.records import RoundRecord
from fedmfs.core.selection import Alphas, SelectionPolicy, evidence_priority, priority
from fedmfs.core.settings import TrainConfig
from fedmfs.learner.learner import Choice, Learner, LocalUpdate
from fedmfs.learner.models import state_to_numpy
from fedmfs.learner.store import restore_learner, save_learner
from fedmfs.learner.training import sgd_epochs

CFG = TrainConfig(min_steps=0, epochs=1, fusion_steps=10, shapley_samples=8)
SEED = 11
INDEX = 5


@pytest.fixture(scope="module")
def fleet():
    return make_synthetic("small", 0)


@pytest.fixture(scope="module")
def client(fleet):
    # S06: no tactile gloves, so its modalities are a strict subset of the spec's
    c = fleet.clients[INDEX]
    assert c.name == "S06" and set(c.modalities) < set(fleet.spec.names)
    return c


def new_learner(fleet, client, seed=SEED, config=CFG) -> Learner:
    return Learner(fleet.spec, client, config, seed=seed, index=INDEX)


@pytest.fixture(scope="module")
def trained(fleet, client):
    """A learner after round 0 from no globals, with its fp32 update."""
    lr = new_learner(fleet, client)
    return lr, lr.local_round(0, {}, "fp32")


@pytest.fixture(scope="module")
def fp16_update(fleet, client):
    """The same learner (same seed) in the same round, encoding fp16."""
    return new_learner(fleet, client).local_round(0, {}, "fp16")


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def states_differ(a: dict, b: dict) -> bool:
    return a.keys() != b.keys() or any(not np.array_equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------- local_round

def test_local_round_update_fields(trained, client):
    lr, u = trained
    present = list(client.modalities)
    assert lr.present == [m for m in lr.spec.names if m in client.x]
    assert isinstance(u, LocalUpdate)
    assert u.round_index == 0
    assert u.codec == "fp32"
    assert u.samples == client.n_train == int(client.train.sum())
    assert set(u.states) == set(u.payloads) == set(u.sizes) == set(present)
    assert 0.0 <= u.stage1_accuracy <= 1.0
    # the states are the learner's current local models
    for m in present:
        assert_states_equal(u.states[m], state_to_numpy(lr.models[m]))


def test_shapley_keys_are_the_clients_present_modalities(trained, client, fleet):
    _, u = trained
    assert sorted(u.shapley) == sorted(client.modalities)
    assert "tactile_left" not in u.shapley and "tactile_right" not in u.shapley
    assert all(isinstance(v, float) and math.isfinite(v) for v in u.shapley.values())
    # not a constant placeholder: the modalities' impacts differ
    assert len(set(u.shapley.values())) > 1


def test_sizes_are_the_encoded_payload_lengths_and_payloads_decode(trained, client):
    lr, u = trained
    for m, payload in u.payloads.items():
        assert u.sizes[m] == len(payload)
        assert lr.payload(u, m) is payload
        header, state = decode_model(payload)
        assert header.codec is Codec.FP32
        assert header.modality == m
        assert header.round == 0
        assert header.samples == client.n_train
        # fp32 is lossless
        assert_states_equal(state, u.states[m])
        assert header.sha256 == state_digest(u.states[m])


def test_fp16_payloads_are_about_half_the_size(trained, fp16_update):
    _, u32 = trained
    u16 = fp16_update
    assert u16.codec == "fp16"
    assert u16.sizes.keys() == u32.sizes.keys()
    # the same seed trains the same weights whatever the codec
    for m in u32.states:
        assert_states_equal(u16.states[m], u32.states[m])
    for m, payload in u16.payloads.items():
        assert u16.sizes[m] == len(payload)
        header, state = decode_model(payload)
        assert header.codec is Codec.FP16 and header.modality == m
        for k, v in state.items():
            np.testing.assert_array_equal(v, u32.states[m][k].astype(np.float16).astype(np.float32))
        ratio = u32.sizes[m] / u16.sizes[m]
        assert 1.8 < ratio < 2.05, (m, ratio)


def test_local_round_starts_from_a_new_global(fleet, client, trained):
    """With zero epochs the local model is exactly the global it started from; the learner records
    the digest of the global it synced to."""
    _, u = trained
    g = {m: {k: v + 0.25 for k, v in s.items()} for m, s in u.states.items()}
    lr = new_learner(fleet, client, config=TrainConfig(min_steps=0, epochs=0, fusion_steps=10, shapley_samples=8))
    upd = lr.local_round(3, g, "fp32")
    for m in g:
        assert_states_equal(upd.states[m], g[m])
        assert lr.history.synced[m] == state_digest(g[m])
    assert all(decode_model(upd.payloads[m])[0].round == 3 for m in g)


# ------------------------------------------------------------------------------------- choose

def test_choose_default_priorities_and_gamma(trained):
    lr, u = trained
    present = tuple(lr.present)
    phi, sizes = np.array([u.shapley[m] for m in present]), np.array([u.sizes[m] for m in present])
    # the paper's formula (priority = "paper"): every modality ranked by it, gamma of them sent
    paper = SelectionPolicy(gamma=1, priority="paper")
    c1 = lr.choose(u, paper)
    assert isinstance(c1, Choice)
    assert set(c1.priorities) == set(present)
    # the priorities are the core formula on this update (never uploaded: t - (-1) = t + 1)
    want = priority(phi, sizes, Alphas(), np.full(len(present), 1.0), 0)
    np.testing.assert_allclose([c1.priorities[m] for m in present], want, rtol=0, atol=1e-12)
    ranked = sorted(present, key=lambda m: (-c1.priorities[m], present.index(m)))
    assert c1.modalities == (ranked[0],)
    c2 = lr.choose(u, dataclasses.replace(paper, gamma=2))
    assert len(c2.modalities) == 2
    assert set(c2.modalities) == set(ranked[:2])
    assert list(c2.modalities) == [m for m in present if m in c2.modalities]   # modality order
    assert lr.choose(u, dataclasses.replace(paper, gamma=0)).modalities == ()
    assert lr.choose(u, dataclasses.replace(paper, gamma=99)).modalities == present
    # the default, the evidence priority: only modalities whose score shows value, ranked among themselves
    pe, ok = evidence_priority(phi, sizes, Alphas(), np.full(len(present), 1.0), 0, SelectionPolicy().evidence)
    d1 = lr.choose(u, SelectionPolicy(gamma=1))
    np.testing.assert_allclose([d1.priorities[m] for m in present], pe, rtol=0, atol=1e-12)
    eligible = [m for m, e in zip(present, ok) if e]
    assert eligible and d1.modalities == (max(eligible, key=lambda m: (d1.priorities[m], -present.index(m))),)
    assert lr.choose(u, SelectionPolicy(gamma=99)).modalities == tuple(eligible)


def test_choose_other_methods(trained):
    lr, u = trained
    assert lr.choose(u, SelectionPolicy(method="all", gamma=1)).modalities == tuple(lr.present)
    assert lr.choose(u, SelectionPolicy(method="local", gamma=3)).modalities == ()
    r = lr.choose(u, SelectionPolicy(method="random", gamma=2))
    assert len(r.modalities) == 2 and set(r.modalities) <= set(lr.present)
    # the random choice is seeded by (seed, index, round): the same every time
    assert lr.choose(u, SelectionPolicy(method="random", gamma=2)) == r


def test_choose_honours_the_byte_cap(trained):
    lr, u = trained
    sizes = u.sizes
    smallest = min(sizes, key=lambda m: (sizes[m], m))
    # a cap that only the smallest model fits under
    cap = sizes[smallest]
    assert sorted(sizes.values())[1] > cap
    # (the paper's formula: every modality may go; the evidence priority's own cap tests: test_selection.py)
    c = lr.choose(u, SelectionPolicy(gamma=3, cap_bytes=cap, priority="paper"))
    assert c.modalities == (smallest,)
    # nothing fits
    assert lr.choose(u, SelectionPolicy(gamma=3, cap_bytes=cap - 1)).modalities == ()
    # a cap that fits everything: gamma decides
    total = sum(sizes.values())
    assert lr.choose(u, SelectionPolicy(gamma=len(sizes), cap_bytes=total, priority="paper")).modalities == \
        tuple(lr.present)
    # every subset the knapsack returns fits the cap and gamma
    for cap in (total // 4, total // 2, total - 1):
        for gamma in (1, 2, 3):
            ch = lr.choose(u, SelectionPolicy(gamma=gamma, cap_bytes=cap))
            assert sum(sizes[m] for m in ch.modalities) <= cap
            assert len(ch.modalities) <= gamma


def test_choose_refuses_a_policy_with_another_codec(trained, fp16_update):
    lr, u = trained
    with pytest.raises(ValueError, match="fp32.*fp16"):
        lr.choose(u, SelectionPolicy(codec="fp16"))
    with pytest.raises(ValueError, match="fp16.*int8"):
        lr.choose(fp16_update, SelectionPolicy(codec="int8"))
    assert len(lr.choose(fp16_update, SelectionPolicy(codec="fp16")).modalities) == 1


def test_recency_enters_the_priority_after_mark_uploaded(fleet, client, trained):
    _, u = trained
    lr = new_learner(fleet, client)
    present = tuple(lr.present)
    lr.mark_uploaded([present[0]], 0)
    assert lr.history.last_upload == {present[0]: 0}
    # the same scores one round later: the uploaded modality is 1 round old, the others never uploaded
    u1 = dataclasses.replace(u, round_index=1)
    ch = lr.choose(u1, SelectionPolicy(gamma=1, priority="paper"))
    a = Alphas()
    base = priority(np.array([u.shapley[m] for m in present]), np.array([u.sizes[m] for m in present]), a)
    since = np.array([1.0] + [2.0] * (len(present) - 1))
    np.testing.assert_allclose([ch.priorities[m] for m in present], base + a.r * since / 2, atol=1e-12)


# ------------------------------------------------------------------------------------- record

def test_record_equals_the_update_and_the_choice(trained, client):
    lr, u = trained
    ch = lr.choose(u, SelectionPolicy(gamma=2))
    rec = lr.record(u, ch)
    assert isinstance(rec, RoundRecord)
    assert rec.device == client.name
    assert rec.round == u.round_index
    assert rec.samples == u.samples
    assert dict(rec.shapley) == u.shapley
    assert dict(rec.sizes) == u.sizes
    assert dict(rec.priorities) == ch.priorities
    assert rec.chosen == ch.modalities
    assert rec.stage1_accuracy == u.stage1_accuracy
    # a copy, not the update's own dicts
    assert rec.shapley is not u.shapley and rec.sizes is not u.sizes
    # what the wire carries reads back equal
    assert RoundRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


# -------------------------------------------------------------------------------- determinism

def test_same_seed_same_update_different_seed_different(fleet, client, trained):
    _, u = trained
    again = new_learner(fleet, client).local_round(0, {}, "fp32")
    for m in u.states:
        assert_states_equal(again.states[m], u.states[m])
    # the payloads carry the same header and tensors (their bytes may differ: safetensors writes the
    # metadata map in hash order)
    assert again.sizes == u.sizes
    for m in u.payloads:
        ha, sa = decode_model(again.payloads[m])
        hb, sb = decode_model(u.payloads[m])
        assert ha == hb
        assert_states_equal(sa, sb)
    assert again.shapley == u.shapley
    assert again.stage1_accuracy == u.stage1_accuracy
    other = new_learner(fleet, client, seed=SEED + 1).local_round(0, {}, "fp32")
    assert other.states.keys() == u.states.keys()
    assert all(states_differ(other.states[m], u.states[m]) for m in u.states)
    assert all(decode_model(other.payloads[m])[0].sha256 != decode_model(u.payloads[m])[0].sha256 for m in u.states)
    assert other.shapley != u.shapley


def test_fresh_learners_initialise_from_the_seed(fleet, client):
    a, b, c = new_learner(fleet, client), new_learner(fleet, client), new_learner(fleet, client, seed=SEED + 7)
    for m in a.present:
        assert_states_equal(state_to_numpy(a.models[m]), state_to_numpy(b.models[m]))
        assert states_differ(state_to_numpy(a.models[m]), state_to_numpy(c.models[m]))
    np.testing.assert_array_equal(a.fold, b.fold)


# -------------------------------------------------------------------------------------- store

def test_save_and_restore_round_trip(fleet, client, tmp_path):
    lr = new_learner(fleet, client)
    u = lr.local_round(0, {}, "fp32")
    ch = lr.choose(u, SelectionPolicy(gamma=2))
    lr.mark_uploaded(ch.modalities, 0)
    g = {m: u.states[m] for m in ch.modalities}
    # history.synced only changes when a new global arrives; give it one for a later round
    lr.history.synced = {m: state_digest(u.states[m]) for m in ch.modalities}
    lr.stage2(g, 0)
    acc = lr.evaluate()

    d = tmp_path / "client"
    save_learner(lr, d)
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted([f"local_{m}.safetensors" for m in lr.present] + ["fusion.safetensors", "client.json"])
    saved = json.loads((d / "client.json").read_text())
    assert saved["config"]["epochs"] == CFG.epochs and saved["config"]["fusion_steps"] == CFG.fusion_steps

    # a learner built with another seed has other weights until restored
    back = new_learner(fleet, client, seed=SEED + 100)
    assert states_differ(state_to_numpy(back.models[lr.present[0]]), state_to_numpy(lr.models[lr.present[0]]))
    assert back.fusion is None
    restore_learner(back, d, g)
    for m in lr.present:
        assert_states_equal(state_to_numpy(back.models[m]), state_to_numpy(lr.models[m]))
    assert back.history.last_upload == lr.history.last_upload == {m: 0 for m in ch.modalities}
    assert back.history.synced == lr.history.synced
    assert back.fusion is not None and back.fusion.training is False
    assert_states_equal(state_to_numpy(back.fusion), state_to_numpy(lr.fusion))
    assert set(back.deployed) == set(lr.deployed)
    assert back.evaluate() == acc
    ls, lf = lr.personalised_states()
    bs, bf = back.personalised_states()
    assert_states_equal(lf, bf)
    for m in ls:
        assert_states_equal(ls[m], bs[m])


def test_save_before_stage2_has_no_fusion(fleet, client, tmp_path, trained):
    lr, _ = trained
    assert lr.fusion is None
    save_learner(lr, tmp_path)
    assert not (tmp_path / "fusion.safetensors").exists()
    back = new_learner(fleet, client, seed=SEED + 3)
    restore_learner(back, tmp_path)
    assert back.fusion is None
    for m in lr.present:
        assert_states_equal(state_to_numpy(back.models[m]), state_to_numpy(lr.models[m]))
    with pytest.raises(RuntimeError, match="stage2"):
        back.evaluate()


def test_restore_from_an_empty_directory_changes_nothing(fleet, client, tmp_path):
    lr = new_learner(fleet, client)
    before = {m: state_to_numpy(lr.models[m]) for m in lr.present}
    restore_learner(lr, tmp_path)
    for m in lr.present:
        assert_states_equal(state_to_numpy(lr.models[m]), before[m])
    assert lr.history.last_upload == {} and lr.history.synced == {} and lr.fusion is None


def test_save_overwrites_the_previous_files(fleet, client, tmp_path, trained):
    lr, _ = trained
    other = new_learner(fleet, client, seed=SEED + 5)
    other.mark_uploaded(["eye"], 7)
    save_learner(other, tmp_path)
    save_learner(lr, tmp_path)
    back = new_learner(fleet, client, seed=SEED + 9)
    restore_learner(back, tmp_path)
    for m in lr.present:
        assert_states_equal(state_to_numpy(back.models[m]), state_to_numpy(lr.models[m]))
    assert back.history.last_upload == lr.history.last_upload
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------ training

def _toy(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.3
    return x, y


def _toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.1), nn.Linear(8, 1))


def test_sgd_epochs_lowers_the_loss_and_leaves_eval_mode():
    x, y = _toy()
    model = _toy_model()
    loss_fn = nn.MSELoss()

    def full_loss():
        model.eval()
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    before = full_loss()
    model.train()   # whatever mode it was in, it ends in eval
    sgd_epochs(model, lambda b: loss_fn(model(x[b]), y[b]), len(y),
               TrainConfig(min_steps=0, epochs=20, lr=0.05, batch_size=16), np.random.default_rng(0))
    assert model.training is False
    assert all(not m.training for m in model.modules())
    after = full_loss()
    assert after < 0.5 * before, (before, after)


def test_sgd_epochs_visits_every_row_once_per_epoch_in_batches():
    model = nn.Linear(2, 1)
    batches: list[list[int]] = []

    def batch_loss(b):
        batches.append(b.tolist())
        assert model.training is True      # trains in train mode
        return model(torch.zeros(len(b), 2)).sum()

    sgd_epochs(model, batch_loss, 10, TrainConfig(min_steps=0, epochs=3, lr=0.01, batch_size=4), np.random.default_rng(1))
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    epochs = [sum(batches[i:i + 3], []) for i in (0, 3, 6)]
    for e in epochs:
        assert sorted(e) == list(range(10))
    # a fresh order each epoch, drawn from the given rng
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    rng = np.random.default_rng(1)
    assert epochs == [rng.permutation(10).tolist() for _ in range(3)]


def test_sgd_epochs_with_zero_lr_or_zero_epochs_changes_nothing():
    x, y = _toy()
    for cfg in (TrainConfig(min_steps=0, epochs=3, lr=0.0, batch_size=8), TrainConfig(min_steps=0, epochs=0, lr=0.5)):
        model = _toy_model()
        before = state_to_numpy(model)
        model.train()
        sgd_epochs(model, lambda b, model=model: nn.functional.mse_loss(model(x[b]), y[b]), len(y), cfg,
                   np.random.default_rng(0))
        assert_states_equal(state_to_numpy(model), before)
        assert model.training is False


def test_sgd_epochs_is_deterministic_in_the_rng():
    x, y = _toy()
    out = []
    for seed in (4, 4, 5):
        model = _toy_model()
        model[1].p = 0.0   # no dropout randomness: only the batch order differs
        sgd_epochs(model, lambda b, model=model: nn.functional.mse_loss(model(x[b]), y[b]), len(y),
                   TrainConfig(min_steps=0, epochs=2, lr=0.05, batch_size=8), np.random.default_rng(seed))
        out.append(state_to_numpy(model))
    assert_states_equal(out[0], out[1])
    assert states_differ(out[0], out[2])


def test_a_late_joiner_starts_a_never_aggregated_modality_from_the_fleets_initial_model():
    """Issue 8: the round-1 announcement listed only aggregated globals, so a device joining then
    started the others from its own random initialisation. The coordinator now lists every global
    (tests/coordinator); a learner given one it has not started from starts from it."""
    from fedmfs.core.payload import state_digest
    from fedmfs.learner.models import initial_globals

    f = make_synthetic("small", 0)
    client = f.clients[0]
    fleet_init = initial_globals(f.spec, seed=0)
    late = Learner(f.spec, client, TrainConfig(min_steps=0, epochs=0, fusion_steps=2, shapley_samples=4), seed=0, index=5)
    m = client.modalities[0]
    own = {k: v.detach().numpy().copy() for k, v in late.models[m].state_dict().items()}
    assert any(not np.array_equal(own[k], fleet_init[m][k]) for k in own)   # its own init differs
    late.local_round(1, {m: fleet_init[m]}, "fp32")
    got = {k: v.detach().numpy() for k, v in late.models[m].state_dict().items()}
    for k in got:   # epochs=0: the model is exactly the fleet's initial model it started from
        np.testing.assert_array_equal(got[k], fleet_init[m][k])
    assert late.history.synced[m] == state_digest(fleet_init[m])


def test_a_step_floor_turns_a_few_windows_into_enough_optimiser_steps():
    """Issue 8: with ten training windows and batches of 32, `epochs = 5` was five optimiser steps a
    round; `min_steps` adds epochs until the floor is reached (and changes nothing on larger data)."""
    model = nn.Linear(2, 1)
    steps: list[int] = []
    took = sgd_epochs(model, lambda b: (steps.append(len(b)), model(torch.zeros(len(b), 2)).sum())[1], 10,
                      TrainConfig(epochs=5, batch_size=32, min_steps=40), np.random.default_rng(0))
    assert took == len(steps) == 40 and set(steps) == {10}
    assert sgd_epochs(nn.Linear(2, 1), lambda b: model(torch.zeros(len(b), 2)).sum(), 320,
                      TrainConfig(epochs=5, batch_size=32, min_steps=40), np.random.default_rng(0)) == 50
    assert sgd_epochs(nn.Linear(2, 1), lambda b: model(torch.zeros(len(b), 2)).sum(), 10,
                      TrainConfig(epochs=0, min_steps=40), np.random.default_rng(0)) == 0


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    """Training on labels the validation part contradicts: the validation loss only rises, so training
    stops after `patience` epochs and the model keeps the weights it started from (its best)."""
    x, y = _toy()
    model = _toy_model()
    model[1].p = 0.0
    start = state_to_numpy(model)
    loss = nn.MSELoss()
    took = sgd_epochs(model, lambda b: loss(model(x[b]), y[b]), len(y),
                      TrainConfig(min_steps=0, epochs=50, lr=0.05, batch_size=8, patience=2), np.random.default_rng(0),
                      val_loss=lambda: float(loss(model(x), -y)))
    per_epoch = math.ceil(len(y) / 8)
    assert took == 2 * per_epoch
    assert_states_equal(state_to_numpy(model), start)
    assert model.training is False
    # a validation loss that keeps falling trains the whole budget and keeps the last weights
    model2 = _toy_model()
    took2 = sgd_epochs(model2, lambda b: loss(model2(x[b]), y[b]), len(y),
                       TrainConfig(min_steps=0, epochs=6, lr=0.05, batch_size=8, patience=2), np.random.default_rng(0),
                       val_loss=lambda: float(loss(model2(x), y)))
    assert took2 == 6 * per_epoch


@pytest.mark.parametrize("engine", ["reference", "batched"])
def test_the_validation_part_is_fixed_and_never_trained_on(fleet, client, engine):
    """Issue 8: the held-out fold rotated over rounds, so by round 2 the fold scored on had been trained
    on (a pure-noise model had memorised it and scored as informative). Now one fixed fold of the
    training windows is the validation part: the modality models never see it (either engine)."""
    cfg = TrainConfig(min_steps=0, epochs=1, fusion_steps=5, shapley_samples=8, score_on="crossfit", patience=1,
                      engine=engine)
    lr = new_learner(fleet, client, config=cfg)
    held = set(np.nonzero(lr.fold == 0)[0].tolist())
    assert 0 < len(held) < len(lr.ytr) / 3
    seen: list[set[int]] = []
    if engine == "reference":
        orig = lr._train_modality

        def spy(m, r, rows, val_rows):
            seen.append(set(rows.tolist()))
            assert set(val_rows.tolist()) == held
            return orig(m, r, rows, val_rows)

        lr._train_modality = spy
    else:
        orig_jobs = lr.training_jobs
        position = {int(g): i for i, g in enumerate(lr.train_index)}   # data row -> training window

        def spy_jobs(plan):
            jobs = orig_jobs(plan)
            for j in jobs:
                seen.append({position[int(g)] for g in j.rows})
                assert {position[int(g)] for g in j.val_rows} == held
            return jobs

        lr.training_jobs = spy_jobs
    for r in range(3):
        lr.local_round(r, {}, "fp32")
    assert seen and all(not (s & held) and len(s) + len(held) == len(lr.ytr) for s in seen)


def test_score_smoothing_blends_the_rounds_and_survives_a_restart(fleet, client, tmp_path):
    """Issue 8: one round's chance contribution of a noise modality could outrank a modality that helps
    round after round; with `score_smoothing` the score a device selects by carries past rounds."""
    cfg = TrainConfig(min_steps=0, epochs=1, fusion_steps=5, shapley_samples=8, score_smoothing=0.5)
    raw = new_learner(fleet, client, config=dataclasses.replace(cfg, score_smoothing=0.0))
    smooth = new_learner(fleet, client, config=cfg)
    r0, s0 = raw.local_round(0, {}, "fp32"), smooth.local_round(0, {}, "fp32")
    assert s0.shapley == r0.shapley             # nothing to blend with yet
    save_learner(smooth, tmp_path)
    again = new_learner(fleet, client, config=cfg)
    restore_learner(again, tmp_path)
    r1, s1 = raw.local_round(1, {}, "fp32"), again.local_round(1, {}, "fp32")
    for m in r1.shapley:
        assert s1.shapley[m] == pytest.approx(0.5 * r0.shapley[m] + 0.5 * r1.shapley[m])
    with pytest.raises(Exception, match="score_smoothing"):
        TrainConfig(score_smoothing=1.0)
