"""The fast path's rules for layers of models sgdlab did not write (issue 12): recurrent layers (``nn.LSTM``,
``nn.GRU``, ``nn.RNN``), ``nn.MultiheadAttention``, and Hugging Face GPT-2 (``Conv1D`` is ``torch.addmm``,
positions are looked up with an index broadcast over the batch). Each is checked against the oracle: a plain
loop of per-example backward passes (float64), for the per-example norms and the clipped sum."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdlab.errors import ConfigError
from sgdlab.privacy import DPSGD

from . import zoo


def _loop(model, loss_fn, batch, clip):
    """The oracle: per-example flat norms and ``Σ_i min(1, C / (‖g_i‖ + 1e-6)) g_i`` by one backward each."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    norms = []
    for i in range(batch[0].shape[0]):
        one = tuple(t[i:i + 1] for t in batch)
        grads = torch.autograd.grad(loss_fn(model, one), list(params.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values(), strict=True)]
        norm = torch.cat([g.flatten() for g in grads]).norm()
        norms.append(norm)
        c = min(1.0, clip / (norm.item() + 1e-6))
        for k, g in zip(params, grads, strict=True):
            total[k] += c * g
    return total, torch.stack(norms)


def _check(model, loss_fn, batch, *, grad_sample="ghost", budget=None, rtol=1e-10):
    """The engine's norms and clipped sums against the loop, with clipping inactive and then active for every
    example; the engine must take ``grad_sample`` without a fallback."""
    clips = [1e9]
    for clip in clips:
        engine = DPSGD(model, loss_fn, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=1.0,
                       grad_sample=grad_sample)
        if budget is not None:
            engine._ghost.budget = budget
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="DP-SGD")
            sums, _ = engine.clipped_sum(batch)
            norms = engine.per_sample_norms(batch)
        assert engine.method == grad_sample
        flat = torch.stack(list(norms.values())).norm(dim=0)
        ref, ref_norms = _loop(model, loss_fn, batch, clip)
        torch.testing.assert_close(flat, ref_norms, rtol=rtol, atol=0)
        for k in ref:
            torch.testing.assert_close(sums[k], ref[k], rtol=rtol, atol=rtol * ref[k].abs().max().item(),
                                       msg=lambda m, k=k: f"clipped sum {k}: {m}")
        if len(clips) == 1:
            clips.append(0.5 * ref_norms.min().item())


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


# ---- recurrent layers -----------------------------------------------------------------------------------


class _Recurrent(nn.Module):
    def __init__(self, cls, batch_first=True, **kw):
        super().__init__()
        self.rnn = cls(5, 4, batch_first=batch_first, **kw)
        self.batch_first = batch_first
        out = (kw.get("proj_size") or 4) * (2 if kw.get("bidirectional") else 1)
        self.head = nn.Linear(out, 3)

    def forward(self, x):
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head((out if self.batch_first else out.transpose(0, 1)).mean(1))


