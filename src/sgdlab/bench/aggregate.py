"""``sgdlab bench aggregate``: compute time per round of every registered aggregator and pre-aggregator.

One process holds the ``n`` workers' vectors of ``d`` float32 values as one ``n × d`` tensor (its rows are
the vectors handed to the rule, as the exchange hands the decoded vectors over): a shared "true gradient"
plus independent noise per worker, all honest, drawn from ``--seed``. One timed round is one call of the
rule as the exchange makes it: ``aggregate(vectors, slot, state)`` for an aggregator (cclip keeps its
centre in ``state`` across rounds) and ``pre(vectors, slot)`` for a pre-aggregator alone (the aggregator
that follows it costs what its own row says, on ``pre.count(n)`` vectors). Every rule is built with its
default options, except that ``--f`` sets ``f`` for every rule that has one. A rule whose own check
refuses ``(n, f)`` (its bound on f, or MDA's cap on the C(n, f) subsets it enumerates) is not run: its
row says why.

Times are the median of ``--repeats`` rounds after ``--warmup`` untimed ones, in ms and as a multiple of
``mean``'s. Bytes are what one worker sends per round in the network model
(:class:`sgdlab.distributed.network.NetworkModel`, ring collectives): ``mean`` all-reduces the ``4d``
bytes, ``2(n−1)/n · 4d`` per worker; every other rule needs each worker's vector, an all-gather of
``(n−1) · 4d`` per worker, ``n/2`` times as much. Wire times are on the default network (1 Gbit/s, 1 ms).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import resource
import sys
from typing import Any

import torch

from ..config import resolve_device
from ..distributed.network import NetworkModel
from ..errors import ConfigError, UnknownNameError
from ..exchange import aggregators, pre_aggregators
from ..exchange.base import Slot, Stage, build_stage
from . import median_seconds


def add_arguments(p) -> None:
    p.add_argument("--workers", type=int, default=64, help="n, vectors per round; default 64")
    p.add_argument("--params", type=int, default=10_000_000, help="d, float32 values per vector; default 10M")
    p.add_argument("--f", type=int, default=1,
                   help="f (Byzantine vectors tolerated) for every rule with an f option; default 1")
    p.add_argument("--rules", default=None, metavar="A,B,C",
                   help="comma-separated aggregator and pre-aggregator names; default: every registered one")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per rule (median); default 5")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per rule first; default 1")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda; default auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def rule_names(text: str | None) -> list[tuple[str, str]]:
    """``(kind, name)`` for every rule asked for (``kind``: ``"aggregator"`` or ``"pre-aggregator"``);
    ``mean`` always comes first, as the baseline."""
    known = {**{n: "aggregator" for n in aggregators.names()}, **{n: "pre-aggregator" for n in pre_aggregators.names()}}
    names = [s.strip() for s in text.split(",") if s.strip()] if text else list(known)
    if not names:
        raise ConfigError(f"--rules={text!r}: expected comma-separated names, one of: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise UnknownNameError("aggregator or pre-aggregator", name, list(known))
    names = ["mean", *[n for n in dict.fromkeys(names) if n != "mean"]]
    return [(known[n], n) for n in names]


def build(kind: str, name: str, f: int) -> Stage:
    """The rule with its default options, ``f`` set where it has one."""
    registry = aggregators if kind == "aggregator" else pre_aggregators
    fields = {fl.name for fl in dataclasses.fields(registry.get(name).Options)} \
        if dataclasses.is_dataclass(registry.get(name).Options) else set()
    return build_stage(registry, name, {"f": f} if "f" in fields else {}, kind)


def human_bytes(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def spec_text(rule: Stage) -> str:
    opts = dataclasses.asdict(rule.options) if dataclasses.is_dataclass(rule.options) else {}
    return ",".join([rule.name, *(f"{k}={v}" for k, v in opts.items())])


def wire_bytes(kind: str, name: str, n: int, d: int) -> float:
    """Bytes one worker sends per round: mean's all-reduce or the all-gather of every worker's vector."""
    net = NetworkModel()
    return (net.all_reduce if name == "mean" else net.all_gather)(4 * d, n)[0]


def measure(kind: str, name: str, vectors: list[torch.Tensor], f: int, warmup: int, repeats: int,
            seed: int) -> dict[str, Any]:
    """One rule's row: its spec, and either its median ms per round or why it was skipped."""
    n, d, device = len(vectors), vectors[0].numel(), vectors[0].device
    rule = build(kind, name, f)
    row: dict[str, Any] = {"name": name, "kind": kind, "spec": spec_text(rule), "bytes": wire_bytes(kind, name, n, d)}
    try:
        rule.check_workers(n)
    except ConfigError as e:
        return dict(row, ms=None, skipped=str(e).split("; use ")[0])
    step = [0]
    state: dict[str, torch.Tensor] = {}

    def round_():
        step[0] += 1
        slot = Slot("grad", step[0], seed)
        return rule(vectors, slot) if kind == "pre-aggregator" else rule.aggregate(vectors, slot, state)

    secs = median_seconds(round_, warmup, repeats, device)
    gc.collect()
    return dict(row, ms=1e3 * secs, skipped=None,
                out=rule.count(n) if kind == "pre-aggregator" else 1)


