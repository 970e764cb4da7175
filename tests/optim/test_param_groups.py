"""Orientation of matrix parameters and ``sgdlab.optim.param_groups`` (issue 12, item 7).

A weight stored ``(in, out)`` -- transformers' ``Conv1D`` -- in a group with ``orientation="in_out"`` gets exactly
the transposed update of the equivalent ``(out, in)`` ``nn.Linear`` weight under every optimizer with a matrix
rule (Muon, AuON, Hybrid-AuON, SWAN, FRUGAL); ``param_groups(model)`` puts embeddings, a tied head, the input and
output layers, norms and biases on the AdamW side and marks Conv1D weights ``in_out``.
"""

import copy
import io

import pytest
import torch
from torch import nn

import sgdlab.optim as optim
from sgdlab.errors import ConfigError
from sgdlab.optim import FRUGAL, SWAN, AuON, HybridAuON, Muon, param_groups
from tests import zoo

MATRIX = [
    ("muon", Muon, dict(lr=0.02, weight_decay=0.1)),
    ("muon-rms", Muon, dict(lr=0.02, adjust_lr="match_rms_adamw", nesterov=False)),
    ("auon", AuON, dict(lr=0.08)),
    ("hybrid-auon", HybridAuON, dict(lr=0.08, weight_decay=0.0)),
    ("swan", SWAN, dict(lr=1e-3, weight_decay=0.1)),
    ("swan-norescale", SWAN, dict(lr=1e-3, rescale=False)),
    ("frugal-svd", FRUGAL, dict(lr=1e-3, rho=0.5, update_gap=2, weight_decay=0.1)),
    ("frugal-svd-sgd", FRUGAL, dict(lr=1e-3, rho=0.34, update_gap=3, state_free="sgd")),
    ("frugal-blocks", FRUGAL, dict(lr=1e-3, rho=0.5, update_gap=2, projection="blocks")),
]
SHAPES = [(6, 4), (4, 6), (5, 5)]  # (out, in): tall, wide, square (FRUGAL's projection side)


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]


def _run(cls, hp, weights, grads, orientation, foreach):
    params = [w.clone().requires_grad_() for w in weights]
    group = {"params": params} if orientation is None else {"params": params, "orientation": orientation}
    opt = cls([group], foreach=foreach, **hp)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g
        opt.step()
    return params


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name, cls, hp", MATRIX, ids=[m[0] for m in MATRIX])
def test_in_out_weight_gets_exactly_the_transposed_update_of_the_linear_weight(name, cls, hp, foreach):
    torch.manual_seed(1)
    linear = [torch.randn(s, dtype=torch.float64) for s in SHAPES]  # (out, in), as nn.Linear stores them
    grads = _grads(SHAPES, steps=5)
    out_in = _run(cls, hp, linear, grads, None, foreach)  # the default orientation
    in_out = _run(cls, hp, [w.T.contiguous() for w in linear], [[g.T.contiguous() for g in gs] for gs in grads],
                  "in_out", foreach)
    for a, b in zip(out_in, in_out, strict=True):
        assert b.shape == a.T.shape and torch.equal(b, a.T)  # bit for bit: the method sees the same matrix


WITHOUT = [("muon", (6, 4)), ("auon", (6, 4)), ("swan", (6, 4)), ("frugal-svd", (5, 5))]


@pytest.mark.parametrize("name, shape", WITHOUT, ids=[n for n, _ in WITHOUT])
def test_without_the_orientation_a_transposed_weight_gets_another_update(name, shape):
    """Why the key exists: Muon's and AuON's shape factor, SWAN's row axis and FRUGAL's projection side (square
    matrices) depend on which side is ``in``."""
    _, cls, hp = next(m for m in MATRIX if m[0] == name)
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=torch.float64)
    grads = _grads([shape], steps=3)
    (a,) = _run(cls, hp, [w], grads, None, False)
    (b,) = _run(cls, hp, [w.T.contiguous()], [[g.T.contiguous() for g in gs] for gs in grads], None, False)
    assert (b - a.T).abs().max() > 1e-4


