"""Small models sgdlab did not write, for the real-models tests (issue 12): built from configs, random init,
nothing downloaded. Each builder takes a seed and returns ``(model, make_batch)`` where ``make_batch(n, seed)``
gives ``(inputs, targets)`` and the model's loss is ``loss_of(model, inputs, targets)``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F


def transformers_or_skip():
    return pytest.importorskip("transformers")


def gpt2(seed: int = 0, dropout: float = 0.1, vocab: int = 64, context: int = 16, n_layer: int = 2, n_embd: int = 32):
    """Hugging Face GPT-2 (``transformers.GPT2LMHeadModel``) from a config: Conv1D (addmm) linears, learned
    position embeddings looked up with a broadcast index, tied output head, dropout in train mode."""
    tf = transformers_or_skip()
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(n_layer=n_layer, n_head=2, n_embd=n_embd, vocab_size=vocab, n_positions=context,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=0, eos_token_id=0)
    model = tf.GPT2LMHeadModel(cfg)

    def make_batch(n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, vocab, (n, context), generator=g)
        return x, x

    return model, make_batch


class HFLoss(nn.Module):
    """Wraps a causal LM so that ``model(x)`` gives logits (the shape sgdlab's loss helpers expect)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        return self.lm(input_ids=x).logits


def lm_loss(logits, targets):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))


class Recurrent(nn.Module):
    """A sequence classifier on ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (batch_first)."""

    def __init__(self, kind: str = "lstm", features: int = 6, hidden: int = 8, classes: int = 3, layers: int = 1):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.rnn = cls(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def recurrent(kind: str = "lstm", seed: int = 0, steps: int = 5, features: int = 6, classes: int = 3):
    torch.manual_seed(seed)
    model = Recurrent(kind, features=features, classes=classes)

    def make_batch(n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, steps, features, generator=g), torch.randint(0, classes, (n,), generator=g)

    return model, make_batch


class Attention(nn.Module):
    """``nn.MultiheadAttention`` self-attention over a sequence, mean-pooled, then a linear head."""

    def __init__(self, d: int = 8, heads: int = 2, classes: int = 3, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(y.mean(1))


def attention(seed: int = 0, steps: int = 5, d: int = 8, classes: int = 3):
    torch.manual_seed(seed)
    model = Attention(d, classes=classes)

    def make_batch(n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, steps, d, generator=g), torch.randint(0, classes, (n,), generator=g)

    return model, make_batch


def dropout_mlp(seed: int = 0, features: int = 10, classes: int = 3, p: float = 0.5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, classes))

    def make_batch(n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)

    return model, make_batch


class Block(nn.Module):
    """A ResNet basic block with a choice of normalisation (``"group"`` or ``"batch"``)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        def make(c):
            return nn.GroupNorm(2, c) if norm == "group" else nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.n1 = make(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.n2 = make(c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), make(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        y = F.relu(self.n1(self.conv1(x)))
        return F.relu(self.n2(self.conv2(y)) + self.skip(x))


def resnet(seed: int = 0, norm: str = "group", width: int = 8, classes: int = 4, size: int = 8):
    """A ResNet-18-shaped network (stem, 4 stages of basic blocks, pooled head), small widths."""
    torch.manual_seed(seed)
    norm_layer = (lambda c: nn.GroupNorm(2, c)) if norm == "group" else nn.BatchNorm2d
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), norm_layer(width), nn.ReLU()]
    c = width
    for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
        layers += [Block(c, c_out, 1 if i == 0 else 2, norm), Block(c_out, c_out, 1, norm)]
        c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    model = nn.Sequential(*layers)

    def make_batch(n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)

    return model, make_batch


def bn_cnn(seed: int = 0, classes: int = 4, size: int = 8):
    """A small CNN with BatchNorm (running statistics are buffers)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * size * size, classes))

    def make_batch(n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 1, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)

    return model, make_batch
