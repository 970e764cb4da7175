"""``sgdlab bench dp``: the cost of a DP-SGD step, against non-private training and against Opacus.

For each model (the ``digits`` CNN, the ``charlm`` transformer, ``charlm-untied``, the same transformer
with a separate output layer and positions looked up through their embedding module, the form Opacus's
hooks can follow, and ``gpt2``, Hugging Face's ``GPT2LMHeadModel`` built from a config of charlm's shape —
byte vocabulary, context 128, width 128, 2 layers, 4 heads, dropout off, tied head, positions passed as a
batch so that Opacus's hooks can follow them — on charlm's data, when ``transformers`` is installed; else
the row is skipped with a message) it times one optimizer step
(forward, backward, clipping and noise where private, ``SGD.step``, ``zero_grad``) on the same fixed
batch of ``--batch`` examples (one physical batch; a fixed batch rather than a Poisson one, so every
method does the same work), for:

* ``non-private``: ``task.loss(model, batch).backward()``;
* ``sgdlab``: :class:`sgdlab.privacy.DPSGD` with its default ``grad_sample=auto`` (and ``sgdlab-vmap``,
  the ``torch.func`` path);
* Opacus 1.6 (``pip install opacus==1.6.0``, or ``pip install 'sgdlab[bench]'``) in each of its
  per-sample modes: ``hooks`` (its default), ``functorch``, ``ew`` (expanded weights) and ``ghost`` (fast
  gradient clipping). A mode that cannot run a model is listed with the reason.

All methods run in one process, in rounds that rotate their order; the figure is the median over rounds
of the mean step time within a round. Before timing, with noise 0, the clipped and averaged gradient of
every Opacus mode is compared with sgdlab's (``allclose``), so the comparison is between equal results.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import tasks
from ..config import resolve_device
from ..errors import ConfigError, UnknownNameError
from ..privacy import DPSGD

MODELS = {"digits": ("digits", {"model": "cnn"}), "charlm": ("charlm", {}), "charlm-untied": ("charlm", {}),
          "gpt2": ("charlm", {})}
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")
NOISE, CLIP, LR = 1.0, 1.0, 0.01


def _fixed_batch(task: tasks.Task, size: int, seed: int = 0):
    if task.num_train < size:
        raise ConfigError(f"--batch {size} is larger than task {task.name!r}'s {task.num_train} training examples")
    idx = torch.randperm(task.num_train, generator=torch.Generator().manual_seed(seed))[:size]
    return tuple(t.contiguous() for t in task.get_batch(idx))


class _UntiedByteTransformer(nn.Module):
    """charlm's model with a separate output layer and positions looked up through their embedding module:
    the form Opacus's per-module hooks can follow (they miss the tied head and the sliced position table)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.tok, self.pos, self.blocks, self.ln_f = base.tok, base.pos, base.blocks, base.ln_f
        self.head = nn.Linear(base.tok.embedding_dim, base.tok.num_embeddings, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(base.tok.weight)
        self.head.to(base.tok.weight.device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[-1], device=idx.device).expand_as(idx).contiguous()
        x = self.tok(idx) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class _HFGPT2(nn.Module):
    """Hugging Face GPT-2 (``transformers.GPT2LMHeadModel``, random init, nothing downloaded) in charlm's shape,
    returning the logits: ``Conv1D`` linears (``torch.addmm``), a tied head, dropout off (so that every method
    computes the same gradient). Positions are passed as a (B, T) index (``batched_positions``): with GPT-2's
    own (1, T) one, which sgdlab follows too, every Opacus mode fails."""

    def __init__(self, task: tasks.Task):
        import transformers

        super().__init__()
        o = task.options
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=o.context, n_embd=o.d_model, n_layer=o.n_layers,
                                      n_head=o.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0, use_cache=False)
        self.lm = transformers.GPT2LMHeadModel(cfg).to(task.device)
        self.batched_positions = True

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(idx) if self.batched_positions else None
        return self.lm(input_ids=idx, position_ids=positions).logits


def _transformers_missing() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return True
    return False


def _model(task: tasks.Task) -> nn.Module:
    torch.manual_seed(0)
    return task.build_model()