@pytest.mark.parametrize("name, cls, hp", MATRIX, ids=[m[0] for m in MATRIX])
def test_transformers_conv1d_steps_as_the_equivalent_linear(name, cls, hp):
    """A real ``transformers`` Conv1D next to an nn.Linear holding the same map, both through param_groups."""
    tf = zoo.transformers_or_skip()
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                        nn.Linear(4, 2)).double()
    conv = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), Conv1D(5, 5), nn.Tanh(), Conv1D(4, 5), nn.Tanh(),
                         nn.Linear(4, 2)).double()
    assert tf is not None
    with torch.no_grad():
        for i in (0, 6):
            conv[i].load_state_dict(lin[i].state_dict())
        for i in (2, 4):
            conv[i].weight.copy_(lin[i].weight.T)
            conv[i].bias.copy_(lin[i].bias)
    groups = param_groups(conv)
    assert [g.get("orientation", "out_in") for g in groups[:1]] == ["in_out"]  # the hidden layers are Conv1D
    kw = dict(adamw_options={"split": False}) if cls is FRUGAL else {}
    opt_lin, opt_conv = cls(param_groups(lin, **kw), **hp), cls(param_groups(conv, **kw), **hp)
    x = torch.randn(16, 3, dtype=torch.float64)
    for _ in range(4):
        for model, opt in ((lin, opt_lin), (conv, opt_conv)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for i in (2, 4):
        torch.testing.assert_close(conv[i].weight, lin[i].weight.T, rtol=0, atol=1e-10)
        torch.testing.assert_close(conv[i].bias, lin[i].bias, rtol=0, atol=1e-10)


def _names(model, group):
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return [names[id(p)] for p in group["params"]]


def test_param_groups_of_hf_gpt2():
    model, make_batch = zoo.gpt2(dropout=0.0)
    groups = param_groups(model)
    assert [{k: v for k, v in g.items() if k != "params"} for g in groups] == [{"orientation": "in_out"},
                                                                               {"use_adamw": True}]
    matrices, adamw = (_names(model, g) for g in groups)
    assert matrices == [f"transformer.h.{i}.{m}.weight" for i in range(2)
                        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one Parameter, on AdamW
    assert adamw[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert all(n.endswith(".bias") or ".ln_" in n for n in adamw[2:])
    assert {n for n in adamw if ".ln_" in n or "ln_f" in n} == {n for n, _ in model.named_parameters()
                                                              if ".ln_" in n or "ln_f" in n}
    assert len(adamw) + len(matrices) == len(list(model.parameters()))
    # it trains, and a saved state keeps the orientation
    opt = Muon(groups, lr=0.02)
    x, y = make_batch(4)
    for _ in range(2):
        opt.zero_grad()
        zoo.lm_loss(zoo.HFLoss(model)(x), y).backward()
        opt.step()
    assert [g["orientation"] for g in opt.param_groups] == ["in_out", "out_in"]


def test_orientation_survives_state_dict_and_the_run_continues_identically():
    model, make_batch = zoo.gpt2(dropout=0.0, n_layer=1)
    twin = copy.deepcopy(model)
    opt = Muon(param_groups(model), lr=0.02)
    x, y = make_batch(4)

    def step(m, o):
        o.zero_grad()
        zoo.lm_loss(zoo.HFLoss(m)(x), y).backward()
        o.step()

    step(model, opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin.load_state_dict(model.state_dict())
    plain = [{"params": g["params"]} if "orientation" in g else g for g in param_groups(twin)]  # no orientation key
    fresh = Muon(plain, lr=0.02)
    assert fresh.param_groups[0]["orientation"] == "out_in"
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert [g["orientation"] for g in fresh.param_groups] == ["in_out", "out_in"]
    for _ in range(2):
        step(model, opt)
        step(twin, fresh)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


class EmbedHead(nn.Module):
    def __init__(self, tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 6, bias=False))
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.body(self.emb(x)))


def test_param_groups_of_an_embedding_and_linear_head_model():
    m = EmbedHead()
    mats, adamw = param_groups(m)
    assert _names(m, mats) == ["body.0.weight", "body.3.weight"] and "orientation" not in mats
    assert _names(m, adamw) == ["emb.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight"]
    assert adamw["use_adamw"] is True
    # without the input/output-layer rule the untied head is a matrix; embeddings, norms and biases stay on AdamW
    mats, adamw = param_groups(m, io_layers=False)
    assert _names(m, mats) == ["body.0.weight", "body.3.weight", "head.weight"]
    assert _names(m, adamw) == ["emb.weight", "body.0.bias", "body.2.weight", "body.2.bias"]


def test_a_tied_head_goes_with_its_embedding_even_without_the_io_rule():
    m = EmbedHead(tied=True)
    mats, adamw = param_groups(m, io_layers=False)
    assert _names(m, mats) == ["body.0.weight", "body.3.weight"]
    assert any(p is m.head.weight for p in adamw["params"])


def test_a_cnn_keeps_its_conv_weights_out_in_and_its_first_and_last_layer_on_adamw():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                      nn.Linear(4, 3))
    mats, adamw = param_groups(m)
    assert [id(p) for p in mats["params"]] == [id(m[2].weight)] and "orientation" not in mats
    assert len(adamw["params"]) == 7


def test_adamw_options_name_the_group_flag_and_extra_hyperparameters():
    m = EmbedHead()
    groups = param_groups(m, adamw_options={"split": False, "weight_decay": 0.0})
    assert {k: v for k, v in groups[-1].items() if k != "params"} == {"split": False, "weight_decay": 0.0}
    opt = FRUGAL(groups, lr=1e-3, weight_decay=0.1)
    assert [g["split"] for g in opt.param_groups] == [True, False]
    with pytest.raises(ConfigError, match="params"):
        param_groups(m, adamw_options={"params": []})


@pytest.mark.parametrize("cls", [Muon, AuON, HybridAuON, SWAN, FRUGAL])
@pytest.mark.parametrize("bad", ["transposed", "IN_OUT", True, None])
def test_an_unknown_orientation_is_a_config_error_naming_it(cls, bad):
    w = torch.zeros(3, 2, requires_grad=True)
    with pytest.raises(ConfigError, match=r"orientation must be one of \('out_in', 'in_out'\)"):
        cls([w], orientation=bad)
    opt = cls([w])
    with pytest.raises(ConfigError, match=r"\borientation\b"):
        opt.add_param_group({"params": [torch.zeros(2, 2, requires_grad=True)], "orientation": bad})
    with pytest.raises(ConfigError, match=r"\borientation\b"):
        optim.create(cls.__name__.lower().replace("hybridauon", "hybrid-auon"), [w], orientation=bad)


def test_param_groups_is_exported_and_the_cli_rule_has_one_source():
    from sgdlab import models
    from sgdlab.optim import _matrix

    assert "param_groups" in optim.__all__ and optim.param_groups is _matrix.param_groups
    assert models.io_parameters is _matrix.io_parameters
    for name in ("muon", "swan", "auon", "hybrid-auon", "frugal"):
        assert optim.hyperparameters(name)["orientation"] == "out_in"
