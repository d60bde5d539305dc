"""Many small models trained at once: one batched step for every (device, modality) model.

Why: the models are tiny (an LSTM of 16-64 units on batches of 32), so one optimiser step of one model
is ~1 ms of per-call overhead (the forward, autograd's backward, the optimiser) around microseconds of
arithmetic. A device trains one model per modality, a simulated fleet nine devices' worth, one after
the other. Here every model that steps at the same time runs in the same few batched calls: the
input projections of the models of one input width in one ``bmm``, the recurrence of every model of
one hidden size in one ``baddbmm`` per time step, the heads in one more. The weights of the models
trained together are stacked into one leaf tensor per kind; a model that finishes (its epoch budget
spent, or stopped early) is written back and the stack is rebuilt without it.

Each model's training is the one :func:`fedmfs.learner.training.sgd_epochs` gives it alone, step for
step: its own epoch budget, its own ``rng`` order of rows, its own mini-batches (a short last batch is
padded with rows of weight 0), its own early stopping on its own validation rows, its own SGD update
(the batched loss is the sum of every model's mean batch loss, so each model's gradient is the
gradient of its own loss). Only the order of floating-point sums differs from the per-model
``nn.LSTM`` path, so the models agree with it to float tolerance (``tests/learner/test_batched.py``:
within 1e-5), not bit for bit. The per-model path stays as the reference
(``TrainConfig.engine = "reference"``).

Fusion models are fitted the same way (:func:`fit_fusions`): full-batch Adam on stacked weights, every
model's rows in one forward. Adam is elementwise, so one optimiser over the stack is each model's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmfs.core.data.format import row_chunks
from fedmfs.core.settings import TrainConfig
from fedmfs.learner.models import FusionModel, ModalityModel
from fedmfs.learner.training import epoch_budget

__all__ = ["ModalityJob", "FusionJob", "train_modalities", "fit_fusions", "fit_fusion_reference"]


@dataclass(eq=False)
class ModalityJob:
    """One model to train in place on the windows ``x`` (N, T, *features) float32 with labels ``y``
    (N,) int64 (numpy arrays, memory-mapped ones too: only the rows used are read): the training rows
    ``rows`` of them (all when None), and the validation rows ``val_rows`` (none when None or empty);
    ``rng`` orders the rows of each epoch."""

    model: ModalityModel
    x: np.ndarray
    y: np.ndarray
    rng: np.random.Generator
    rows: np.ndarray | None = None
    val_rows: np.ndarray | None = None
    steps: int = 0                         # optimiser steps taken (the result)


def _params(model: ModalityModel) -> list[torch.Tensor]:
    """w_ih, w_hh, b_ih, b_hh, head_w, head_b: the model's own parameters."""
    lstm, head = model.lstm, model.head
    return [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0, head.weight, head.bias]


class _Pool:
    """The chosen rows of every run's windows of one input width, for gathering batches.

    Copied (``copy``: windows in memory, a simulation, or small ones), the rows go once into one tensor
    with a zero row that pads short batches, so that a step gathers each width's batch in one call.
    Not copied (a device's large memory-mapped client file), each step reads just its batch's windows
    from the file (a copy of a device's training windows would be most of its RAM: 208 MB on
    paper-size data)."""

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray]], copy: bool):
        sizes = [len(rows) for _, rows in parts]
        x0 = parts[0][0]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.zero = int(sum(sizes))
        self.tail = (int(x0.shape[1]), int(np.prod(x0.shape[2:])))
        self.parts: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.data: torch.Tensor | None = None
        if not copy:
            self.parts = list(parts)
            return
        data = np.zeros((self.zero + 1, *self.tail), np.float32)
        for (x, rows), off in zip(parts, self.offsets):
            data[off:off + len(rows)] = np.asarray(x)[rows].reshape(len(rows), *self.tail)
        self.data = torch.from_numpy(data)

    def gather(self, slots: Sequence[int], rows: Sequence[np.ndarray], length: int) -> torch.Tensor:
        """(len(slots), T, length, F), time-major (what the input projection multiplies): run
        ``slots[k]``'s rows ``rows[k]``, padded with zeros. Read from the file, each part of the rows
        goes straight to its place (no row-major copy of the batch beside it: a tactile pair's batch
        is 26 MB on paper-size data)."""
        steps, width = self.tail
        if self.parts is not None:
            out = np.zeros((len(slots), steps, length, width), np.float32)
            for k, (slot, r) in enumerate(zip(slots, rows)):
                x, chosen = self.parts[slot]
                for i, part in row_chunks(x, chosen[r]):
                    out[k, :, i:i + len(part)] = part.reshape(len(part), steps, width).transpose(1, 0, 2)
            return torch.from_numpy(out)
        assert self.data is not None
        idx = np.full((len(slots), length), self.zero, dtype=np.int64)
        for k, (slot, r) in enumerate(zip(slots, rows)):
            idx[k, :len(r)] = self.offsets[slot] + r
        x = self.data.index_select(0, torch.from_numpy(idx.reshape(-1))).view(len(slots), length, steps, width)
        return x.transpose(1, 2).contiguous()