def _plain(task, batch) -> Callable[[], None]:
    model = _model(task)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _sgdlab_engine(task, model, batch_size: int, grad_sample: str, noise: float) -> DPSGD:
    return DPSGD(model, task.loss, noise_multiplier=noise, max_grad_norm=CLIP, expected_batch_size=batch_size,
                 max_physical_batch=batch_size, grad_sample=grad_sample, seed=0)


def _sgdlab(task, batch, batch_size: int, grad_sample: str) -> Callable[[], None]:
    model = _model(task)
    engine = _sgdlab_engine(task, model, batch_size, grad_sample, NOISE)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        engine.backward(batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
    step.engine = engine  # type: ignore[attr-defined]
    return step


def _opacus(task, batch, batch_size: int, mode: str, noise: float):
    """(private model, DP optimizer, loss function of the batch) for one Opacus mode."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = _model(task)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = batch
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
        kw: dict[str, Any] = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise,
                                  max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode=mode)
        if mode == "ghost":
            pmodel, popt, crit, _ = engine.make_private(criterion=nn.CrossEntropyLoss(), **kw)

            def loss():
                out = pmodel(x)
                if out.dim() > 2:  # per-sequence mean, like sgdlab's per-example loss
                    return crit(out.flatten(0, -2), y.flatten(), shape=out.shape)
                return crit(out, y)
        else:
            pmodel, popt, _ = engine.make_private(**kw)

            def loss():
                return task.loss(pmodel, (x, y))
    return pmodel, popt, loss


def _opacus_step(task, batch, batch_size: int, mode: str) -> Callable[[], None]:
    _, popt, loss = _opacus(task, batch, batch_size, mode, NOISE)

    def step():
        loss().backward()
        popt.step()
        popt.zero_grad(set_to_none=True)
    return step


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text[:90]}"


def check_against_opacus(task, batch, batch_size: int, mode: str) -> tuple[bool, float]:
    """With noise 0: does Opacus ``mode`` give sgdlab's clipped, averaged gradient? (ok, max abs diff)"""
    ours = _model(task)
    _sgdlab_engine(task, ours, batch_size, "auto", 0.0).backward(batch)
    pmodel, popt, loss = _opacus(task, batch, batch_size, mode, 0.0)
    loss().backward()
    popt.pre_step()  # clip, (zero) noise, divide by the expected batch size → p.grad
    diff = 0.0
    ok = True
    for (name, p), q in zip(ours.named_parameters(), pmodel.parameters(), strict=True):
        if q.grad is None:
            raise RuntimeError(f"Opacus left no gradient for {name}")
        diff = max(diff, float((p.grad - q.grad).abs().max()))
        ok = ok and torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-6)
    return ok, diff