def main(args) -> int:
    n, d, f = args.workers, args.params, args.f
    if n < 1 or d < 1 or f < 0 or args.repeats < 1 or args.warmup < 0:
        raise ConfigError(f"--workers={n}, --params={d}, --f={f}, --repeats={args.repeats}, --warmup={args.warmup}: "
                          "allowed: workers >= 1, params >= 1, f >= 0, repeats >= 1, warmup >= 0")
    rules = rule_names(args.rules)
    device = torch.device(resolve_device(args.device))
    g = torch.Generator(device=device).manual_seed(args.seed)
    # honest workers: a shared direction plus noise of the same size per worker
    x = torch.randn(n, d, generator=g, device=device).mul_(0.01)
    x.add_(torch.randn(d, generator=g, device=device).mul_(0.01))
    vectors = list(x.unbind(0))
    net = NetworkModel()
    print(f"bench aggregate: n={n} workers, d={d} ({d / 1e6:.2f}M) float32 values ({4 * n * d / 1e9:.2f} GB of "
          f"vectors), f={f}, repeats={args.repeats}, warmup={args.warmup}, device={device}, "
          f"threads={torch.get_num_threads()}")
    rows = [measure(kind, name, vectors, f, args.warmup, args.repeats, args.seed) for kind, name in rules]
    mean_ms, mean_bytes = rows[0]["ms"], rows[0]["bytes"]
    print(f"wire per round on the default network ({net.canonical()}): mean all-reduce "
          f"{1e3 * net.all_reduce(4 * d, n)[1]:.1f} ms, all-gather {1e3 * net.all_gather(4 * d, n)[1]:.1f} ms")
    print("| rule | kind | spec | ms per round | vs mean | bytes sent per worker | vs mean's all-reduce |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["vs_mean"] = None if r["ms"] is None or not mean_ms else r["ms"] / mean_ms
        r["bytes_vs_mean"] = r["bytes"] / mean_bytes if mean_bytes else None
        what = "all-reduce" if r["name"] == "mean" else "all-gather"
        b = f"{human_bytes(r['bytes'])} ({what})"
        bv = "-" if r["bytes_vs_mean"] is None else f"{r['bytes_vs_mean']:.1f}x"
        if r["ms"] is None:
            print(f"| {r['name']} | {r['kind']} | {r['spec']} | skipped: {r['skipped']} | - | {b} | {bv} |")
        else:
            print(f"| {r['name']} | {r['kind']} | {r['spec']} | {r['ms']:.2f} | {r['vs_mean']:.1f}x | {b} | {bv} |")
    if any(r["kind"] == "pre-aggregator" for r in rows):
        print("pre-aggregators are timed alone; the aggregator after one runs on its output vectors")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"peak resident memory of this process: {human_bytes(peak)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"workers": n, "params": d, "f": f, "device": str(device), "repeats": args.repeats,
                       "warmup": args.warmup, "rows": rows}, fh, indent=2)
    return 0
