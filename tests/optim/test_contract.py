"""The optimizer contract: what every entry of ``sgdlab.optim.registry`` guarantees (in the spirit of torch's
OptimizerInfo tests). The per-optimizer files keep the paper-oracle tests (float64 reference implementations);
``test_convergence.py`` trains every entry on three standard problems.

Every entry, on each of its code paths (``foreach``, ``compiled``):

* a state_dict saved mid-run and loaded into a fresh optimizer (built with other hyperparameters) continues
  bit-identically, hyperparameters and wrapper attributes included;
* ``step(closure)`` returns the closure's loss; parameters whose gradient is ``None`` are skipped (no move, no
  state); ``maximize=True`` on a loss equals minimising its negation and leaves ``p.grad`` alone;
* an unknown keyword is a ``TypeError`` naming it; a wrong type or an out-of-range value is the project's
  ``ConfigError`` (a ``ValueError``) naming the hyperparameter, in the constructor, in a param-group dict
  and in ``add_param_group`` alike (sgdlab's own optimizers; torch.optim's check the constructor only);
* a sparse gradient is :class:`~sgdlab.optim.SparseGradientError` with one message (torch.optim.SGD
  supports them; Adam and AdamW raise their own ``RuntimeError``);
* the per-parameter and the multi-tensor paths agree (bit for bit where they share one body);
* the per-optimizer convergence problems of :data:`CONVERGENCE` are solved.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from sgdlab import optim
from sgdlab.errors import ConfigError, UnknownNameError
from sgdlab.optim import SparseGradientError, protocol
from sgdlab.optim.adamp import SGDP, AdamP
from sgdlab.optim.ademamix import AdEMAMix
from sgdlab.optim.auon import AuON, HybridAuON
from sgdlab.optim.diffgrad import DiffGrad
from sgdlab.optim.frugal import FRUGAL
from sgdlab.optim.grams import Grams
from sgdlab.optim.laprop import LaProp
from sgdlab.optim.lookahead import Lookahead
from sgdlab.optim.mars import MARS
from sgdlab.optim.muon import Muon
from sgdlab.optim.sgd_sai import SGDSaI
from sgdlab.optim.sophia import Sophia, SophiaG, gnb_loss
from sgdlab.optim.swan import SWAN

DT = torch.float64
NAMES = optim.registry.names()
TORCH = ("sgd", "adam", "adamw")  # torch.optim's own classes, registered as they are
OURS = [n for n in NAMES if n not in TORCH]
# Forward-only methods never read p.grad and move every parameter with requires_grad (they cannot tell which
# ones the loss depends on): the None-gradient and sparse-gradient contracts do not apply to them.
FORWARD_ONLY = {"zo-sgd", "forward-gradient"}
# Closure calls per step where it is not one (zeroth-order SGD: l+ and l- per direction).
CLOSURE_CALLS = {"zo-sgd": 2}


def hyper(name: str) -> dict:
    return optim.hyperparameters(name)


def paths(name: str, compiled: bool = False) -> list[dict]:
    """The code paths of ``name``: its default, per-parameter and multi-tensor paths, and (``compiled``) its
    compiled kernels."""
    hp = hyper(name)
    out = [{}]
    if "foreach" in hp:
        off = {"compiled": False} if "compiled" in hp else {}
        out += [{"foreach": False, **off}, {"foreach": True, **off}]
    if compiled and "compiled" in hp:
        out += [{"compiled": "tensor"}, {"compiled": "group"}]
    return out


def cases(names, compiled: bool = False):
    return [pytest.param(n, p, id=f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}")
            for n in names for p in paths(n, compiled)]


# Hyperparameters of the second param group (per-group overrides are part of what a state_dict carries).
GROUP2 = {"muon": {"adjust_lr": "match_rms_adamw", "ns_steps": 3, "nesterov": False},
          "auon": {"nesterov": False, "momentum": 0.8}, "hybrid-auon": {"nesterov": False, "momentum": 0.8},
          "swan": {"ns_steps": 6, "rescale": False}, "frugal": {"rho": 0.34, "state_free": "sgd", "betas": (0.8, 0.99)},
          "adamp": {"nesterov": True}, "sgdp": {"nesterov": True}, "ademamix": {"alpha": 4.0}, "mars": {"gamma": 0.1},
          "sophia-g": {"gamma": 0.5}, "sophia-h": {"gamma": 0.5}, "sgd": {"momentum": 0.9}}


class _Net(torch.nn.Module):
    def __init__(self, problem: Problem):
        super().__init__()
        self.problem = problem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.problem.p
        return torch.tanh(x @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"]


class Problem:
    """A small softmax regression with a hidden layer (float64): two param groups, a 4-D tensor and a
    parameter outside the loss (its gradient stays ``None``)."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        shapes = {"W1": (6, 5), "b1": (6,), "frozen": (4,), "W2": (3, 6), "b2": (3,), "C": (2, 3, 2, 2)}
        self.p = {k: (0.5 * torch.randn(s, generator=gen, dtype=DT)).requires_grad_() for k, s in shapes.items()}
        data = torch.Generator().manual_seed(100)
        self.x = torch.randn(24, 5, generator=data, dtype=DT)
        self.y = torch.randint(0, 3, (24,), generator=data)

    def params(self) -> list[torch.Tensor]:
        return list(self.p.values())

    def groups(self, name: str, lr: float) -> list[dict]:
        second = {"params": [self.p["W2"], self.p["b2"], self.p["C"]], "lr": 0.5 * lr, **GROUP2.get(name, {})}
        if "weight_decay" in hyper(name):
            second["weight_decay"] = 0.05
        return [{"params": [self.p["W1"], self.p["b1"], self.p["frozen"]]}, second]

    def logits(self) -> torch.Tensor:
        return self.net(self.x)

    @property
    def net(self) -> torch.nn.Module:
        """The logits as a module over the bare tensors (SAF/MESA read a model's outputs: ctx.model)."""
        return _Net(self)

    def loss(self, net: torch.nn.Module | None = None) -> torch.Tensor:
        logits = self.logits() if net is None else net(self.x)
        return F.cross_entropy(logits, self.y) + 0.05 * self.p["C"].square().sum()

    def ctx(self, step: int) -> protocol.StepContext:
        def sampled():  # Sophia-G's sampled-label loss, from a generator of its own per step
            return gnb_loss(self.logits(), generator=torch.Generator().manual_seed(step)), self.y.numel()

        net = self.net
        return protocol.StepContext(loss=lambda: self.loss(net), sampled_loss=sampled, model=net,
                                    example_ids=torch.arange(len(self.y)))

    def train(self, opt, steps: range) -> None:
        for t in steps:
            ctx = self.ctx(t)
            opt.zero_grad()
            protocol.forward_backward(opt, ctx)
            protocol.step(opt, ctx)


