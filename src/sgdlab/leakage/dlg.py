"""Deep Leakage from Gradients (DLG) and iDLG: rebuild a worker's batch from the update it shares.

Zhu, Liu and Han, "Deep Leakage from Gradients", NeurIPS 2019 (arXiv:1906.08935); Zhao, Mopuri and Bilen,
"iDLG: Improved Deep Leakage from Gradients", 2020 (arXiv:2001.02610).

**The attack.** A worker with model weights θ shares ``∇W = ∇θ ℓ(F(x; θ), y)`` for its batch ``(x, y)``.
The attacker knows θ and the architecture and solves

    x*, y* = argmin_{x', y'}  D(∇θ ℓ(F(x'; θ), y'), ∇W),      D(a, b) = ‖a − b‖²  (summed over all tensors)

with L-BFGS from random ``x'`` (``--distance cosine`` uses ``1 − ⟨a, b⟩ / (‖a‖ ‖b‖)`` instead, the
objective of Geiping et al. 2020). DLG optimises the label too, as a soft label ``softmax(y')``
(``--labels dlg``). **iDLG** reads it off the gradient instead (``--labels idlg``, the default): for
cross-entropy, the last linear layer's bias gradient is ``p_j − 1[j = y]``, negative only at the true class,
so ``y = argmin_j ∂ℓ/∂b_j`` (without a bias, the row of ``∂ℓ/∂W`` with the smallest sum, exact when the
layer's inputs are non-negative, e.g. after a ReLU: the paper's rule). iDLG is for B = 1; for a batch
this module counts labels (in the spirit of the label-count attacks of Wainakh et al. 2022; the estimator
is sgdlab's own): the mean bias gradient is ``p̄_j − n_j / B`` with ``n_j`` the count of class ``j``, so
``n_j ≈ B (p̄_j − ∂ℓ/∂b_j)``, with ``p̄`` the model's mean softmax over 64 uniform random inputs, rounded
to counts summing to B (largest remainders).
Labels are then fixed and only ``x'`` is optimised. For B > 1 reconstructions are matched to the originals
by the assignment of least total MSE (Hungarian method).

**What is shared** (``--defence``), and what the attacker simulates in its objective (it knows the
defence and its parameters, not the randomness):

* ``none``: the batch gradient (mean loss);
* ``dp,sigma=σ,clip=C``: DP-SGD's (:class:`sgdlab.privacy.DPSGD`) per-example clip to ``C``, sum, Gaussian
  noise ``N(0, σ²C²)`` and division by B; the attacker clips its own per-example gradients the same way;
* a compressor spec (``topk,ratio=0.1``, ``int8``, ``int4``, any of ``sgdlab list compressors`` that can
  decode one worker's payload alone): encode → decode with sgdlab's compressor; the attacker matches its
  plain gradient against the decoded one (matching only the sent coordinates of a sparse update was
  tried and is worse: the zeros of a ReLU network's gradient, from inactive units and blank pixels, carry
  information);
* ``local,steps=H[,lr=η]``: the pseudo-gradient ``θ − θ_H`` after H SGD steps of rate η (default 0.1) on
  the same batch (as Local SGD / FedAvg with one local batch); the attacker unrolls the H steps on ``x'``
  (differentiably) and matches the pseudo-gradients.

**Text** (``--task charlm``): a window of ``T + 1`` bytes is both the input (the first T) and the
targets (the last T). The attacker optimises logits ``Z`` of shape ``(B, T+1, 256)``: ``P = softmax(Z)`` is
a soft one-hot sequence, the model's token embedding of position t is ``P_t E`` (``E`` the embedding
table; an exact one-hot gives the real embedding) and the targets are the soft labels ``P_{1..T}``; the
recovered bytes are ``argmax Z``. It reports byte accuracy instead of PSNR.

**Metrics**: per example, MSE and PSNR (``10 log10(1 / MSE)``, data range [0, 1]) of the reconstruction
clipped to [0, 1]; label accuracy; the final gradient distance. Of R restarts (seeded), the one with the
least gradient distance is kept (the attacker cannot see the truth).

**Paper defaults and the reference code** (mit-han-lab/dlg, snapshot d21007f): one CIFAR-100 image,
LeNet with sigmoids and weights uniform in ±0.5, 300 calls of ``torch.optim.LBFGS`` (lr 1, each up to 20
inner iterations, no line search), no restarts, soft label always optimised. Here: L-BFGS with a strong
Wolfe line search (fewer divergences, cf. Improved-DLG #6), ``--iters`` inner iterations in total per
restart, restarts, float64 attack on the float32 shared update, and the task's own models (ReLU).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ConfigError, UnknownNameError, check_range
from ..options import parse_value

TASKS = ("digits", "charlm")
LABEL_MODES = ("idlg", "dlg")
DISTANCES = ("l2", "cosine")
#: task options the attack uses unless --set says otherwise (small models: the attack is an optimisation
#: over the inputs through second derivatives of the model)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"model": "mlp", "hidden": 64},
    "charlm": {"context": 8, "d_model": 32, "n_layers": 1, "n_heads": 2, "max_bytes": 100_000},
}
_PRIOR_SAMPLES = 64  # random inputs for the mean softmax p̄ of the batch label-count rule
_NORM_EPS = 1e-6     # as DP-SGD's clipping


# ---- the defence --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Defence:
    """Parsed ``--defence``: ``kind`` is ``none``, ``dp``, ``local`` or ``compress`` (``spec`` the compressor's)."""

    kind: str = "none"
    spec: str = "none"
    sigma: float = 0.0
    clip: float = 1.0
    steps: int = 1
    lr: float = 0.1

    @classmethod
    def parse(cls, text: str) -> Defence:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"defence={text!r}; expected none, dp,sigma=S,clip=C, local,steps=H[,lr=LR] or a "
                              "compressor spec (topk,ratio=R, int8, int4, ...)")
        text = text.strip()
        name, _, rest = text.partition(",")
        name = name.strip()
        if name in ("none", "dp", "local"):
            keys = {"none": (), "dp": ("sigma", "clip"), "local": ("steps", "lr")}[name]
            values: dict[str, Any] = {}
            for item in (s.strip() for s in rest.split(",") if rest.strip()):
                key, eq, raw = item.partition("=")
                key, raw = key.strip(), raw.strip()
                if not eq or not key or not raw:
                    raise ConfigError(f"defence: expected key=value items after {name!r}, got {item!r} in {text!r}")
                if key not in keys:
                    raise UnknownNameError(f"defence {name} key", key, keys)
                if key in values:
                    raise ConfigError(f"defence: {key} is given twice in {text!r}")
                values[key] = parse_value(raw)
            if name == "dp":
                for key in ("sigma", "clip"):
                    if key not in values:
                        raise ConfigError(f"defence={text!r}: dp needs sigma=S (noise multiplier) and clip=C")
                check_range("defence dp sigma", values["sigma"], low=0)
                check_range("defence dp clip", values["clip"], low=0, low_open=True)
                if math.isinf(values["clip"]) or math.isinf(values["sigma"]):
                    raise ConfigError(f"defence={text!r}: sigma and clip must be finite")
                return cls("dp", text, sigma=float(values["sigma"]), clip=float(values["clip"]))
            if name == "local":
                if "steps" not in values:
                    raise ConfigError(f"defence={text!r}: local needs steps=H (local SGD steps, >= 1)")
                check_range("defence local steps", values["steps"], low=1, integer=True)
                lr = values.get("lr", 0.1)
                check_range("defence local lr", lr, low=0, low_open=True)
                return cls("local", text, steps=int(values["steps"]), lr=float(lr))
            return cls()
        from ..exchange import ExchangeSpec, compressors

        if name not in compressors:
            raise UnknownNameError("defence", name, ["none", "dp", "local", *compressors.names()])
        compressor = ExchangeSpec(compress=text).stages()[0]  # checks the compressor's keys
        if compressor.mean_only:
            raise ConfigError(f"defence={text!r}: {compressor.name} never decodes one worker's payload alone "
                              "(only the sum over workers), so there is no single shared update to attack")
        return cls("compress", text)