def _time(step: Callable[[], None], steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def bench_model(name: str, *, batch_size: int, steps: int, rounds: int, device: str, opacus: bool,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    task_name, options = MODELS[name]
    task = tasks.create(task_name, options, device)
    if name == "charlm-untied":
        tied = task.build_model
        task.build_model = lambda: _UntiedByteTransformer(tied())  # type: ignore[method-assign]
    elif name == "gpt2":
        task.build_model = lambda: _HFGPT2(task)  # type: ignore[method-assign]
    batch = _fixed_batch(task, batch_size)
    methods: dict[str, Callable[[], None]] = {"non-private": _plain(task, batch),
                                              "sgdlab": _sgdlab(task, batch, batch_size, "auto"),
                                              "sgdlab-vmap": _sgdlab(task, batch, batch_size, "vmap")}
    notes: dict[str, str] = {}
    checks: dict[str, Any] = {}
    if opacus:
        for mode in OPACUS_MODES:
            key = f"opacus-{mode}"
            try:
                ok, diff = check_against_opacus(task, batch, batch_size, mode)
                checks[key] = {"equal": ok, "max_abs_diff": diff}
                if not ok:
                    notes[key] = f"gradient differs from sgdlab's (max abs diff {diff:.2e}); not timed"
                    continue
                methods[key] = _opacus_step(task, batch, batch_size, mode)
            except Exception as e:  # a mode that cannot run this model
                notes[key] = f"cannot run: {_short(e)}"
    for key, step in list(methods.items()):  # warm-up (and a last chance to fail)
        try:
            step()
            step()
        except Exception as e:
            notes[key] = f"failed: {_short(e)}"
            del methods[key]
    times: dict[str, list[float]] = {k: [] for k in methods}
    dev = torch.device(task.device)
    keys = list(methods)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[key].append(_time(methods[key], steps, dev))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    path = methods["sgdlab"].engine.method if "sgdlab" in methods else None  # type: ignore[attr-defined]
    base = ms["non-private"]
    opacus_ms = {k: v for k, v in ms.items() if k.startswith("opacus-")}
    fastest = min(opacus_ms, key=opacus_ms.get) if opacus_ms else None
    log(f"\n{name}: {sum(p.numel() for p in _model(task).parameters()):,} parameters, batch {batch_size}, "
        f"{steps} steps x {rounds} rounds, device {dev}, {torch.get_num_threads()} threads")
    log("| method | ms/step | x non-private | sgdlab speed-up | gradient = sgdlab's (noise 0) |")
    log("|---|---|---|---|---|")
    for key in [*methods, *[k for k in notes if k not in methods]]:
        check = checks.get(key)
        eq = "–" if check is None else ("yes" if check["equal"] else "NO") + f" ({check['max_abs_diff']:.1e})"
        if key in ms:
            speed = "" if not key.startswith("opacus") else f"{ms[key] / ms['sgdlab']:.2f}x"
            log(f"| {key} | {ms[key]:.1f} | {ms[key] / base:.2f} | {speed} | {eq} |")
        else:
            log(f"| {key} | – | – | – | {notes[key]} |")
    ratio = ms["sgdlab"] / base
    log(f"sgdlab DP-SGD (grad_sample=auto took {path}) / non-private = {ratio:.2f} "
        f"({'meets' if ratio <= 1.3 else 'misses'} the <= 1.3 target)")
    if fastest is not None:
        log(f"fastest Opacus mode: {fastest} ({opacus_ms[fastest]:.1f} ms); sgdlab is "
            f"{opacus_ms[fastest] / ms['sgdlab']:.2f}x faster")
    return {"model": name, "batch": batch_size, "ms_per_step": ms, "notes": notes, "checks": checks,
            "ratio_to_nonprivate": ratio, "opacus_fastest": fastest, "sgdlab_path": path,
            "threads": torch.get_num_threads()}


def add_arguments(p) -> None:
    p.add_argument("--models", default="digits,charlm,charlm-untied,gpt2",
                   help="comma-separated: digits (CNN), charlm, charlm-untied (separate output layer; Opacus can "
                        "run it), gpt2 (Hugging Face GPT-2 in charlm's shape; needs transformers)")
    p.add_argument("--batch", type=int, default=256, help="logical = physical batch (default 256)")
    p.add_argument("--steps", type=int, default=5, help="steps per method per round (default 5)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, rotating the order of methods (default 5)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-opacus", action="store_true", help="skip Opacus (time sgdlab and non-private only)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def main(args) -> int:
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in names:
        if m not in MODELS:
            raise UnknownNameError("bench dp model", m, list(MODELS))
    for key in ("batch", "steps", "rounds"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key} must be >= 1, got {getattr(args, key)}")
    opacus = not args.no_opacus
    if opacus:
        try:
            import opacus as _  # noqa: F401
        except ImportError:
            raise ConfigError("bench dp compares against Opacus, which is not installed: pip install "
                              "opacus==1.6.0 (or pip install -e '.[bench]'), or pass --no-opacus") from None
    device = resolve_device(args.device)
    with warnings.catch_warnings():  # Opacus warns on every ghost-mode backward; the table says what matters
        warnings.filterwarnings("ignore", category=UserWarning, module=r"opacus\..*")
        warnings.filterwarnings("ignore", message=r".*[Ff]ull backward hook.*")
        results = []
        for m in names:
            if m == "gpt2" and _transformers_missing():
                print("\ngpt2: skipped (transformers is not installed: pip install transformers)")
                continue
            results.append(bench_model(m, batch_size=args.batch, steps=args.steps, rounds=args.rounds,
                                       device=device, opacus=opacus))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
