"""``sgdlab bench compress``: per-step compute cost of every registered compressor, in one process.

The vector is a random "gradient" with the shapes of a parameter set (``10m``: the 10M set of
``bench optim``; ``charlm``: the default charlm model's parameters), flattened as the exchange does
(:func:`sgdlab.exchange.flatten`, ``Slot(key, step, seed, shapes, world=1)``). One timed round is what a
worker computes in :meth:`Exchange.mean_` apart from the collective: the feedback rule's ``message``
(with ``--feedback``), ``encode`` (with ``memory=`` for stateful compressors, kept across rounds), the
rule's ``sent`` with the worker's own decode where the rule needs it, and ``decode`` of the payload.
PowerSGD decodes nothing alone: its factors are made in ``communicate``, so for it ``encode`` +
``communicate`` on a 1-worker :class:`SimGroup` is timed (``P = MQ``, Gram–Schmidt, ``Q = MᵀP̂``,
``P̂Qᵀ`` and the residual; the 1-worker "all-reduces" are one copy each), and its bytes are those of the
two factor all-reduces (``4·(Σ n·r + exact values)`` + ``4·Σ m·r``), not of the encoded ``M_w``.

Every time is the median of ``--repeats`` rounds after warm-up rounds, reported in ms, as a fraction of one
charlm training step (forward + backward + AdamW step of the default charlm task's model on a batch of its
default size, timed in the same process) and against the wire time of fp32's ring all-reduce among 8 workers
on the default simulated network (``NetworkModel()``: 1 Gbit/s, 1 ms latency).
Target: each compressor's round costs at most 10% of a charlm step.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .. import optim
from ..config import Config, resolve_device
from ..distributed.group import SimGroup
from ..distributed.network import NetworkModel
from ..errors import ConfigError, UnknownNameError
from ..exchange import ExchangeSpec, Slot, compressors, flatten
from ..exchange.powersgd import PowerSGD
from ..runner.build import build_task
from . import median_seconds
from .optim import PARAM_SETS

TARGET = 0.10   # a round's compute at most this fraction of a charlm step
WORKERS = 8     # workers of the fp32 all-reduce baseline


def add_arguments(p) -> None:
    p.add_argument("--params", default="10m", choices=sorted(PARAM_SETS), help="parameter set; default 10m")
    p.add_argument("--compressors", default=None, metavar="A,B,C",
                   help="comma-separated compressor names; default: every registered one")
    p.add_argument("--feedback", default="none", metavar="RULE",
                   help="error-feedback rule applied to the lossy compressors that take one (message and sent "
                        "are timed); default none")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per compressor (median); default 10")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per compressor first; default 2")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda; default auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def charlm_step_s(device: torch.device, warmup: int, repeats: int, seed: int) -> tuple[float, int]:
    """Median seconds of one forward + backward + AdamW step of the default charlm task (and its batch size)."""
    spec = Config(task="charlm", device=str(device)).spec()
    task = build_task(spec)
    torch.manual_seed(seed)
    model = task.build_model()
    opt = optim.create("adamw", model.parameters(), lr=spec.lr)
    g = torch.Generator().manual_seed(seed)

    def step():
        idx = torch.randint(task.num_train, (spec.batch_size,), generator=g)
        loss = task.loss(model, task.get_batch(idx))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_seconds(step, max(3, warmup), max(5, repeats), device), spec.batch_size


def powersgd_bytes(comp: PowerSGD, shapes: tuple[torch.Size, ...], n: int) -> int:
    """Bytes one worker puts into PowerSGD's two all-reduces (float32)."""
    parts = comp.layout(shapes, n)
    first = sum(p.rows * p.rank if p.rank else p.numel for p in parts)
    second = sum(p.cols * p.rank for p in parts if p.rank)
    return 4 * (first + second)