@dataclass(eq=False)
class _Run:
    """One job's progress through :func:`sgd_epochs`'s loop."""

    job: ModalityJob
    epochs: int
    stop_early: bool
    rows: np.ndarray
    val_rows: np.ndarray
    width: int = field(init=False)
    hidden: int = field(init=False)
    slot: int = -1                          # its place in its width's training pool
    val_slot: int = -1                      # and in the validation pool
    pool: _Pool | None = None
    val_pool: _Pool | None = None
    epoch: int = 0
    order: np.ndarray | None = None
    pos: int = 0
    best: float = math.inf
    best_state: list[torch.Tensor] | None = None
    stale: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        self.width = int(np.prod(self.job.x.shape[2:]))
        self.hidden = int(self.job.model.lstm.hidden_size)

    @property
    def n(self) -> int:
        return len(self.rows)

    def start_epoch(self) -> None:
        self.order = self.job.rng.permutation(self.n)
        self.pos = 0

    def next_batch(self, size: int) -> np.ndarray:
        assert self.order is not None
        b = self.order[self.pos:self.pos + size]
        self.pos += size
        return b

    def check(self, loss: float, patience: int, state: list[torch.Tensor]) -> bool:
        """:func:`sgd_epochs`'s early-stopping rule on the validation ``loss``; True: stop."""
        if loss < self.best - 1e-6:
            self.best, self.best_state, self.stale = loss, [p.detach().clone() for p in state], 0
        else:
            self.stale += 1
        return self.stale >= patience


