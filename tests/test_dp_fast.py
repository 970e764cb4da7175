"""DP-SGD's fast path (``grad_sample=ghost``, :mod:`sgdlab.privacy.ghost`) against torch.func's per-example
gradients (``grad_sample=vmap``), the reference: same clipped sums, per-example norms and losses."""

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdlab import Config, run, tasks
from sgdlab.errors import ConfigError
from sgdlab.privacy import DPSGD, DPOptions, PrivateTraining

from .conftest import TINY_LM

TASKS = {"mlp": ("digits", {"model": "mlp", "hidden": 32}), "cnn": ("digits", {"model": "cnn", "channels": 4}),
         "charlm": ("charlm", {**TINY_LM, "context": 16})}


@pytest.fixture(scope="module")
def loaded():
    return {k: tasks.create(name, opts, "cpu") for k, (name, opts) in TASKS.items()}


def _double(batch):
    return tuple(t.double() if t.is_floating_point() else t for t in batch)


def _pair(model, loss, **kw):
    kw = {"noise_multiplier": 0.0, "max_grad_norm": 1.0, "expected_batch_size": 7.0, **kw}
    return DPSGD(model, loss, grad_sample="ghost", **kw), DPSGD(model, loss, grad_sample="vmap", **kw)


def _assert_same(fast, ref, what, rtol=1e-9):
    assert fast.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=rtol, atol=rtol * (1e-3 + ref[k].abs().max().item()),
                                   msg=lambda m, k=k: f"{what} {k}: {m}")


def _compare(model, loss, batch, *, budget=None, rtol=1e-9, **kw):
    """Clipped sums, losses and per-example norms of both paths; returns the flat norms (vmap)."""
    fast, ref = _pair(model, loss, **kw)
    if budget is not None:
        fast._ghost.budget = budget
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DP-SGD")  # no fallback
        sums, loss_sum = fast.clipped_sum(batch)
        norms = fast.per_sample_norms(batch)
    assert fast.method == "ghost" and fast._checked
    ref_sums, ref_loss = ref.clipped_sum(batch)
    ref_norms = ref.per_sample_norms(batch)
    _assert_same(sums, ref_sums, "clipped sum", rtol)
    _assert_same(norms, ref_norms, "norms", rtol)
    torch.testing.assert_close(loss_sum, ref_loss, rtol=rtol, atol=0)
    return torch.stack(list(ref_norms.values())).norm(dim=0)


@pytest.mark.parametrize("which", list(TASKS))
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_clipped_sums_and_norms_equal_torch_func(which, clipping, loaded):
    task = loaded[which]
    torch.manual_seed(0)
    model = task.build_model().double()
    batch = _double(task.get_batch(torch.tensor([3, 1, 4, 15, 9, 2, 6])))
    # three micro-batches (3, 3, 1); clipping inactive, then active for every example
    norms = _compare(model, task.loss, batch, clipping=clipping, max_grad_norm=1e9, max_physical_batch=3)
    bound = 0.5 * norms.min().item() / (1 if clipping == "flat" else math.sqrt(len(list(model.parameters()))))
    _compare(model, task.loss, batch, clipping=clipping, max_grad_norm=bound, max_physical_batch=3)


@pytest.mark.parametrize("which", list(TASKS))
def test_without_memory_for_per_example_gradients(which, loaded):
    # budget 0: Gram-matrix norms, products (c ⊙ g)ᵀ a, chunked convolution gradients, embedding scatters
    task = loaded[which]
    torch.manual_seed(1)
    model = task.build_model().double()
    batch = _double(task.get_batch(torch.arange(20, 26)))
    _compare(model, task.loss, batch, budget=0, max_grad_norm=0.05)
    _compare(model, task.loss, batch, budget=0, max_grad_norm=0.05, clipping="per_layer")