RECURRENT = {
    "lstm": (nn.LSTM, {}), "gru": (nn.GRU, {}), "rnn": (nn.RNN, {}),
    "lstm-2-layers-bidirectional": (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    "gru-2-layers-bidirectional": (nn.GRU, {"num_layers": 2, "bidirectional": True}),
    "rnn-relu-2-layers": (nn.RNN, {"num_layers": 2, "nonlinearity": "relu"}),
    "lstm-proj": (nn.LSTM, {"proj_size": 3}),
    "gru-sequence-first-no-bias": (nn.GRU, {"batch_first": False, "bias": False}),
}


def _sequences(n=5, steps=6, features=5, classes=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, steps, features, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


@pytest.mark.parametrize("which", list(RECURRENT))
@pytest.mark.parametrize("grad_sample", ["ghost", "vmap"])
def test_recurrent_layers_match_the_loop(which, grad_sample):
    torch.manual_seed(0)
    cls, kw = RECURRENT[which]
    _check(_Recurrent(cls, **kw).double(), _ce, _sequences(), grad_sample=grad_sample)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_zoo_models_take_the_fast_path_within_any_budget(kind):
    model, make_batch = zoo.recurrent(kind)
    x, y = make_batch(6)
    for budget in (None, 0):  # kept per-example gradients, then Gram matrices / chunks
        _check(model.double(), _ce, (x.double(), y), budget=budget)


def test_recurrent_layer_trains_with_the_default():
    # the issue: GRU and RNN ended in a raw RuntimeError; now the default takes the fast path, and vmap works
    model, make_batch = zoo.recurrent("gru")
    x, y = make_batch(8)
    engine = DPSGD(model, _ce, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DP-SGD")
        engine.backward((x, y))
    assert engine.method == "ghost" and engine._checked
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


class _Cells(nn.Module):
    """A cell called at every step: its weights are reused, so each use adds into one per-example gradient."""

    def __init__(self, cls):
        super().__init__()
        self.cell = cls(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
@pytest.mark.parametrize("grad_sample", ["ghost", "vmap"])
def test_recurrent_cells_match_the_loop(cls, grad_sample):
    torch.manual_seed(9)
    _check(_Cells(cls).double(), _ce, _sequences(5, 4, 5), grad_sample=grad_sample)


class _Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(5, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x, lengths):
        _, h = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return self.head(h[-1])


@pytest.mark.parametrize("grad_sample", ["auto", "ghost", "vmap"])
def test_packed_sequences_are_refused_in_one_line_naming_the_layer(grad_sample):
    torch.manual_seed(8)
    x, y = _sequences(6, 7, 5)
    lengths = torch.tensor([7, 5, 3, 7, 2, 6])
    engine = DPSGD(_Packed().double(), lambda m, b: F.cross_entropy(m(b[0], b[1]), b[2]), noise_multiplier=1.0,
                   max_grad_norm=1.0, expected_batch_size=6, grad_sample=grad_sample)
    layer = "a recurrent layer" if grad_sample == "vmap" else "layer 'rnn' (GRU)"
    with pytest.raises(ConfigError, match=rf"^DP-SGD: {re.escape(layer)} is given a packed sequence.*padded batch"):
        engine.backward((x, lengths, y))


# ---- multi-head attention -------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, batch_first=True, mask=None, padding=False, weights=False, bias=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(8, 3)
        self.batch_first, self.mask, self.padding, self.weights = batch_first, mask, padding, weights

    def forward(self, x):
        xx = x if self.batch_first else x.transpose(0, 1)
        padding = (x[..., 0] > 1.0) if self.padding else None
        y, w = self.attn(xx, xx, xx, need_weights=self.weights, attn_mask=self.mask, key_padding_mask=padding)
        y = y if self.batch_first else y.transpose(0, 1)
        out = self.head(y.mean(1))
        return out + w[:, 0, :3] if self.weights else out


ATTENTION = {"plain": {}, "sequence-first": {"batch_first": False},
             "causal": {"mask": torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)},
             "float-mask": {"mask": torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)},
             "key-padding": {"padding": True}, "weights-returned": {"weights": True}, "no-bias": {"bias": False}}


@pytest.mark.parametrize("which", list(ATTENTION))
def test_multihead_attention_matches_the_loop(which):
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    batch = torch.randn(6, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    _check(_Attention(**ATTENTION[which]).double(), _ce, batch)


def test_zoo_attention_takes_the_fast_path_within_any_budget():
    model, make_batch = zoo.attention()
    x, y = make_batch(6)
    for budget in (None, 0):
        _check(model.double(), _ce, (x.double(), y), budget=budget)


class _CrossAttention(nn.Module):
    """Attention from a sequence to a shorter memory: key and value the same tensor (``"kv"``), or all three
    different (``"all"``), with the packed projection or separate ones (``kdim``), and a key padding mask."""

    def __init__(self, mode, kdim=None, batch_first=True, bias=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
        self.mk, self.mv = nn.Linear(8, kdim or 8), nn.Linear(8, kdim or 8)
        self.head = nn.Linear(8, 3)
        self.mode, self.batch_first = mode, batch_first

    def forward(self, x):
        k = torch.tanh(self.mk(x[:, :4]))  # a memory of 4 positions
        v = k if self.mode == "kv" else torch.tanh(self.mv(x[:, 1:5]))
        padding = torch.zeros(x.shape[0], 4, dtype=torch.bool)
        padding[:, -1] = x[:, 0, 0] > 0  # the last memory position, for some examples
        q = x
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), (k.transpose(0, 1) if v is k else v.transpose(0, 1))
        y, _ = self.attn(q, k, v, need_weights=False, key_padding_mask=padding)
        return self.head((y if self.batch_first else y.transpose(0, 1)).mean(1))


CROSS = {"kv": {"mode": "kv"}, "all": {"mode": "all"}, "separate-projections": {"mode": "all", "kdim": 6},
         "kv-no-bias": {"mode": "kv", "bias": False}, "all-sequence-first": {"mode": "all", "batch_first": False}}


@pytest.mark.parametrize("which", list(CROSS))
def test_cross_attention_matches_the_loop(which):
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(6)
    batch = torch.randn(6, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    model = _CrossAttention(**CROSS[which]).double()
    for budget in (None, 0):
        _check(model, _ce, batch, budget=budget)


def test_attention_with_bias_kv_falls_back_naming_the_reason():
    torch.manual_seed(5)
    model = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True).double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    engine = DPSGD(model, lambda m, b: m(b, b, b, need_weights=False)[0].pow(2).mean(), noise_multiplier=0.0,
                   max_grad_norm=1.0, expected_batch_size=4)
    with pytest.warns(UserWarning, match="bias_k, bias_v"):
        engine.clipped_sum(x)
    assert engine.method == "vmap"


# ---- Hugging Face GPT-2, and the operations it needs -------------------------------------------------------


def _lm(model, batch):
    return zoo.lm_loss(model(batch[0]), batch[1])


def test_hf_gpt2_takes_the_fast_path_and_matches_the_loop():
    lm, make_batch = zoo.gpt2(dropout=0.0)
    model = zoo.HFLoss(lm).double()
    batch = make_batch(5)
    for budget in (None, 0):
        _check(model, _lm, batch, budget=budget)


class _Pieces(nn.Module):
    """Conv1D-style ``addmm`` (with ``W`` and with ``W.t()``), a broadcast position lookup with ``padding_idx``,
    and ``Tensor.to`` that changes nothing."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Embedding(9, 6, padding_idx=2)
        self.w1 = nn.Parameter(torch.randn(6, 7))  # (d_in, d_out), as Conv1D
        self.b1 = nn.Parameter(torch.randn(7))
        self.w2 = nn.Parameter(torch.randn(3, 7))  # used as w2.t()
        self.b2 = nn.Parameter(torch.randn(3))

    def forward(self, x):
        positions = torch.arange(x.shape[1]).unsqueeze(0)  # (1, T): broadcast over the batch
        h = self.tok(x) + self.pos(positions).to(torch.float64)
        h = torch.tanh(torch.addmm(self.b1, h.view(-1, 6), self.w1))
        return torch.addmm(self.b2, h, self.w2.t()).view(x.shape[0], x.shape[1], 3)


def test_addmm_broadcast_embedding_and_to_match_the_loop():
    torch.manual_seed(6)
    model = _Pieces().double()
    g = torch.Generator().manual_seed(7)
    batch = torch.randint(0, 11, (5, 4), generator=g), torch.randint(0, 3, (5, 4), generator=g)

    def loss(m, b):
        return F.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())

    for budget in (None, 0):
        _check(model, loss, batch, budget=budget)


def test_bench_dp_has_a_gpt2_row():
    zoo.transformers_or_skip()
    from sgdlab.bench import dp

    lines = []
    res = dp.bench_model("gpt2", batch_size=4, steps=1, rounds=1, device="cpu", opacus=False, log=lines.append)
    assert set(res["ms_per_step"]) == {"non-private", "sgdlab", "sgdlab-vmap"}
    assert any(line.startswith("| sgdlab |") for line in lines)
    assert res["sgdlab_path"] == "ghost"


def test_bench_dp_skips_gpt2_without_transformers(capsys, monkeypatch):
    import sys

    from sgdlab.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert main(["bench", "dp", "--models", "gpt2", "--no-opacus"]) == 0
    assert "gpt2: skipped (transformers is not installed: pip install transformers)" in capsys.readouterr().out