def _steps(gx: torch.Tensor, bias: torch.Tensor, w_hh: torch.Tensor, keep: bool
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The LSTM recurrence's forward steps (see :class:`_Recurrence`): the last h (A, H, R), and with
    ``keep`` the states of every step (gates, tanh(c), c, h), step-major, for the backward pass.
    Without ``keep`` (a loss without gradient: validation), one buffer of each is reused from step to
    step (two of c): the same operations on the same values, without the (T, A, 4H, R) gates (31 MB
    for a paper-size device's validation rows)."""
    a, four_h, steps, rows = gx.shape
    hid = four_h // 4
    n, n_c = (steps, steps) if keep else (1, 2)
    gates = torch.empty(n, a, four_h, rows)      # activated: i, f, g, o
    tanh_c = torch.empty(n, a, hid, rows)
    cells = torch.empty(n_c, a, hid, rows)
    hs = torch.empty(n, a, hid, rows)
    h = c = None
    g_blk = slice(2 * hid, 3 * hid)
    for t in range(steps):
        s = gates[t % n]
        torch.add(gx[:, :, t], bias, out=s)
        if h is not None:
            s.baddbmm_(w_hh, h)
        s[:, g_blk].mul_(2.0)
        torch.sigmoid(s, out=s)
        s[:, g_blk].mul_(2.0).sub_(1.0)
        i_g, f_g, g_g, o_g = s[:, :hid], s[:, hid:2 * hid], s[:, g_blk], s[:, 3 * hid:]
        cell = cells[t % n_c]
        torch.mul(i_g, g_g, out=cell)
        if c is not None:
            cell.addcmul_(f_g, c)
        tc = tanh_c[t % n]
        torch.sigmoid(cell * 2.0, out=tc)
        tc.mul_(2.0).sub_(1.0)
        h = torch.mul(o_g, tc, out=hs[t % n])
        c = cell
    assert h is not None
    return h.clone(), ((gates, tanh_c, cells, hs) if keep else ())


class _Recurrence(torch.autograd.Function):
    """The LSTM recurrence of A stacked models, with its backward pass written out (backpropagation
    through time) instead of recorded op by op: at 16-64 units the per-op bookkeeping of autograd
    cost more than the arithmetic.

    Forward: ``gx`` (A, 4H, T, R) = W_ih x for every step (rows last: each step's gate is a block of
    contiguous rows for the elementwise kernels), ``bias`` (A, 4H, 1) = b_ih + b_hh, ``w_hh``
    (A, 4H, H); per step pre = gx_t + bias + W_hh h, gates i, f, o = sigmoid, g = tanh,
    c = f c + i g, h = o tanh(c) (torch's LSTM, gate order i, f, g, o). Returns the last h (A, H, R).
    The states of every step are kept for the backward pass, step-major (T, A, ., R) so that each
    step's block is contiguous for the batched matmuls. tanh(x) is computed as 2 sigmoid(2x) - 1
    (the same to ~1e-7; torch's CPU tanh is about ten times slower than its sigmoid)."""

    @staticmethod
    def forward(ctx, gx: torch.Tensor, bias: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h, saved = _steps(gx, bias, w_hh, keep=True)
        ctx.save_for_backward(w_hh, *saved)
        return h

    @staticmethod
    def backward(ctx, dh_last: torch.Tensor):  # type: ignore[override]
        w_hh, gates, tanh_c, cells, hs = ctx.saved_tensors
        steps, a, four_h, rows = gates.shape
        hid = four_h // 4
        dgx = torch.empty(a, four_h, steps, rows)
        d = torch.empty(a, four_h, rows)
        dw_hh = torch.zeros_like(w_hh)
        w_hh_t = w_hh.transpose(1, 2)
        dh = dh_last.contiguous()
        dc = torch.zeros(a, hid, rows)
        for t in range(steps - 1, -1, -1):
            s = gates[t]
            i_g, f_g, g_g, o_g = s[:, :hid], s[:, hid:2 * hid], s[:, 2 * hid:3 * hid], s[:, 3 * hid:]
            tc = tanh_c[t]
            d_i, d_f, d_g, d_o = d[:, :hid], d[:, hid:2 * hid], d[:, 2 * hid:3 * hid], d[:, 3 * hid:]
            # dc += dh * o * (1 - tanh(c)^2)
            torch.mul(dh, o_g, out=d_i)                  # d_i as scratch
            dc.addcmul_(d_i, 1.0 - tc * tc)
            # d pre_o = dh * tanh(c) * o (1 - o)
            torch.mul(dh, tc, out=d_o)
            d_o.mul_(o_g * (1.0 - o_g))
            # d pre_i = dc * g * i (1 - i); d pre_g = dc * i * (1 - g^2)
            torch.mul(dc, g_g, out=d_i)
            d_i.mul_(i_g * (1.0 - i_g))
            torch.mul(dc, i_g, out=d_g)
            d_g.mul_(1.0 - g_g * g_g)
            if t > 0:
                torch.mul(dc, cells[t - 1], out=d_f)
                d_f.mul_(f_g * (1.0 - f_g))
                dw_hh.baddbmm_(d, hs[t - 1].transpose(1, 2))
                dh = torch.bmm(w_hh_t, d)
                dc.mul_(f_g)
            else:
                d_f.zero_()
            dgx[:, :, t] = d
        return dgx, dgx.sum((2, 3)).unsqueeze(2), dw_hh


def _lstm_logp(xs: list[torch.Tensor], w_ih: Sequence[torch.Tensor], b_ih: torch.Tensor, w_hh: torch.Tensor,
               b_hh: torch.Tensor, head_w: torch.Tensor, head_b: torch.Tensor) -> torch.Tensor:
    """``ModalityModel.forward`` of A stacked models on their own windows: ``xs`` per input width
    (A_w, T, rows, F_w), time-major (:meth:`_Pool.gather`), with that width's ``w_ih`` (A_w, 4H, F_w),
    the A = sum A_w models in that order; the other weights stacked (A, ...). Returns
    log-probabilities (A, rows, C). ``xs`` is emptied (its batches are not kept)."""
    a, steps, rows = int(b_ih.shape[0]), int(xs[0].shape[1]), int(xs[0].shape[2])
    hidden = int(w_hh.shape[2])
    # W_ih x for every (step, row) column at once: (A, 4H, T, rows), each step's rows contiguous
    parts = [torch.bmm(w, x.reshape(x.shape[0], steps * rows, x.shape[3]).transpose(1, 2))
             for x, w in zip(xs, w_ih)]
    xs.clear()   # the projection keeps what its gradient needs (not in validation): the batches go
    gx = (parts[0] if len(parts) == 1 else torch.cat(parts)).view(a, 4 * hidden, steps, rows)
    del parts
    bias = (b_ih + b_hh).unsqueeze(2)
    if torch.is_grad_enabled():
        h = _Recurrence.apply(gx, bias, w_hh)                                          # (A, H, rows)
    else:
        h = _steps(gx, bias, w_hh, keep=False)[0]
    del gx
    logits = torch.baddbmm(head_b.unsqueeze(2), head_w, h)                          # (A, C, rows)
    return torch.log_softmax(logits, dim=1).transpose(1, 2)


class _Stack:
    """The active runs of one hidden size with their weights stacked into leaf tensors (runs ordered
    by input width, so each width's models are one contiguous block)."""

    def __init__(self, runs: list[_Run]):
        self.runs = sorted(runs, key=lambda r: r.width)
        self.widths: list[tuple[int, int, int]] = []          # (width, start, stop) blocks
        for i, r in enumerate(self.runs):
            if self.widths and self.widths[-1][0] == r.width:
                self.widths[-1] = (r.width, self.widths[-1][1], i + 1)
            else:
                self.widths.append((r.width, i, i + 1))
        ps = [_params(r.job.model) for r in self.runs]
        with torch.no_grad():
            self.w_ih = [torch.stack([p[0] for p in ps[s:e]]).requires_grad_() for _, s, e in self.widths]
            self.rest = [torch.stack([p[k] for p in ps]).requires_grad_() for k in range(1, 6)]

    def leaves(self) -> list[torch.Tensor]:
        return [*self.w_ih, *self.rest]

    def state_of(self, i: int) -> list[torch.Tensor]:
        """Run ``i``'s weights as views of the stack, in :func:`_params` order."""
        blk = next(k for k, (_, s, e) in enumerate(self.widths) if s <= i < e)
        w_hh, b_ih, b_hh, head_w, head_b = (t[i] for t in self.rest)
        return [self.w_ih[blk][i - self.widths[blk][1]], w_hh, b_ih, b_hh, head_w, head_b]

    def write_back(self) -> None:
        with torch.no_grad():
            for i, r in enumerate(self.runs):
                for p, v in zip(_params(r.job.model), self.state_of(i)):
                    p.copy_(v)

    def logp(self, which: Sequence[int], batches: Sequence[np.ndarray], val: bool = False) -> torch.Tensor:
        """Log-probabilities (len(which), rows, C) of the runs at positions ``which`` (ascending) on
        their windows ``batches[k]`` (indices into the run's training rows, or its validation rows
        with ``val``), padded with zero windows to the longest."""
        rows = max(len(b) for b in batches)
        xs, w_ih = [], []
        for blk, (_, s, e) in enumerate(self.widths):
            ks = [k for k, i in enumerate(which) if s <= i < e]
            if not ks:
                continue
            runs = [self.runs[which[k]] for k in ks]
            pool = runs[0].val_pool if val else runs[0].pool
            assert pool is not None
            xs.append(pool.gather([r.val_slot if val else r.slot for r in runs], [batches[k] for k in ks], rows))
            sel = [which[k] - s for k in ks]
            w_ih.append(self.w_ih[blk] if len(sel) == e - s else self.w_ih[blk][sel])
        every = len(which) == len(self.runs)
        w_hh, b_ih, b_hh, head_w, head_b = (t if every else t[list(which)] for t in self.rest)
        return _lstm_logp(xs, w_ih, b_ih, w_hh, b_hh, head_w, head_b)

    def nll(self, which: Sequence[int], batches: Sequence[np.ndarray], val: bool = False) -> torch.Tensor:
        """Each run's mean negative log-likelihood on its ``batches[k]`` (len(which),)."""
        logp = self.logp(which, batches, val)
        a, rows = int(logp.shape[0]), int(logp.shape[1])
        y = np.zeros((a, rows), np.int64)
        w = np.zeros((a, rows), np.float32)
        for k, (i, b) in enumerate(zip(which, batches)):
            r = self.runs[i]
            y[k, :len(b)] = r.job.y[(r.val_rows if val else r.rows)[b]]
            w[k, :len(b)] = 1.0 / len(b)
        ll = logp.gather(2, torch.from_numpy(y).unsqueeze(2)).squeeze(2)
        return -(ll * torch.from_numpy(w)).sum(1)


def _val_losses(stack: _Stack, which: list[int]) -> list[float]:
    """The validation loss (mean NLL over all its validation rows) of the runs at ``which``."""
    if not which:
        return []
    with torch.no_grad():
        nll = stack.nll(which, [np.arange(len(stack.runs[i].val_rows)) for i in which], val=True)
        return [float(v) for v in nll]


def _stacks(runs: Sequence[_Run]) -> list[_Stack]:
    by_hidden: dict[int, list[_Run]] = {}
    for r in runs:
        if not r.done:
            by_hidden.setdefault(r.hidden, []).append(r)
    return [_Stack(rs) for _, rs in sorted(by_hidden.items())]


# memory-mapped training windows up to this size are copied into memory for training (faster steps)
COPY_LIMIT = 64 << 20


def train_modalities(jobs: Sequence[ModalityJob], cfg: TrainConfig, copy_limit: int | None = COPY_LIMIT) -> list[int]:
    """Train every job's model in place as :func:`fedmfs.learner.training.sgd_epochs` trains it alone
    (with ``cfg``), all of them in the same batched steps; returns each job's optimiser steps. The
    models may differ in input width and hidden size; all windows must have the same number of steps.

    Windows in memory are copied (their training rows, once); memory-mapped ones only if their
    training rows take at most ``copy_limit`` bytes (None: always), else read a batch at a time."""
    runs = []
    for job in jobs:
        n = int(job.x.shape[0])
        if job.y.shape != (n,):
            raise ValueError(f"{n} windows but labels of shape {tuple(job.y.shape)}")
        rows = np.arange(n) if job.rows is None else np.asarray(job.rows, dtype=np.int64)
        val_rows = np.zeros(0, np.int64) if job.val_rows is None else np.asarray(job.val_rows, dtype=np.int64)
        stop_early = len(val_rows) > 0 and cfg.patience > 0
        runs.append(_Run(job, epoch_budget(len(rows), cfg), stop_early, rows, val_rows))
    if len({id(r.job.model) for r in runs}) != len(runs):
        raise ValueError("every job must train its own model")
    if len({int(r.job.x.shape[1]) for r in runs}) > 1:
        raise ValueError("the windows of models trained together must have the same number of steps")
    by_width: dict[int, list[_Run]] = {}
    for r in runs:
        r.job.model.train()
        by_width.setdefault(r.width, []).append(r)
    mapped = sum(len(r.rows) * r.job.x[:1].nbytes for r in runs if isinstance(r.job.x, np.memmap))
    copy = copy_limit is None or mapped <= copy_limit
    for group in by_width.values():
        pool = _Pool([(r.job.x, r.rows) for r in group], copy)
        early = [r for r in group if r.stop_early]
        val_pool = _Pool([(r.job.x, r.val_rows) for r in early], copy) if early else None
        for slot, r in enumerate(group):
            r.slot, r.pool = slot, pool
        for slot, r in enumerate(early):
            r.val_slot, r.val_pool = slot, val_pool
    # the loss before training (sgd_epochs measures it first: the start may be the best weights)
    for st in _stacks([r for r in runs if r.stop_early]):
        which = list(range(len(st.runs)))
        for i, loss in zip(which, _val_losses(st, which)):
            st.runs[i].check(loss, cfg.patience, st.state_of(i))
    for r in runs:
        if r.epochs == 0 or r.n == 0:
            r.done = True
        else:
            r.start_epoch()
    stacks = _stacks(runs)
    while stacks:
        parts = []
        for st in stacks:
            which = range(len(st.runs))
            parts.append(st.nll(which, [r.next_batch(cfg.batch_size) for r in st.runs]).sum())  # type: ignore[arg-type]
        leaves = [p for st in stacks for p in st.leaves()]
        for p in leaves:
            p.grad = None
        sum(parts).backward()  # type: ignore[union-attr]
        with torch.no_grad():
            for p in leaves:
                p.add_(p.grad, alpha=-cfg.lr)
        finished = False
        for st in stacks:
            ended = []
            for i, r in enumerate(st.runs):
                r.job.steps += 1
                if r.pos >= r.n:
                    ended.append(i)
            checked = [i for i in ended if st.runs[i].stop_early]
            losses = dict(zip(checked, _val_losses(st, checked)))
            for i in ended:
                r = st.runs[i]
                r.epoch += 1
                stop = r.stop_early and r.check(losses[i], cfg.patience, st.state_of(i))
                if stop or r.epoch >= r.epochs:
                    r.done = finished = True
                else:
                    r.start_epoch()
        if finished:
            for st in stacks:
                st.write_back()
            stacks = _stacks(runs)
    for r in runs:
        if r.stop_early and r.best_state is not None:
            with torch.no_grad():
                for p, best in zip(_params(r.job.model), r.best_state):
                    p.copy_(best)
        r.job.model.eval()
    return [r.job.steps for r in runs]


@dataclass(eq=False)
class FusionJob:
    """One fusion model to fit in place on modality outputs ``probs`` (N, M, C) with the presence
    ``mask`` (N, M) and labels ``y`` (N,)."""

    model: FusionModel
    probs: torch.Tensor
    mask: torch.Tensor
    y: torch.Tensor


def _fusion_params(f: FusionModel) -> list[torch.Tensor]:
    return [f.net[0].weight, f.net[0].bias, f.net[2].weight, f.net[2].bias]


def fit_fusion_reference(job: FusionJob, steps: int, lr: float) -> None:
    """The reference fit of one fusion model: ``steps`` full-batch ``torch.optim.Adam`` steps on
    ``nn.NLLLoss`` (what :func:`fit_fusions` reproduces for many at once)."""
    f = job.model
    opt = torch.optim.Adam(f.parameters(), lr=lr)
    loss_fn = torch.nn.NLLLoss()
    f.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(f(job.probs, job.mask), job.y).backward()
        opt.step()
    f.eval()


class _Adam:
    """torch's single-tensor Adam (``torch.optim.Adam`` defaults: betas 0.9, 0.999, eps 1e-8), the same
    operations in the same order, written out: a first ``torch.optim`` step imports torch's compiler
    stack (+73 MiB resident on a device) for nothing a plain loop needs."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.avg = [torch.zeros_like(p) for p in self.params]
        self.avg_sq = [torch.zeros_like(p) for p in self.params]
        self.step_count = 0

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.step_count += 1
        step = float(self.step_count)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        step_size = self.lr / bias_correction1
        for p, m, v in zip(self.params, self.avg, self.avg_sq):
            g = p.grad
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(self.eps), value=-step_size)


def fit_fusions(jobs: Sequence[FusionJob], steps: int, lr: float) -> None:
    """Fit every job's fusion model as :func:`fit_fusion_reference` fits one alone: ``steps``
    full-batch Adam steps (learning rate ``lr``) on the mean NLL of its own rows, all models stacked
    (Adam is elementwise: one optimiser over the stacked weights is each model's own)."""
    if not jobs:
        return
    shapes = {tuple(tuple(p.shape) for p in _fusion_params(j.model)) for j in jobs}
    if len(shapes) > 1:
        raise ValueError(f"fusion models of different shapes cannot be fitted together: {sorted(shapes)}")
    rows = max(int(j.y.shape[0]) for j in jobs)
    a = len(jobs)
    d_in = int(jobs[0].model.net[0].in_features)
    z = torch.zeros(a, rows, d_in)
    y = torch.zeros(a, rows, dtype=torch.int64)
    w = torch.zeros(a, rows)
    for k, j in enumerate(jobs):
        n = int(j.y.shape[0])
        z[k, :n] = torch.cat([(j.probs * j.mask.unsqueeze(-1)).reshape(n, -1), j.mask], dim=-1)
        y[k, :n] = j.y
        w[k, :n] = 1.0 / n
    with torch.no_grad():
        w1, b1, w2, b2 = (torch.stack([_fusion_params(j.model)[k] for j in jobs]).requires_grad_() for k in range(4))
    opt = _Adam([w1, b1, w2, b2], lr)
    for _ in range(steps):
        for p in (w1, b1, w2, b2):
            p.grad = None
        hid = torch.relu(torch.baddbmm(b1.unsqueeze(1), z, w1.transpose(1, 2)))
        logp = torch.log_softmax(torch.baddbmm(b2.unsqueeze(1), hid, w2.transpose(1, 2)), dim=2)
        (-(logp.gather(2, y.unsqueeze(2)).squeeze(2) * w).sum()).backward()
        opt.step()
    with torch.no_grad():
        for k, j in enumerate(jobs):
            for p, v in zip(_fusion_params(j.model), (w1[k], b1[k], w2[k], b2[k])):
                p.copy_(v)
            j.model.eval()
