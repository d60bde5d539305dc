"""The lean data path of a training device (issue 16): the client's windows memory-mapped from its .npz
(load_client mmap=True, what the edge trainer uses) and held as ClientData.rows views, not as copies.

A device on that path must train exactly what it trained with its data read whole and split into
copies: the same payload bytes, Shapley values, Stage #1 and Stage #2 accuracies and models.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedmfs.core.data.format import ClientData, Rows, load_client, save_fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.payload import decode_model
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.settings import TrainConfig
from fedmfs.learner.learner import Learner
from fedmfs.learner.models import state_to_numpy

CFG = TrainConfig(epochs=1, min_steps=12, fusion_steps=30, shapley_samples=20, shapley_background=8)


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    save_fleet(make_synthetic("small", 0), d)
    return d


def _run(learner: Learner) -> dict:
    out = {}
    for r in (1, 2):
        upd = learner.local_round(r, {}, "fp32")
        choice = learner.choose(upd, SelectionPolicy())
        learner.mark_uploaded(choice.modalities, r)
        learner.stage2({}, r)
        out[r] = {"payloads": upd.payloads, "shapley": upd.shapley, "stage1": upd.stage1_accuracy,
                  "chosen": choice.modalities, "accuracy": learner.evaluate(),
                  "fusion": state_to_numpy(learner.fusion)}
    return out


def test_the_mapped_views_train_exactly_what_eager_copies_train(fleet_dir):
    spec = make_synthetic("small", 0).spec
    eager = load_client(fleet_dir / "S00.npz", spec)
    lean = load_client(fleet_dir / "S00.npz", spec, mmap=True)
    assert all(isinstance(v, np.memmap) for v in lean.x.values())
    assert not any(isinstance(v, np.memmap) for v in eager.x.values())

    old = Learner(spec, eager, CFG, seed=3, index=1)
    old.xtr, old.ytr = eager.split(True)      # what the learner held before: copies of both splits
    old.xte, old.yte = eager.split(False)
    new = Learner(spec, lean, CFG, seed=3, index=1)
    assert isinstance(new.xtr, Rows) and isinstance(new.xte, Rows)
    a, b = _run(old), _run(new)
    for r in a:
        # the uploads: the same header and tensors, bit for bit (safetensors orders the header's
        # metadata keys as it likes, so the bytes are compared decoded)
        assert set(a[r]["payloads"]) == set(b[r]["payloads"])
        for m, blob in a[r]["payloads"].items():
            (ha, ta), (hb, tb) = decode_model(blob), decode_model(b[r]["payloads"][m])
            assert ha == hb and set(ta) == set(tb)
            assert all(ta[k].tobytes() == tb[k].tobytes() for k in ta)
        assert a[r]["shapley"] == b[r]["shapley"]
        assert a[r]["chosen"] == b[r]["chosen"]
        assert a[r]["stage1"] == b[r]["stage1"] and a[r]["accuracy"] == b[r]["accuracy"]
        assert all(np.array_equal(a[r]["fusion"][k], b[r]["fusion"][k]) for k in a[r]["fusion"])
    first, second = (decode_model(a[r]["payloads"]["xsens"])[1] for r in (1, 2))
    assert any(not np.array_equal(first[k], second[k]) for k in first)     # the rounds trained something


def test_rows_are_the_split_in_order(fleet_dir):
    spec = make_synthetic("small", 0).spec
    c = load_client(fleet_dir / "S02.npz", spec, mmap=True)
    for train in (True, False):
        x, y = c.split(train)
        v, yv = c.rows(train)
        assert list(v) == list(x) and v.n == len(y) and np.array_equal(y, yv)
        for m in x:
            got = v[m]
            assert type(got) is np.ndarray and not isinstance(got, np.memmap) and np.array_equal(got, x[m])


def test_compressed_members_are_read_not_mapped(tmp_path):
    spec = make_synthetic("small", 0).spec
    c = make_synthetic("small", 0).clients[0]
    p = tmp_path / "S00.npz"
    np.savez_compressed(p, **{f"x_{k}": v for k, v in c.x.items()}, y=c.y, train=c.train)
    got = load_client(p, spec, mmap=True)
    assert not any(isinstance(v, np.memmap) for v in got.x.values())
    assert all(np.array_equal(got.x[m], c.x[m]) for m in c.x)


def test_non_finite_windows_are_refused_when_mapped(tmp_path):
    spec = make_synthetic("small", 0).spec
    c = make_synthetic("small", 0).clients[0]
    x = {k: v.copy() for k, v in c.x.items()}
    x["xsens"][-1, -1, -1] = np.nan     # in the last chunk the check reads
    p = tmp_path / "S00.npz"
    np.savez(p, **{f"x_{k}": v for k, v in x.items()}, y=c.y, train=c.train)
    with pytest.raises(Exception, match="NaN or infinite"):
        load_client(p, spec, mmap=True)
    assert isinstance(ClientData("S00", x, c.y, c.train).rows(True)[0], Rows)


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from fedmfs.core.data.format import load_client
    from fedmfs.core.modality import DatasetSpec, ModalitySpec
    spec = DatasetSpec((ModalitySpec("big", (64, 64), 8),), 2, 50)
    rss = lambda: int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
    before = rss()
    c = load_client(sys.argv[1], spec, mmap=sys.argv[2] == "1")
    x, _ = c.rows(True)
    row = x["big"][:1]        # gathers the training rows: the copy is what stays resident
    del row
    print(rss() - before)
""")


def test_a_mapped_client_is_not_resident(tmp_path):
    """100 MiB of windows: read whole they are resident; mapped, the load (which checks every value)
    leaves a few MB, and a gathered split is its own copy only (the mapped pages are given back)."""
    n = 128
    x = np.random.default_rng(0).uniform(-1, 1, (n, 50, 64, 64)).astype(np.float32)
    p = tmp_path / "big.npz"
    np.savez(p, x_big=x, y=np.zeros(n, np.int64), train=np.arange(n) % 4 != 0)
    del x
    grow = {}
    for mmap in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", CHILD, str(p), mmap], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        grow[mmap] = int(r.stdout.split()[-1])
    assert grow["0"] > 90                 # read whole: the 100 MiB of windows are resident
    assert grow["1"] < 40, grow           # mapped: nothing of the file stays resident