def measure(spec: str, x: torch.Tensor, shapes: tuple[torch.Size, ...], seed: int, warmup: int, repeats: int
            ) -> dict[str, Any]:
    """Median seconds of one worker's round of compressor ``spec`` on ``x``, and its payload bytes."""
    comp, fb, agg = ExchangeSpec(compress=spec).stages()
    n, device = x.numel(), x.device
    memory: dict[str, torch.Tensor] = {}
    step = [0]

    def slot() -> Slot:
        step[0] += 1
        return Slot("grad", step[0], seed, shapes, 1)

    def encode(msg, s):
        return comp.encode(msg, s, 0, memory=memory) if comp.stateful else comp.encode(msg, s, 0)

    if isinstance(comp, PowerSGD):
        group = SimGroup(1, NetworkModel())
        what = "encode + communicate (1-worker SimGroup)"

        def round_():
            s = slot()
            return comp.communicate([encode(x, s)], group, n, s, agg)[0]

        nbytes = powersgd_bytes(comp, shapes, n)
    else:
        what = "encode + decode"
        if fb.name != "none":
            what = f"{fb.name}.message + encode + " + ("sent(decode) + " if fb.needs_own_decode else "") + "decode"

        def round_():
            s = slot()
            msg = fb.message(x, memory)
            payload = encode(msg, s)
            if fb.needs_own_decode:
                fb.sent(msg, comp.decode(payload, n, s, 0), memory)
            return comp.decode(payload, n, s, 0)

        nbytes = comp.payload_bytes(encode(x, Slot("grad", 0, seed, shapes, 1)))
        memory.clear()
    secs = median_seconds(round_, warmup, repeats, device)
    return {"compressor": spec, "timed": what, "ms": 1e3 * secs, "bytes": int(nbytes)}


def _spec(name: str, rule: str) -> str:
    cls = compressors.get(name)
    if rule == "none" or cls.lossless or cls.own_feedback:
        return name
    return f"{name},feedback={rule}"


def main(args) -> int:
    if args.repeats < 1 or args.warmup < 0:
        raise ConfigError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    names = ([c.strip() for c in args.compressors.split(",") if c.strip()] if args.compressors
             else list(compressors.names()))
    for name in names:
        if name not in compressors.names():
            raise UnknownNameError("compressor", name, list(compressors.names()))
    device = torch.device(resolve_device(args.device))
    params = PARAM_SETS[args.params](device, torch.float32)
    shapes = tuple(p.shape for p in params)
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = flatten([torch.randn(p.shape, generator=g, device=device) * 0.01 for p in params])
    n = x.numel()
    del params
    print(f"bench compress: params={args.params} ({n / 1e6:.2f}M values, {len(shapes)} tensors) "
          f"feedback={args.feedback} repeats={args.repeats} device={device} threads={torch.get_num_threads()}")
    step_s, batch = charlm_step_s(device, args.warmup, args.repeats, args.seed)
    print(f"charlm step (forward + backward + AdamW, batch {batch}): {1e3 * step_s:.2f} ms")
    fp32 = measure("fp32", x, shapes, args.seed, args.warmup, args.repeats)
    # the baseline a compressor's compute replaces: the wire time of fp32's ring all-reduce among 8 workers
    # on the default simulated network (1 Gbit/s, 1 ms)
    wire_ms = 1e3 * NetworkModel().all_reduce(fp32["bytes"], WORKERS)[1]
    print(f"fp32 ring all-reduce, {WORKERS} workers, default network: {wire_ms:.1f} ms")
    rows = []
    for name in names:
        r = fp32 if name == "fp32" and args.feedback == "none" else measure(
            _spec(name, args.feedback), x, shapes, args.seed, args.warmup, args.repeats)
        r = dict(r, name=name, of_step=r["ms"] / (1e3 * step_s), vs_fp32=r["ms"] / wire_ms,
                 ratio=fp32["bytes"] / r["bytes"] if r["bytes"] else float("inf"))
        r["meets_target"] = r["of_step"] <= TARGET
        rows.append(r)
    print("| compressor | timed | ms | of a charlm step | vs fp32 all-reduce | payload bytes | ratio vs fp32 "
          "| ≤ 10% of a step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['compressor']} | {r['timed']} | {r['ms']:.3f} | {100 * r['of_step']:.1f}% | "
              f"{r['vs_fp32']:.2f}x | {r['bytes']} | {r['ratio']:.1f}x | {'yes' if r['meets_target'] else 'NO'} |")
    missed = [r["compressor"] for r in rows if not r["meets_target"]]
    print(f"target ≤ 10% of a charlm step: {'all met' if not missed else 'missed by ' + ', '.join(missed)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": args.params, "values": n, "device": str(device), "feedback": args.feedback,
                       "repeats": args.repeats, "charlm_step_ms": 1e3 * step_s, "charlm_batch": batch,
                       "fp32_ms": fp32["ms"], "fp32_all_reduce_ms": wire_ms, "target": TARGET, "rows": rows},
                      f, indent=2)
    return 0