def _compress(spec: str, tensors: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """``tensors`` after encode → decode with the compressor ``spec`` (one worker, step 0)."""
    from ..exchange import ExchangeSpec, Slot, flatten

    compressor = ExchangeSpec(compress=spec).stages()[0]
    x = flatten(tensors)
    slot = Slot("grad", 0, seed, tuple(t.shape for t in tensors), 1)
    payload = (compressor.encode(x, slot, 0, memory={}) if compressor.stateful else compressor.encode(x, slot, 0))
    y = compressor.decode(payload, x.numel(), slot, 0)
    return [part.view_as(t).clone() for part, t in zip(y.split([t.numel() for t in tensors]), tensors,
                                                        strict=True)]


# ---- the task side: losses on real and dummy batches ---------------------------------------------
def _token_embedding(model: nn.Module) -> nn.Embedding:
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == 256:
            return m
    raise ConfigError("the charlm attack needs a byte embedding (nn.Embedding with 256 rows) in the model")


@contextmanager
def _soft_tokens(model: nn.Module, probs: torch.Tensor):
    """While active, the byte embedding returns ``probs @ E`` (a soft one-hot lookup) for any ids."""
    emb = _token_embedding(model)
    handle = emb.register_forward_hook(lambda m, inputs, out: probs @ m.weight)
    try:
        yield
    finally:
        handle.remove()


def soft_loss(model: nn.Module, params: dict[str, torch.Tensor], task: str, dummy: list[torch.Tensor],
              labels: torch.Tensor | None) -> torch.Tensor:
    """Mean loss of the dummy batch under ``params``. digits: ``dummy = [x']`` (+ label logits for DLG),
    hard ``labels`` for iDLG; charlm: ``dummy = [Z]``, soft one-hot sequences ``softmax(Z)``."""
    if task == "digits":
        logits = functional_call(model, params, (dummy[0],))
        target = F.softmax(dummy[1], -1) if labels is None else F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return -(target * F.log_softmax(logits, -1)).sum(-1).mean()
    probs = F.softmax(dummy[0], -1)
    ids = torch.zeros(probs.shape[:2], dtype=torch.long, device=probs.device)[:, :-1]
    # the math kernel of scaled_dot_product_attention: the fused ones have no second derivative
    with _soft_tokens(model, probs[:, :-1]), sdpa_kernel(SDPBackend.MATH):
        logits = functional_call(model, params, (ids,))
    return -(probs[:, 1:] * F.log_softmax(logits, -1)).sum(-1).mean()


def _per_example(dummy: list[torch.Tensor], labels: torch.Tensor | None, i: int):
    return [d[i:i + 1] for d in dummy], None if labels is None else labels[i:i + 1]


# ---- what the worker shares, and the attacker's simulation of it --------------------------------
def shared_update(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                  defence: Defence, seed: int = 0) -> list[torch.Tensor]:
    """The tensors (one per trainable parameter, float32) that the worker holding ``batch`` sends."""
    params = [p for p in model.parameters() if p.requires_grad]
    if defence.kind == "dp":
        from ..privacy import DPSGD

        engine = DPSGD(model, loss_fn, noise_multiplier=defence.sigma, max_grad_norm=defence.clip,
                       expected_batch_size=len(batch[0]), seed=seed)
        engine.backward(batch)
        out = [p.grad.detach().clone() for p in params]
        for p in params:
            p.grad = None
        return out
    if defence.kind == "local":
        worker = copy.deepcopy(model)
        opt = torch.optim.SGD(worker.parameters(), lr=defence.lr)
        for _ in range(defence.steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(worker, batch).backward()
            opt.step()
        return [(p0 - p1).detach() for p0, p1 in zip(params, [p for p in worker.parameters() if p.requires_grad],
                                                       strict=True)]
    grads = [g.detach() for g in torch.autograd.grad(loss_fn(model, batch), params)]
    if defence.kind == "compress":
        return _compress(defence.spec, grads, seed)
    return grads


def simulated_update(model: nn.Module, params: dict[str, torch.Tensor], task: str, dummy: list[torch.Tensor],
                     labels: torch.Tensor | None, defence: Defence) -> list[torch.Tensor]:
    """The attacker's differentiable version of :func:`shared_update` on the dummy batch (noise left out)."""
    names = list(params)

    def grad(p: dict[str, torch.Tensor], d: list[torch.Tensor], y: torch.Tensor | None) -> list[torch.Tensor]:
        return list(torch.autograd.grad(soft_loss(model, p, task, d, y), [p[n] for n in names], create_graph=True))

    if defence.kind == "dp":
        b = dummy[0].shape[0]
        total: list[torch.Tensor] | None = None
        for i in range(b):
            g = grad(params, *_per_example(dummy, labels, i))
            norm = torch.sqrt(sum((t * t).sum() for t in g))
            factor = torch.clamp(defence.clip / (norm + _NORM_EPS), max=1.0)
            g = [t * factor for t in g]
            total = g if total is None else [a + t for a, t in zip(total, g, strict=True)]
        return [t / b for t in total]
    if defence.kind == "local":
        p = dict(params)
        for _ in range(defence.steps):
            g = grad(p, dummy, labels)
            p = {n: p[n] - defence.lr * gn for n, gn in zip(names, g, strict=True)}
        return [params[n] - p[n] for n in names]
    return grad(params, dummy, labels)


def distance(sim: list[torch.Tensor], target: list[torch.Tensor], kind: str = "l2") -> torch.Tensor:
    """``Σ‖s − t‖²`` (``l2``) or ``1 − cos(s, t)`` over all tensors (``cosine``)."""
    if kind == "l2":
        return sum(((s - t) ** 2).sum() for s, t in zip(sim, target, strict=True))
    dot = sum((s * t).sum() for s, t in zip(sim, target, strict=True))
    ns = torch.sqrt(sum((s * s).sum() for s in sim))
    nt = torch.sqrt(sum((t * t).sum() for t in target))
    return 1 - dot / (ns * nt + 1e-30)


# ---- iDLG: labels from the last layer's gradient --------------------------------------------------
def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of the model's last ``nn.Linear`` (in module order)."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    if found is None:
        raise ConfigError("iDLG needs a final nn.Linear layer (its gradient gives the labels); use --labels dlg")
    return found


def idlg_labels(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, batch: int,
                mean_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Labels of a batch from the last linear layer's gradient of the mean cross-entropy.

    B = 1: ``argmin_j ∂ℓ/∂b_j`` (the only negative entry), or without a bias the row of ``∂ℓ/∂W`` with the
    smallest sum (the only negative row when the layer's inputs are ≥ 0). B > 1: class counts
    ``n_j = B (p̄_j − ∂ℓ/∂b_j)`` (this needs the bias), rounded by largest remainders to sum to B; ``p̄``
    (the mean softmax over the batch) defaults to uniform. Returns the labels sorted (a multiset)."""
    score = bias_grad if bias_grad is not None else weight_grad.sum(1)
    if batch == 1:
        return score.argmin().view(1)
    if bias_grad is None:
        raise ConfigError("iDLG for a batch (B > 1) counts labels from the last layer's bias gradient; the model "
                          "has no bias there; use --labels dlg")
    c = score.numel()
    p = torch.full((c,), 1.0 / c, dtype=score.dtype) if mean_probs is None else mean_probs.to(score)
    counts = (batch * (p - score)).clamp(min=0)
    base = counts.floor()
    left = int(batch - base.sum().item())
    if left > 0:
        base[torch.argsort(counts - base, descending=True, stable=True)[:left]] += 1
    elif left < 0:  # more than B counted: drop from the smallest remainders (of classes that have some)
        order = torch.argsort(counts - base + (base == 0) * 2, stable=True)
        for j in order.tolist():
            if left == 0:
                break
            take = min(int(base[j].item()), -left)
            base[j] -= take
            left += take
    return torch.repeat_interleave(torch.arange(c), base.long())


# ---- metrics -------------------------------------------------------------------------------------
def assign(cost: torch.Tensor) -> list[int]:
    """For each original i (row), the reconstruction (column) of least total cost (Hungarian method)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    out = [0] * cost.shape[0]
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        out[r] = c
    return out


def psnr(mse: float) -> float:
    """``10 log10(1 / MSE)`` for data in [0, 1]; MSE floored at 1e-10 (at most 100 dB)."""
    return 10 * math.log10(1 / max(mse, 1e-10))


# ---- the attack ----------------------------------------------------------------------------------
@dataclass
class DLGOptions:
    task: str = "digits"
    batch: int = 1
    defence: str = "none"
    restarts: int = 4
    iters: int = 200
    seed: int = 0
    labels: str = "idlg"
    distance: str = "l2"
    lr: float = 1.0   # L-BFGS step size

    def validate(self) -> None:
        if self.task not in TASKS:
            raise UnknownNameError("attack task", self.task, TASKS)
        check_range("batch", self.batch, low=1, high=8, integer=True)
        for key in ("restarts", "iters"):
            check_range(key, getattr(self, key), low=1, integer=True)
        if self.labels not in LABEL_MODES:
            raise UnknownNameError("labels", self.labels, LABEL_MODES)
        if self.distance not in DISTANCES:
            raise UnknownNameError("distance", self.distance, DISTANCES)
        check_range("lr", self.lr, low=0, low_open=True)
        Defence.parse(self.defence)


def _build(opts: DLGOptions, task_options: dict[str, Any] | None):
    from .. import tasks

    merged = {**TASK_DEFAULTS[opts.task], **(task_options or {})}
    task = tasks.create(opts.task, merged)
    torch.manual_seed(opts.seed)
    model = task.build_model().float()
    g = torch.Generator().manual_seed(opts.seed)
    idx = torch.randperm(task.num_train, generator=g)[:opts.batch]
    return task, model, task.get_batch(idx), idx


def attack(opts: DLGOptions, task_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run DLG/iDLG once: build the task's model (seeded), share the update of a random batch of
    ``opts.batch`` training examples under ``opts.defence``, reconstruct it. Returns the report (a dict,
    JSON-ready) with the tensors under the private keys ``_original`` and ``_reconstruction``."""
    opts.validate()
    defence = Defence.parse(opts.defence)
    start = time.perf_counter()
    task, model, batch, idx = _build(opts, task_options)
    target32 = shared_update(model, task.loss, batch, defence, opts.seed)
    model64 = copy.deepcopy(model).double()
    params = {n: p.detach().requires_grad_(True) for n, p in model64.named_parameters() if p.requires_grad}
    target = [t.double() for t in target32]
    b = opts.batch

    labels = None
    if opts.task == "digits" and opts.labels == "idlg":
        name, lin = last_linear(model64)
        names = list(params)
        wg = target[names.index(f"{name}.weight")]
        bg = target[names.index(f"{name}.bias")] if lin.bias is not None else None
        scale = defence.lr * defence.steps if defence.kind == "local" else 1.0  # pseudo-gradient → gradient
        with torch.no_grad():
            prior = torch.rand(_PRIOR_SAMPLES, *batch[0].shape[1:], generator=torch.Generator().manual_seed(opts.seed),
                               dtype=torch.float64)
            mean_probs = F.softmax(model64(prior), -1).mean(0)
        labels = idlg_labels(wg / scale, None if bg is None else bg / scale, b, mean_probs)

    with torch.enable_grad():  # the objective at the true batch (for the report; the attacker cannot know it)
        truth = _true_dummy(opts, batch, labels)
        true_labels = None if labels is None else batch[1]
        truth_distance = distance(simulated_update(model64, params, opts.task, truth, true_labels, defence), target,
                                  opts.distance).item()

    best: dict[str, Any] = {"loss": math.inf, "dummy": None, "restart": -1}
    losses = []
    for r in range(opts.restarts):
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + r)
        if opts.task == "digits":
            dummy = [torch.randn(b, *batch[0].shape[1:], generator=gen, dtype=torch.float64)]
            if labels is None:
                dummy.append(torch.randn(b, 10, generator=gen, dtype=torch.float64))
        else:
            dummy = [torch.randn(b, batch[0].shape[1] + 1, 256, generator=gen, dtype=torch.float64)]
        for d in dummy:
            d.requires_grad_(True)
        opt = torch.optim.LBFGS(dummy, lr=opts.lr, max_iter=opts.iters, history_size=100,
                                tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

        def closure(dummy=dummy, opt=opt) -> torch.Tensor:
            opt.zero_grad()
            d = distance(simulated_update(model64, params, opts.task, dummy, labels, defence), target,
                         opts.distance)
            d.backward()
            return d

        opt.step(closure)
        final = closure().item()  # NaN when the line search diverged: this restart failed
        losses.append(final)
        if math.isfinite(final) and final < best["loss"]:
            best = {"loss": final, "dummy": [d.detach().clone() for d in dummy], "restart": r}
    if best["dummy"] is None:
        best["dummy"] = [d.detach().clone() for d in dummy]
    report = _metrics(opts, task, batch, idx, best["dummy"], labels)
    report.update({"grad_distance": best["loss"], "truth_distance": truth_distance,
                   "best_restart": best["restart"], "restart_distances": losses,
                   "defence": asdict(defence), "options": asdict(opts),
                   "task_options": {**TASK_DEFAULTS[opts.task], **(task_options or {})},
                   "seconds": time.perf_counter() - start})
    return report


def _true_dummy(opts: DLGOptions, batch: Any, labels: torch.Tensor | None) -> list[torch.Tensor]:
    """The dummy variables that encode the true batch (one-hot logits scaled to be nearly exact)."""
    if opts.task == "digits":
        x = [batch[0].double()]
        return x if labels is not None else x + [F.one_hot(batch[1], 10).double() * 60]
    window = torch.cat([batch[0], batch[1][:, -1:]], 1)
    return [F.one_hot(window, 256).double() * 60]


def _metrics(opts: DLGOptions, task: Any, batch: Any, idx: torch.Tensor, dummy: list[torch.Tensor],
             labels: torch.Tensor | None) -> dict[str, Any]:
    b = opts.batch
    if opts.task == "digits":
        x, y = batch[0].double(), batch[1]
        rec = dummy[0].clamp(0, 1)
        rec_labels = labels if labels is not None else dummy[1].argmax(-1)
        cost = ((x[:, None, :] - rec[None, :, :]) ** 2).mean(-1)
        match = assign(cost)
        rows = []
        for i in range(b):
            j = match[i]
            mse = cost[i, j].item()
            rows.append({"index": int(idx[i]), "label": int(y[i]), "recovered_label": int(rec_labels[j]),
                         "mse": mse, "psnr": psnr(mse)})
        return {"examples": rows, "mean_mse": sum(r["mse"] for r in rows) / b,
                "mean_psnr": sum(r["psnr"] for r in rows) / b,
                "label_accuracy": sum(r["label"] == r["recovered_label"] for r in rows) / b,
                "_original": x, "_reconstruction": rec[match]}
    x, y = batch
    true = torch.cat([x, y[:, -1:]], 1)                       # the window of T + 1 bytes
    probs = F.softmax(dummy[0], -1)
    rec = probs.argmax(-1)
    acc = (true[:, None, :] == rec[None, :, :]).double().mean(-1)
    match = assign(-acc)
    onehot = F.one_hot(true, 256).double()
    rows = []
    for i in range(b):
        j = match[i]
        mse = ((probs[j] - onehot[i]) ** 2).mean().item()
        rows.append({"index": int(idx[i]), "text": _show(true[i]), "recovered": _show(rec[j]),
                     "byte_accuracy": acc[i, j].item(), "mse": mse})
    return {"examples": rows, "mean_mse": sum(r["mse"] for r in rows) / b, "mean_psnr": None,
            "label_accuracy": sum(r["byte_accuracy"] for r in rows) / b,
            "_original": true, "_reconstruction": rec[match]}


def _show(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("latin-1").encode("unicode_escape").decode("ascii")


def save_figure(report: dict[str, Any], path: Path) -> None:
    """PNG: originals (top row) over their matched reconstructions (bottom row); text as strings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orig, rec = report["_original"], report["_reconstruction"]
    b = orig.shape[0]
    if report["options"]["task"] == "digits":
        fig, axes = plt.subplots(2, b, figsize=(1.3 * b + 0.6, 3.0), squeeze=False)
        for i in range(b):
            for row, img in ((0, orig[i]), (1, rec[i])):
                ax = axes[row][i]
                ax.imshow(img.view(8, 8).cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
            ex = report["examples"][i]
            axes[0][i].set_title(f"y={ex['label']}", fontsize=8)
            axes[1][i].set_title(f"ŷ={ex['recovered_label']} {ex['psnr']:.0f}dB", fontsize=8)
        axes[0][0].set_ylabel("original", fontsize=8)
        axes[1][0].set_ylabel("DLG", fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * b))
        ax.axis("off")
        lines = []
        for ex in report["examples"]:
            lines += [f"original: {ex['text']}", f"DLG:      {ex['recovered']}  ({ex['byte_accuracy']:.0%})"]
        ax.text(0, 1, "\n".join(lines), family="monospace", fontsize=8, va="top")
    fig.suptitle(f"{report['options']['task']}  defence={report['options']['defence']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its tensors (what goes into the JSON file)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def format_table(report: dict[str, Any]) -> str:
    opts = report["options"]
    lines = [f"DLG on {opts['task']}, batch {opts['batch']}, defence {opts['defence']}, labels {opts['labels']}, "
             f"{opts['restarts']} restarts x {opts['iters']} L-BFGS iterations, seed {opts['seed']}"]
    if opts["task"] == "digits":
        lines.append(f"{'example':>8} {'label':>5} {'found':>5} {'MSE':>10} {'PSNR dB':>8}")
        for ex in report["examples"]:
            lines.append(f"{ex['index']:>8} {ex['label']:>5} {ex['recovered_label']:>5} {ex['mse']:>10.3g} "
                         f"{ex['psnr']:>8.1f}")
        lines.append(f"mean MSE {report['mean_mse']:.3g}, mean PSNR {report['mean_psnr']:.1f} dB, label accuracy "
                     f"{report['label_accuracy']:.0%}, gradient distance {report['grad_distance']:.3g} (at the truth "
                     f"{report['truth_distance']:.3g}) "
                     f"({report['seconds']:.1f} s)")
    else:
        for ex in report["examples"]:
            lines += [f"  original:  {ex['text']}", f"  recovered: {ex['recovered']}  "
                      f"(byte accuracy {ex['byte_accuracy']:.0%})"]
        lines.append(f"mean byte accuracy {report['label_accuracy']:.0%}, mean MSE of the soft one-hot "
                     f"{report['mean_mse']:.3g}, gradient distance {report['grad_distance']:.3g} (at the truth "
                     f"{report['truth_distance']:.3g}) "
                     f"({report['seconds']:.1f} s)")
    return "\n".join(lines)


# ---- command line: ``sgdlab attack dlg`` ------------------------------------------------------------
def add_arguments(p: Any) -> None:
    d = DLGOptions()
    p.add_argument("--task", default=d.task, choices=TASKS, help="digits (8x8 images) or charlm (byte windows)")
    p.add_argument("--batch", type=int, default=d.batch, help="examples in the attacked batch, 1..8 (default 1)")
    p.add_argument("--defence", default=d.defence,
                   help="none | dp,sigma=S,clip=C | topk,ratio=R | int8 | int4 | local,steps=H[,lr=LR] | any "
                        "compressor spec (default none)")
    p.add_argument("--restarts", type=int, default=d.restarts, help=f"random restarts (default {d.restarts})")
    p.add_argument("--iters", type=int, default=d.iters, help=f"L-BFGS iterations per restart (default {d.iters})")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the model, the batch and the restarts")
    p.add_argument("--labels", default=d.labels, choices=LABEL_MODES,
                   help="idlg: labels from the last layer's gradient (default); dlg: optimised jointly")
    p.add_argument("--distance", default=d.distance, choices=DISTANCES, help="gradient-matching distance")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="task option (e.g. hidden=128, model=cnn, context=16)")
    p.add_argument("--out", default=None, help="directory for dlg.json and dlg.png (default: print only)")


def main(args: Any) -> int:
    task_options = {}
    for s in args.sets:
        key, eq, raw = s.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {s!r}: expected KEY=VALUE")
        task_options[key.strip()] = parse_value(raw.strip())
    opts = DLGOptions(task=args.task, batch=args.batch, defence=args.defence, restarts=args.restarts,
                      iters=args.iters, seed=args.seed, labels=args.labels, distance=args.distance)
    report = attack(opts, task_options)
    print(format_table(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dlg.json").write_text(json.dumps(public(report), indent=2, allow_nan=True) + "\n")
        save_figure(report, out / "dlg.png")
        print(f"wrote {out / 'dlg.json'} and {out / 'dlg.png'}")
    return 0