def build(name: str, problem: Problem, **hp):
    lr = hp.get("lr", optim.hyperparameters(name, hp.get("base"))["lr"])
    return optim.create(name, problem.groups(name, lr), **hp)


def inner(opt):
    return getattr(opt, "base_optimizer", opt)


def assert_same(a, b) -> None:
    """``a`` and ``b`` (state dicts, lists, tensors) are equal, tensors bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


# --------------------------------------------------------------------------------------------------------
# state_dict round trip mid-run
# --------------------------------------------------------------------------------------------------------

VARIANTS = {"ademamix": [{}, {"t_alpha_beta3": 8, "alpha": 4.0, "weight_decay": 0.01}],
            "mars": [{}, {"gamma": 0.1, "weight_decay": 0.01}],
            "grams": [{}, {"weight_decay": 0.05}], "laprop": [{}, {"weight_decay": 0.05}],
            "diffgrad": [{}, {"weight_decay": 0.05}], "sophia-g": [{"k": 3}], "sophia-h": [{"k": 3, "seed": 1}],
            "frugal": [{"update_gap": 3, "projection": p, "seed": 5} for p in ("svd", "blocks")],
            "lookahead": [{"base": "adam", "pullback": p} for p in ("none", "reset", "pullback")]
            + [{"base": "sgd", "momentum": 0.9, "pullback": "pullback"}, {"base": "sophia-g"}, {"base": "grams"}]}
# What the fresh optimizer is built with instead (the state_dict must bring the originals back).
REBUILD = {"sophia-h": {"seed": 99}, "frugal": {"seed": 123}, "lookahead": {"k": 2, "alpha": 0.9}}


def _round_trip_cases():
    for name, path in ((n, p) for n in NAMES for p in paths(n)):
        for v in VARIANTS.get(name, [{}]):
            hp = {**v, **path}
            yield pytest.param(name, hp, id=f"{name}-{'-'.join(f'{k}={x}' for k, x in hp.items()) or 'default'}")


@pytest.mark.parametrize("name, hp", list(_round_trip_cases()))
def test_state_dict_round_trip_mid_run_continues_bit_identically(name, hp):
    a = Problem()
    opt = build(name, a, **hp)
    a.train(opt, range(5))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # through torch.save, loaded with weights_only=True
    b = Problem()
    for p, q in zip(a.params(), b.params(), strict=True):
        q.data.copy_(p.data)
    lr = optim.hyperparameters(name, hp.get("base"))["lr"]
    kept = {k: v for k, v in hp.items() if k not in ("pullback", "foreach", "compiled")}  # restored by the dict
    opt2 = build(name, b, **{**kept, "lr": 0.9 * lr, **REBUILD.get(name, {})})
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for g1, g2 in zip(opt.param_groups, opt2.param_groups, strict=True):
        assert {k: v for k, v in g1.items() if k != "params"} == {k: v for k, v in g2.items() if k != "params"}
    if name == "lookahead":
        assert (opt2.k, opt2.alpha, opt2.pullback) == (opt.k, opt.alpha, opt.pullback)
    a.train(opt, range(5, 12))
    b.train(opt2, range(5, 12))
    for p, q in zip(a.params(), b.params(), strict=True):
        assert torch.equal(p, q)
    assert_same(opt.state_dict(), opt2.state_dict())


def test_lookahead_refuses_a_plain_state_dict():
    opt = optim.create("lookahead", Problem().params())
    with pytest.raises(ValueError, match="lookahead"):
        opt.load_state_dict(torch.optim.Adam(Problem().params()).state_dict())


# --------------------------------------------------------------------------------------------------------
# closure, None gradients, maximize
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_step_returns_the_closures_loss(name):
    pb = Problem()
    opt = build(name, pb)
    before = [p.detach().clone() for p in pb.params()]
    seen = []
    if protocol.needs(opt).closure:  # the closure returns the loss with its graph and does not backward
        pb.loss().backward()

        def closure():
            seen.append(pb.loss())
            return seen[-1]
    else:
        def closure():
            opt.zero_grad()
            seen.append(pb.loss())
            seen[-1].backward()
            return seen[-1]
    loss = opt.step(closure)
    assert len(seen) == CLOSURE_CALLS.get(name, 1) and torch.is_tensor(loss) and loss.item() == seen[0].item()
    assert any(not torch.equal(p, q) for p, q in zip(pb.params(), before, strict=True))


@pytest.mark.parametrize("name, path", cases([n for n in NAMES if n not in FORWARD_ONLY]))
def test_parameters_without_gradient_are_skipped(name, path):
    pb = Problem()
    opt = build(name, pb, **path)
    before = {k: p.detach().clone() for k, p in pb.p.items()}
    if not protocol.needs(opt).closure:
        assert opt.step() is None  # no gradient at all: nothing happens
    else:
        protocol.step(opt, pb.ctx(0))
    assert all(torch.equal(pb.p[k], before[k]) for k in pb.p) and not inner(opt).state
    pb.train(opt, range(3))
    assert torch.equal(pb.p["frozen"], before["frozen"]) and pb.p["frozen"] not in inner(opt).state
    assert not torch.equal(pb.p["W1"], before["W1"])


# SAM needs step(closure), which this test does not pass
@pytest.mark.parametrize("name, path", cases([n for n in NAMES if "maximize" in hyper(n) and n != "sam"], compiled=True)
                         + [pytest.param("frugal", {"projection": "blocks", "rho": 0.5, "update_gap": 2},
                                         id="frugal-blocks")])
def test_maximize_is_minimizing_the_negated_loss_and_leaves_grad_alone(name, path):
    a, b = Problem(), Problem()
    opt_a, opt_b = build(name, a, maximize=True, **path), build(name, b, **path)
    for _ in range(4):
        opt_a.zero_grad()
        (-a.loss()).backward()
        grads = [p.grad.clone() for p in a.params() if p.grad is not None]
        opt_a.step()
        assert all(torch.equal(p.grad, g) for p, g in zip([p for p in a.params() if p.grad is not None], grads,
                                                            strict=True))
        opt_b.zero_grad()
        b.loss().backward()
        opt_b.step()
    for p, q in zip(a.params(), b.params(), strict=True):
        assert torch.equal(p, q)


# Elementwise updates written once for both eager paths: on the CPU the two agree bit for bit.
ONE_BODY = {"grams", "diffgrad", "ademamix", "mars", "sgd-sai", "sophia-g", "sophia-h", "frugal"}


@pytest.mark.parametrize("name", [n for n in NAMES if "foreach" in hyper(n)])
def test_per_parameter_and_multi_tensor_paths_agree(name):
    runs = []
    for foreach in (False, True):
        pb = Problem()
        pb.train(build(name, pb, foreach=foreach, **({"compiled": False} if "compiled" in hyper(name) else {})),
                 range(10))
        runs.append(pb.params())
    for p, q in zip(*runs, strict=True):
        if name in ONE_BODY:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# hyperparameters: unknown keywords, wrong types, out-of-range values, added param groups
# --------------------------------------------------------------------------------------------------------

def construct(target, params, **kw):
    """``target`` (a registry name or a class) over ``params``; Lookahead wraps a torch.optim.SGD."""
    if target in (Lookahead, "lookahead-class"):
        return Lookahead(torch.optim.SGD(params, lr=0.1), **kw)
    cls = optim.registry.get(target) if isinstance(target, str) else target
    return cls(params, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyperparameter_is_a_type_error_naming_it(name):
    with pytest.raises(TypeError, match="bogus_rate"):
        optim.create(name, [torch.zeros(3, 2, requires_grad=True)], bogus_rate=1.0)
    if name in OURS:  # the class (or factory) itself, as torch.optim's do
        with pytest.raises(TypeError, match="bogus_rate"):
            construct(name, [torch.zeros(3, 2, requires_grad=True)], bogus_rate=1.0)


UNKNOWN = [(Grams, "momentum"), (LaProp, "momentum"), (DiffGrad, "momentum"), (AdEMAMix, "momentum"),
           (MARS, "momentum"), (AdamP, "momentun"), (SGDP, "momentun"), (AuON, "gamma"), (HybridAuON, "gamma"),
           (Muon, "betas"), (SWAN, "momentum"), (FRUGAL, "density"), (SGDSaI, "betas"), (Sophia, "rho"),
           (SophiaG, "seed"),  # Sophia-G draws no probes
           (Lookahead, "la_steps")]


@pytest.mark.parametrize("target, key", UNKNOWN, ids=[f"{c.__name__}-{k}" for c, k in UNKNOWN])
def test_keywords_of_other_optimizers_are_unknown(target, key):
    with pytest.raises(TypeError, match=key):
        construct(target, [torch.zeros(3, 2, requires_grad=True)], **{key: 0.9})


def _own_hyperparameters(name):
    if name == "lookahead":
        return ["k", "alpha", "pullback"]
    return [h for h in hyper(name) if h != "base"]


@pytest.mark.parametrize("name, key", [(n, h) for n in OURS for h in _own_hyperparameters(n)]
                         + [("lookahead-class", "foreach")])
def test_a_wrong_type_is_a_config_error_naming_the_hyperparameter(name, key):
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        construct(name, [torch.zeros(3, 2, requires_grad=True)], **{key: "x"})


@pytest.mark.parametrize("name", NAMES)
def test_lr_is_checked_by_create(name):
    for bad in (-1.0, "fast", float("nan")):
        with pytest.raises(ConfigError, match=r"\blr\b"):
            optim.create(name, [torch.zeros(3, 2, requires_grad=True)], lr=bad)


def test_an_unknown_lookahead_base_is_an_unknown_name():
    with pytest.raises(UnknownNameError, match="unknown optimizer 'adamx'"):
        optim.create("lookahead", [torch.zeros(2, requires_grad=True)], base="adamx")


_ADAM_FAMILY = [(dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
                (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(betas=(0.9,)), "betas"), (dict(eps=-1e-8), "eps"),
                (dict(weight_decay=-0.1), "weight_decay")]
_MATRIX = [(dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(weight_decay=-0.1), "weight_decay"),
           (dict(adamw_betas=(0.9, 1.5)), r"adamw_betas\[1\]"), (dict(adamw_eps=0.0), "adamw_eps"),
           (dict(adamw_lr_ratio=-1.0), "adamw_lr_ratio"), (dict(nesterov=1), "nesterov")]
OUT_OF_RANGE = [
    *((c, kw, m) for c in ("grams", "laprop", "diffgrad") for kw, m in _ADAM_FAMILY),
    *(("ademamix", kw, m) for kw, m in [
        (dict(lr=-1.0), r"lr=-1\.0"), (dict(betas=(1.0, 0.999, 0.9999)), r"betas\[0\]=1\.0"),
        (dict(betas=(0.9, -0.1, 0.9999)), r"betas\[1\]=-0\.1"), (dict(betas=(0.9, 0.999, 1.5)), r"betas\[2\]=1\.5"),
        (dict(betas=(0.9, 0.999)), r"betas must be a tuple"), (dict(alpha=-2.0), r"alpha=-2\.0"),
        (dict(alpha=-1), r"alpha=-1"), (dict(t_alpha_beta3=0), r"t_alpha_beta3=0"),
        (dict(t_alpha_beta3=2.5), r"t_alpha_beta3 must be an integer"),
        (dict(betas=(0.0, 0.999, 0.9999), t_alpha_beta3=10), r"betas\[0\]=0\.0"), (dict(eps=-1e-8), r"eps=-1e-08"),
        (dict(weight_decay=-0.1), r"weight_decay=-0\.1"), (dict(foreach="yes"), r"foreach")]),
    *(("mars", kw, m) for kw, m in [
        (dict(lr=-1.0), r"lr=-1\.0"), (dict(betas=(1.0, 0.99)), r"betas\[0\]=1\.0"),
        (dict(betas=(0.95, -0.1)), r"betas\[1\]=-0\.1"), (dict(betas=(0.9, 0.99, 0.999)), r"betas must be a tuple"),
        (dict(gamma=-0.5), r"gamma=-0\.5"), (dict(gamma=-1), r"gamma=-1"), (dict(eps=-1e-8), r"eps=-1e-08"),
        (dict(weight_decay=-0.1), r"weight_decay=-0\.1"), (dict(foreach="yes"), r"foreach")]),
    *(("sgd-sai", kw, m) for kw, m in [
        (dict(lr=-1.0), "^lr"), (dict(momentum=1.0), "^momentum"), (dict(momentum=-0.1), "^momentum"),
        (dict(weight_decay=-1e-3), "^weight_decay"), (dict(eps=0.0), "^eps"), (dict(lr=float("nan")), "^lr")]),
    *(("adamp", kw, m) for kw, m in [
        (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.999)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"), (dict(delta=-0.1), "delta"),
        (dict(wd_ratio=1.5), "wd_ratio")]),
    *(("sgdp", kw, m) for kw, m in [
        (dict(lr=-0.1), "lr"), (dict(momentum=1.0), "momentum"), (dict(dampening=1.5), "dampening"),
        (dict(wd_ratio=-0.1), "wd_ratio"), (dict(delta=float("nan")), "delta"), (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"), (dict(momentum=0.0, nesterov=True), "nesterov")]),
    *((Sophia, kw, m) for kw, m in [
        (dict(lr=-1.0), r"lr=-1\.0"), (dict(lr=-0.5), r"lr=-0\.5"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(betas=0.9), r"betas"), (dict(gamma=0.0), r"gamma=0\.0"),
        (dict(eps=0.0), r"eps=0\.0"), (dict(weight_decay=-0.1), r"weight_decay"), (dict(k=0), r"k=0"),
        (dict(k=2.5), r"k must be an integer"), (dict(seed=-1), r"seed"),
        (dict(estimator="newton"), r"estimator='newton'.*gnb, hutchinson"), (dict(probe="uniform"), r"probe='uniform'"),
        (dict(foreach="yes"), r"foreach")]),
    *((c, kw, m) for c in ("auon", "hybrid-auon") for kw, m in _MATRIX),
    *(("muon", kw, m) for kw, m in [
        *_MATRIX, (dict(ns_steps=0), "ns_steps"), (dict(ns_steps=2.5), "ns_steps"), (dict(eps=0.0), "eps"),
        (dict(adjust_lr="moonlight"), "adjust_lr"), (dict(ns_dtype="half"), "ns_dtype"),
        (dict(use_adamw="yes"), "use_adamw")]),
    *(("swan", kw, m) for kw, m in [
        (dict(lr=-1.0), "lr"), (dict(ns_steps=0), "ns_steps"), (dict(ns_steps=2.5), "ns_steps"), (dict(eps=0.0), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"), (dict(rescale="yes"), "rescale"),
        (dict(adamw_betas=(1.0, 0.9)), r"adamw_betas\[0\]"), (dict(adamw_lr_ratio=-0.5), "adamw_lr_ratio")]),
    *(("frugal", kw, m) for kw, m in [
        (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(betas=0.9), "betas"), (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
        (dict(rho=1.5), "rho"), (dict(rho=-0.1), "rho"), (dict(rho=2.0), "rho"), (dict(update_gap=0), "update_gap"),
        (dict(update_gap=2.5), "update_gap"), (dict(projection="qr"), "projection"),
        (dict(state_free="adam"), "state_free"), (dict(state_free_lr=-1.0), "state_free_lr"), (dict(rank=-1), "rank"),
        (dict(split=1), "split"), (dict(seed=-3), "seed"), (dict(foreach="yes"), "foreach")]),
    *((Lookahead, kw, m) for kw, m in [
        (dict(k=0), "^k"), (dict(k=2.5), "^k"), (dict(alpha=0.0), "^alpha"), (dict(alpha=1.5), "^alpha"),
        (dict(alpha=float("nan")), "^alpha"), (dict(pullback="zero"), "^pullback"), (dict(foreach="yes"), "^foreach")]),
]


def _id(target, kw):
    name = target if isinstance(target, str) else target.__name__
    return f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"


@pytest.mark.parametrize("target, kwargs, pattern", OUT_OF_RANGE, ids=[_id(t, k) for t, k, _ in OUT_OF_RANGE])
def test_out_of_range_is_a_config_error_naming_it_in_groups_and_added_groups_too(target, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        construct(target, [torch.zeros(3, 2, requires_grad=True)], **kwargs)
    opt = construct(target, [torch.zeros(3, 2, requires_grad=True)])
    if target is Lookahead or not set(kwargs) <= set(opt.defaults):
        return  # not a per-group hyperparameter (Sophia's k, FRUGAL's seed, Lookahead's own)
    with pytest.raises(ConfigError) as in_group:
        construct(target, [{"params": [torch.zeros(3, 2, requires_grad=True)], **kwargs}])
    with pytest.raises(ConfigError) as added:
        opt.add_param_group({"params": [torch.zeros(3, 2, requires_grad=True)], **kwargs})
    assert str(in_group.value) == str(added.value) == str(err.value)
    assert len(opt.param_groups) == 1  # the bad group was not added


# SAM steps with the closure's gradient at w + e, and this test's closure leaves the added parameter out.
@pytest.mark.parametrize("name", [n for n in OURS if n != "sam"])
def test_an_added_group_with_valid_overrides_trains(name):
    pb = Problem()
    opt = build(name, pb)
    extra = torch.zeros(3, 2, dtype=DT, requires_grad=True)
    opt.add_param_group({"params": [extra], "lr": 0.01})
    assert opt.param_groups[-1]["lr"] == 0.01 and len(opt.param_groups) == 3
    opt.zero_grad()
    target = torch.arange(6, dtype=DT).reshape(3, 2)  # rows not constant: SWAN's GradNorm centres each row
    (pb.loss() + (extra - target).square().sum()).backward()
    protocol.step(opt, pb.ctx(0))
    assert (extra != 0).any()


def test_base_optimizer_must_be_an_optimizer():
    with pytest.raises(TypeError, match="base_optimizer"):
        Lookahead([torch.zeros(2, requires_grad=True)])


# --------------------------------------------------------------------------------------------------------
# sparse gradients
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, hp", [(n, {}) for n in NAMES if n not in FORWARD_ONLY]
                         + [("lookahead", {"base": "grams"}), ("lookahead", {"base": "sophia-h"})])
def test_a_sparse_gradient_is_the_one_error(name, hp):
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = optim.create(name, emb.parameters(), **hp)
    idx = torch.tensor([1, 2])
    emb(idx).sum().backward()
    ctx = protocol.StepContext(loss=lambda: emb(idx).square().sum())
    if type(inner(opt)) is torch.optim.SGD:  # torch's SGD supports sparse gradients
        protocol.step(opt, ctx)
        return
    if type(inner(opt)) in (torch.optim.Adam, torch.optim.AdamW):
        with pytest.raises(RuntimeError, match="sparse"):
            protocol.step(opt, ctx)
        return
    with pytest.raises(SparseGradientError, match=r"does not support sparse gradients .*shape \(5, 3\).*"
                                                  r"torch.nn.Embedding\(\.\.\., sparse=False\)") as err:
        protocol.step(opt, ctx)
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, ValueError)


# --------------------------------------------------------------------------------------------------------
# convergence: each optimizer's own small problem and settings
# --------------------------------------------------------------------------------------------------------

def rosenbrock(start=(1.5, 1.5)):
    xy = torch.tensor(start, dtype=DT, requires_grad=True)
    return [xy], lambda: (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2, [torch.ones(2, dtype=DT)]


def diagonal_quadratic(lo=0, hi=2, n=10):
    """0.5 sum_i d_i x_i^2, d log-spaced from 10^lo to 10^hi, from x = 1; optimum 0."""
    d, x = torch.logspace(lo, hi, n, dtype=DT), torch.ones(n, dtype=DT, requires_grad=True)
    return [x], lambda: 0.5 * (d * x * x).sum(), [torch.zeros(n, dtype=DT)]


def two_blocks():
    """The diagonal quadratic (condition number 100) split into a vector and a matrix block."""
    d1, d2 = torch.logspace(0, 1, 8, dtype=DT), torch.logspace(1, 2, 8, dtype=DT).reshape(2, 4)
    x1, x2 = torch.ones(8, dtype=DT, requires_grad=True), torch.ones(2, 4, dtype=DT, requires_grad=True)
    return [x1, x2], lambda: 0.5 * (d1 * x1 ** 2).sum() + 0.5 * (d2 * x2 ** 2).sum(), [torch.zeros(8, dtype=DT),
                                                                                      torch.zeros(2, 4, dtype=DT)]


def matrix_least_squares():
    """min_W 0.5 ||A W - B||_F^2, A = diag(1, 3, 10, 30) (condition number of A^T A: 900), W 4 x 3."""
    gen = torch.Generator().manual_seed(0)
    a = torch.diag(torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=DT))
    w_star = torch.randn(4, 3, generator=gen, dtype=DT)
    w = torch.zeros(4, 3, dtype=DT, requires_grad=True)
    return [w], lambda: 0.5 * (a @ w - a @ w_star).square().sum(), [w_star]


def stacked_least_squares():
    """min 0.5 ||A [X1; X2] - B||_F^2 with cond(A) = 10, two 4 x 6 blocks."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=DT))
    a = q[:, :8] * torch.logspace(0, 1, 8, dtype=DT)
    x_star = torch.randn(8, 6, generator=gen, dtype=DT)
    xs = [torch.zeros(4, 6, dtype=DT, requires_grad=True) for _ in range(2)]
    return xs, lambda: 0.5 * (a @ torch.cat(xs) - a @ x_star).square().sum(), list(x_star.split(4))