class _Zoo(nn.Module):
    """Every operation the fast path follows, with awkward arguments."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.wide = nn.Embedding(100, 6)  # more rows than positions squared: Gram matrices, not a scatter
        self.one = nn.Embedding(11, 6)  # one position per example
        self.conv1 = nn.Conv1d(6, 6, 4, padding="same")  # even kernel: padded one more on the right
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        # as many channels per group as output columns or more: patches gathered channels-last
        self.conv3 = nn.Conv2d(4, 6, 2, stride=3, padding=(1, 0), dilation=2, groups=2)
        self.conv4 = nn.Conv1d(6, 6, 3, stride=4)
        self.gn = nn.GroupNorm(3, 6)
        self.shared = nn.Linear(6, 6)  # called twice: its weight is tied to itself
        self.scale = nn.Parameter(torch.randn(6))
        self.shift = nn.Parameter(torch.randn(6))
        self.table = nn.Parameter(torch.randn(10, 6))  # sliced, as a position table
        self.ln = nn.LayerNorm([2, 3])
        self.proj = nn.Parameter(torch.randn(6, 5))  # x @ P over a sequence
        self.proj_z = nn.Parameter(torch.randn(6, 5))  # x @ P, one position
        self.vec = nn.Parameter(torch.randn(5))  # x @ p, one position
        self.seq_vec = nn.Parameter(torch.randn(6))  # x @ p over a sequence
        self.head = nn.Linear(5, 3)
        self.head.weight.requires_grad_(False)  # a frozen weight with a trainable bias

    def forward(self, batch):
        tokens, img = batch
        e = self.emb(tokens) + self.table[:tokens.shape[1]] + self.one(tokens[:, 0]).unsqueeze(1)  # (B, 8, 6)
        e = e + self.wide(tokens[:, :3] * 9).sum(1, keepdim=True)
        c1 = self.conv1(e.transpose(1, 2)).mean(2)  # (B, 6)
        c2 = self.gn(self.conv2(img)).flatten(2).mean(2)  # (B, 6)
        c2 = c2 + self.conv3(img).flatten(2).mean(2) + self.conv4(e.transpose(1, 2)).mean(2)
        z = torch.relu_(self.shared(c1 + c2))  # in place on a recorded output
        z = self.shared(z) * self.scale - self.shift
        z = self.ln(z.view(-1, 2, 3)).view(-1, 6) @ self.proj_z
        s = (e @ self.proj).mean(1) + (e @ self.seq_vec).mean(1, keepdim=True)
        return self.head(z + s) + (z @ self.vec).unsqueeze(1)


def _zoo_batch(n):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 11, (n, 8), generator=g)
    tokens[:, -2:] = 0  # padding
    return tokens, torch.randn(n, 4, 6, 6, generator=g, dtype=torch.float64)


def _zoo_loss(model, batch):
    return model(batch).pow(2).mean()


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("budget", [None, 0])
def test_every_supported_operation(clipping, budget):
    torch.manual_seed(3)
    model = _Zoo().double()
    _compare(model, _zoo_loss, _zoo_batch(5), clipping=clipping, max_grad_norm=0.3, budget=budget,
             max_physical_batch=4)


def test_float32_cnn_within_rounding(loaded):
    task = loaded["cnn"]
    torch.manual_seed(4)
    model = task.build_model()
    _compare(model, task.loss, task.get_batch(torch.arange(40)), max_grad_norm=0.1, rtol=2e-4)


def test_empty_batch_and_noise_match(loaded):
    task = loaded["mlp"]
    torch.manual_seed(6)
    model = task.build_model().double()
    fast, ref = _pair(model, task.loss, noise_multiplier=1.3, seed=11)
    empty = _double(task.get_batch(torch.zeros(0, dtype=torch.long)))
    for batch in (empty, _double(task.get_batch(torch.arange(9)))):
        grads = []
        for engine in (fast, ref):
            loss = engine.backward(batch)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            if len(batch[0]) == 0:
                assert loss.item() == 0.0
        _assert_same(grads[0], grads[1], "noisy gradient")
    assert fast.method == "ghost"


class _PReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.act = nn.PReLU()

    def forward(self, x):
        return self.act(self.lin(x))


def test_unsupported_layer_falls_back_or_is_refused():
    torch.manual_seed(7)
    model = _PReLUNet().double()
    x = torch.randn(6, 4, dtype=torch.float64)

    def loss(m, b):
        return m(b).pow(2).mean()

    auto = DPSGD(model, loss, noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=6)
    ref = DPSGD(model, loss, noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=6, grad_sample="vmap")
    with pytest.warns(UserWarning, match=r"torch\.func.*'act\.weight' is used by torch\.prelu"):
        sums, _ = auto.clipped_sum(x)
    assert auto.method == "vmap"
    _assert_same(sums, ref.clipped_sum(x)[0], "fallback")
    ghost = DPSGD(model, loss, noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=6, grad_sample="ghost")
    with pytest.raises(ConfigError, match="grad_sample=ghost cannot handle this model.*prelu"):
        ghost.backward(x)


def test_a_loss_that_is_not_a_mean_of_example_losses_is_caught():
    # a summed loss: the fast path's premise Σ_i ℓ_i = B · loss fails; the check against torch.func sees it
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(6, 4, dtype=torch.float64)

    def loss(m, b):
        return m(b).pow(2).sum()

    auto = DPSGD(model, loss, noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=6)
    ref = DPSGD(model, loss, noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=6, grad_sample="vmap")
    with pytest.warns(UserWarning, match="differ from torch.func's"):
        sums, _ = auto.clipped_sum(x)
    assert auto.method == "vmap"
    _assert_same(sums, ref.clipped_sum(x)[0], "fallback")


def test_batch_not_first_and_parameters_outside_recorded_operations_fall_back():
    torch.manual_seed(9)
    lin = nn.Linear(4, 2).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not a batch of 5"):  # sequence-first through the linear layer
        e = DPSGD(lin, lambda m, b: m(b.transpose(0, 1)).pow(2).mean(), noise_multiplier=0.0, max_grad_norm=1.0,
                  expected_batch_size=5)
        e.backward(x)
    assert e.method == "vmap"
    with pytest.warns(UserWarning, match="'weight' is used by Tensor.pow"):  # an L2 term on a weight
        e = DPSGD(lin, lambda m, b: m(b).pow(2).mean() + m.weight.pow(2).sum(),
                  noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=5)
        e.backward(x)
    assert e.method == "vmap"


# ---- options and runs ---------------------------------------------------------------------------------


def test_grad_sample_option(loaded):
    assert DPOptions.parse("noise=1,clip=1").grad_sample == "auto"
    opts = DPOptions.parse("noise=1,clip=1,grad_sample=vmap")
    assert opts.canonical().endswith(",grad_sample=vmap") and DPOptions.parse(opts.canonical()) == opts
    with pytest.raises(ConfigError, match="unknown dp grad_sample 'fast'.*ghost"):
        DPOptions.parse("noise=1,clip=1,grad_sample=fast")
    with pytest.raises(ConfigError, match="grad_sample applies to unit=example"):
        DPOptions.parse("noise=1,clip=1,unit=client,grad_sample=ghost")
    with pytest.raises(ConfigError, match="grad_sample='fast'"):
        DPSGD(nn.Linear(2, 1), lambda m, b: m(b).mean(), noise_multiplier=1.0, max_grad_norm=1.0,
              expected_batch_size=2, grad_sample="fast")
    task = loaded["mlp"]
    dp = PrivateTraining("noise=1,clip=1,grad_sample=vmap", task, task.build_model(), steps=2, batch_size=8, seed=0)
    assert dp.engine.grad_sample == dp.engine.method == "vmap"


def test_cnn_run_with_the_default_resumes_bit_identically(tmp_path):
    def config(name):
        return Config(task="digits", optimizer="sgd", lr=0.3, steps=6, batch_size=24, eval_every=3, log_every=3,
                      task_args={"model": "cnn", "channels": 4}, device="cpu", dp="noise=1.0,clip=1.0,delta=1e-4",
                      out=str(tmp_path / name))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="DP-SGD")  # the default takes the fast path, without a fallback
        run(config("full"))
        run(config("part"), stop_at=3)
        run(config("part"), resume=True)
    a = torch.load(Path(tmp_path / "full" / "checkpoint.pt"), weights_only=True)
    b = torch.load(Path(tmp_path / "part" / "checkpoint.pt"), weights_only=True)
    ma, mb = a["workers"][0]["model"], b["workers"][0]["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert torch.equal(a["dp"]["noise_generator"], b["dp"]["noise_generator"])


def test_fast_path_with_functional_layers_matches_hand_computed_gradients():
    # a one-layer check independent of torch.func: clipped per-example gradients of F.linear by hand
    torch.manual_seed(10)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    engine = DPSGD(lin, lambda m, b: F.linear(b, m.weight, m.bias).pow(2).mean(), noise_multiplier=0.0,
                   max_grad_norm=0.2, expected_batch_size=4, grad_sample="ghost")
    sums, _ = engine.clipped_sum(x)
    expected = {n: torch.zeros_like(p) for n, p in lin.named_parameters()}
    for i in range(4):
        y = lin(x[i:i + 1])
        gw, gb = torch.autograd.grad(y.pow(2).mean(), [lin.weight, lin.bias])
        c = min(1.0, 0.2 / (torch.cat([gw.flatten(), gb]).norm().item() + 1e-6))
        expected["weight"] += c * gw
        expected["bias"] += c * gb
    _assert_same(sums, expected, "by hand")


# ---- a rule added from outside the library ------------------------------------------------------------


class _ExpScale(nn.Module):
    """``x ⊙ exp(s)``: ``torch.exp`` of a parameter has no built-in rule."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return x * torch.exp(self.s)


def test_a_rule_registered_for_a_module_type(monkeypatch):
    from sgdlab.privacy import ghost

    class ExpScaleRule(ghost.Rule):
        """∂out/∂s = out, so the per-example gradient of ``s`` is ``Σ_t g_t ⊙ out_t``, materialised."""

        @classmethod
        def from_module(cls, rec, module, args, kwargs, out):
            use = cls()
            use.name, use.y = rec.param(module.s, "s"), use.keep(out)
            rec.record(use, out)

        def names(self):
            return [self.name]

        def assemble(self, plan, grads, b, workspace):
            grads[self.name].add_dense((self.g * self.y).reshape(b, -1, self.y.shape[-1]).sum(1))

    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), _ExpScale(5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, 4, dtype=torch.float64)

    def loss(m, b):
        return m(b).pow(2).mean()

    engine = DPSGD(model, loss, noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=6, grad_sample="ghost")
    with pytest.raises(ConfigError, match="'1.s' is used by torch.exp"):  # without the rule
        engine.clipped_sum(x)
    monkeypatch.setitem(ghost.RULES, _ExpScale, ExpScaleRule)
    _compare(model, loss, x, rtol=1e-6, max_grad_norm=0.1)