SCHEDULES = {None: None, "cosine": lambda n: lambda k: 0.5 * (1 + math.cos(math.pi * k / n)),
             "exp": lambda n: lambda k: 0.99 ** k, "poly2": lambda n: lambda k: (1 - k / n) ** 2}

# (optimizer, hyperparameters, problem, steps, schedule, tolerance, metric)
CONVERGENCE = [
    ("grams", dict(lr=0.05, foreach=True), rosenbrock, 5000, "cosine", 1e-3, "max"),
    ("diffgrad", dict(lr=0.3, foreach=True), rosenbrock, 3000, "cosine", 1e-3, "max"),
    ("laprop", dict(lr=0.2, foreach=True), rosenbrock, 3000, "cosine", 1e-3, "max"),
    ("mars", dict(lr=0.02), lambda: rosenbrock((-1.5, 2.0)), 1000, "annealing", 1e-3, "max"),
    ("adamp", dict(lr=0.01, betas=(0.9, 0.99)), rosenbrock, 2000, None, 1e-3, "max"),
    ("sgdp", dict(lr=1e-3, momentum=0.9), rosenbrock, 2000, None, 1e-3, "max"),
    ("ademamix", dict(lr=0.1, betas=(0.9, 0.999, 0.99), t_alpha_beta3=150), diagonal_quadratic, 300, "annealing",
     1e-3, "max"),
    ("sgd-sai", dict(lr=0.01, momentum=0.9, weight_decay=0.0), two_blocks, 1500, None, 1e-4, "max"),
    ("lookahead", dict(base="sgd", lr=0.015, momentum=0.9, k=5, alpha=0.5), diagonal_quadratic, 600, None, 1e-4,
     "max"),
    ("auon", dict(lr=0.2, momentum=0.9, weight_decay=0.0), matrix_least_squares, 1000, "exp", 1e-3, "norm"),
    ("hybrid-auon", dict(lr=0.2, momentum=0.9, weight_decay=0.0), matrix_least_squares, 1000, "exp", 1e-3, "norm"),
    *(("muon", dict(lr=0.2, momentum=0.9, foreach=fe), matrix_least_squares, 1000, "exp", 1e-3, "norm")
      for fe in (True, False)),
    *(("frugal", dict(lr=0.05, rho=0.5, update_gap=20, projection=p, state_free=s,
                      state_free_lr=0.005 if s == "sgd" else None), stacked_least_squares, 500, "poly2", 1e-3, "max")
      for p in ("svd", "blocks") for s in ("signsgd", "sgd")),
]


@pytest.mark.parametrize("name, hp, problem, steps, schedule, tol, metric", CONVERGENCE,
                         ids=[_id(c[0], c[1]) for c in CONVERGENCE])
def test_converges(name, hp, problem, steps, schedule, tol, metric):
    params, loss_fn, optimum = problem()
    opt = optim.create(name, params, **hp)
    if schedule == "annealing":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    else:
        sched = schedule and torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULES[schedule](steps))
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if sched:
            sched.step()
    if metric == "norm":
        assert torch.linalg.norm(params[0].detach() - optimum[0]) < tol
    else:
        assert max((p.detach() - q).abs().max().item() for p, q in zip(params, optimum, strict=True)) < tol
    if name == "sgd-sai":
        assert loss_fn().item() < 1e-8
    if name == "lookahead":  # the slow weights too
        torch.testing.assert_close(opt.state[params[0]]["slow_param"], optimum[0], rtol=0, atol=tol)
