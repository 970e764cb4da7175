"""Named sets of runs for ``sgdlab compare --preset NAME``."""

from __future__ import annotations

from collections.abc import Callable

from .config import Config
from .registry import Registry

registry: Registry[Callable[[], list[Config]]] = Registry("preset")


@registry.add("demo", "charlm, 4 simulated workers, same token budget: ddp, localsgd, diloco and "
              "streaming-diloco (int4) on the cross-region network (1 Gbit/s, 30 ms), one step time measured once "
              "for every run; a takeaway line under the table (~4 minutes on 2 CPU cores)")
def demo() -> list[Config]:
    base = dict(task="charlm", optimizer="adamw", lr=3e-3, steps=200, batch_size=8, workers=4, eval_every=40,
                schedule="cosine", warmup_steps=20, grad_clip=1.0, optimizer_args={"weight_decay": 0.01},
                network="cross-region")
    return [
        Config(name="ddp", strategy="ddp", **base),
        Config(name="localsgd", strategy="localsgd", strategy_args={"sync_every": 40}, **base),
        Config(name="diloco", strategy="diloco", strategy_args={"sync_every": 40, "outer_lr": 0.7}, **base),
        Config(name="streaming-diloco-int4", strategy="streaming-diloco",
               strategy_args={"sync_every": 40, "outer_lr": 0.7, "fragments": 2, "overlap": 1, "mix_alpha": 0.5,
                              "precision": "int4"}, **base),
    ]


@registry.add("optimizers-quick", "charlm, one worker: SGD, SGD with momentum and AdamW, same token budget "
              "(~2 minutes on 2 CPU cores)")
def optimizers_quick() -> list[Config]:
    base = dict(task="charlm", steps=300, batch_size=32, eval_every=50, schedule="cosine", warmup_steps=20,
                grad_clip=1.0)
    return [
        Config(name="sgd", optimizer="sgd", lr=1.0, **base),
        Config(name="sgd-momentum", optimizer="sgd", lr=0.1, optimizer_args={"momentum": 0.9}, **base),
        Config(name="adamw", optimizer="adamw", lr=3e-3, optimizer_args={"weight_decay": 0.01}, **base),
    ]


def _strategies(workers: int, steps: int, sync_every: int) -> list[Config]:
    base = dict(task="charlm", optimizer="adamw", lr=3e-3, steps=steps, batch_size=8, workers=workers,
                eval_every=steps // 6, schedule="cosine", warmup_steps=20, grad_clip=1.0, step_time=0.05,
                optimizer_args={"weight_decay": 0.01}, network="bandwidth=1G,latency=1ms")
    h = {"sync_every": sync_every}
    return [
        Config(name="ddp", strategy="ddp", **base),
        Config(name=f"localsgd-h{sync_every}", strategy="localsgd", strategy_args=h, **base),
        Config(name=f"diloco-h{sync_every}", strategy="diloco", strategy_args={**h, "outer_lr": 0.7}, **base),
        Config(name=f"diloco-h{sync_every}-lr0.4", strategy="diloco", strategy_args={**h, "outer_lr": 0.4}, **base),
        Config(name=f"streaming-h{sync_every}-fp32", strategy="streaming-diloco",
               strategy_args={**h, "outer_lr": 0.7, "fragments": 2, "overlap": 1, "precision": "fp32"}, **base),
        Config(name=f"streaming-h{sync_every}-int4", strategy="streaming-diloco",
               strategy_args={**h, "outer_lr": 0.7, "fragments": 2, "overlap": 1, "precision": "int4"}, **base),
    ]


@registry.add("strategies-4", "charlm, 4 workers, 600 steps: ddp vs localsgd / diloco / streaming-diloco at H=50 "
              "(BENCHMARKS.md; ~10 minutes)")
def strategies_4() -> list[Config]:
    return _strategies(4, 600, 50)


@registry.add("strategies-8", "charlm, 8 workers, 300 steps: ddp vs localsgd / diloco / streaming-diloco at H=50 "
              "(BENCHMARKS.md; ~10 minutes)")
def strategies_8() -> list[Config]:
    return _strategies(8, 300, 50)


def _optimizer_names() -> list[str]:
    from . import optim

    return optim.registry.names()


#: learning-rate multipliers of the ``optimizers`` presets' sweeps (times each optimizer's default lr)
LR_MULTS = (0.3, 1.0, 3.0, 10.0)
#: optimizers whose papers train embeddings and the output layer with AdamW (``io_adamw=true``)
IO_ADAMW = ("muon", "swan", "auon", "hybrid-auon")
#: parameter-free optimizers (their lr is a multiplier to leave at 1): one run each, no sweep
PARAMETER_FREE = ("dog", "l-dog")


@registry.add("optimizers", "charlm, one worker, 300 steps: every registered optimizer at 0.3x, 1x, 3x and 10x "
              "its paper/default learning rate (Muon, SWAN, AuON with embeddings and head on AdamW, as their papers "
              "do) (BENCHMARKS.md; ~45 minutes on 2 CPU cores)")
def optimizers() -> list[Config]:
    from . import optim

    base = dict(task="charlm", steps=300, batch_size=32, eval_every=50, schedule="cosine", warmup_steps=20,
                grad_clip=1.0)
    out = []
    for name in _optimizer_names():
        lr0 = optim.hyperparameters(name)["lr"]
        extra: dict = {"optimizer_args": {"momentum": 0.9}} if name == "sgd" else {}
        if name in IO_ADAMW:
            extra["io_adamw"] = True
        for mult in (1.0,) if name in PARAMETER_FREE else LR_MULTS:
            out.append(Config(name=f"{name}-x{mult:g}", optimizer=name, lr=lr0 * mult, **base, **extra))
    return out


@registry.add("optimizers-digits", "digits MLP, one worker, 400 steps: every registered optimizer at 0.3x, 1x, "
              "3x and 10x its default learning rate (BENCHMARKS.md; ~4 minutes)")
def optimizers_digits() -> list[Config]:
    from . import optim

    out = []
    for name in _optimizer_names():
        lr0 = optim.hyperparameters(name)["lr"]
        extra: dict = {"optimizer_args": {"momentum": 0.9}} if name == "sgd" else {}
        for mult in (1.0,) if name in PARAMETER_FREE else LR_MULTS:
            out.append(Config(name=f"{name}-x{mult:g}", task="digits", optimizer=name, lr=lr0 * mult, steps=400,
                              batch_size=32, eval_every=100, **extra))
    return out


@registry.add("dp-digits", "digits CNN, one worker, 300 steps of batch 128: DP-SGD at epsilon 1, 3, 8 "
              "(delta 1e-5) and non-private, SGD-momentum at two learning rates and AdamW (BENCHMARKS.md; "
              "~2 minutes)")
def dp_digits() -> list[Config]:
    base = dict(task="digits", task_args={"model": "cnn"}, steps=300, batch_size=128, eval_every=50)
    opts = {"sgdm-lr0.02": dict(optimizer="sgd", lr=0.02, optimizer_args={"momentum": 0.9}),
            "sgdm-lr0.05": dict(optimizer="sgd", lr=0.05, optimizer_args={"momentum": 0.9}),
            "adamw-lr0.01": dict(optimizer="adamw", lr=0.01)}
    out = []
    for eps in (1, 3, 8, None):
        dp = None if eps is None else f"target_epsilon={eps},clip=1.0,delta=1e-5"
        for label, o in opts.items():
            out.append(Config(name=f"{'eps' + str(eps) if eps else 'nonprivate'}-{label}", dp=dp, **base, **o))
    return out


@registry.add("dp-clients", "digits CNN, Local SGD (H=10) over 16 and 64 workers, 300 steps: client-level DP "
              "at epsilon 8 (delta 1e-3, participation 0.5) against non-private (BENCHMARKS.md; ~2 minutes)")
def dp_clients() -> list[Config]:
    out = []
    for n in (16, 64):
        base = dict(task="digits", task_args={"model": "cnn"}, strategy="localsgd", strategy_args={"sync_every": 10},
                    workers=n, optimizer="sgd", lr=0.05, optimizer_args={"momentum": 0.9}, steps=300,
                    batch_size=16, eval_every=50)
        out.append(Config(name=f"n{n}-nonprivate", **base))
        for clip in (0.1, 0.5):
            out.append(Config(name=f"n{n}-eps8-clip{clip}", **base,
                              dp=f"target_epsilon=8,clip={clip},delta=1e-3,unit=client,participation=0.5"))
    return out


@registry.add("optimizers-sweep", "charlm, one worker, 300 steps: learning-rate sweeps for the papers' claims "
              "(AdamW, SGD-SaI, Sophia-G, Muon/SWAN/AuON with embeddings on AdamW) (BENCHMARKS.md; ~20 minutes)")
def optimizers_sweep() -> list[Config]:
    base = dict(task="charlm", steps=300, batch_size=32, eval_every=50, schedule="cosine", warmup_steps=20,
                grad_clip=1.0)
    sweep = {"adamw": (3e-4, 1e-3, 3e-3, 1e-2), "sgd-sai": (0.03, 0.1, 0.3, 1.0),
             "sophia-g": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "muon": (0.01, 0.02, 0.05, 0.1),
             "swan": (1e-3, 3e-3, 1e-2), "auon": (0.02, 0.08, 0.3)}
    out = []
    for name, lrs in sweep.items():
        io = {"io_adamw": True} if name in ("muon", "swan", "auon") else {}
        for lr in lrs:
            out.append(Config(name=f"{name}{'-io' if io else ''}-lr{lr:g}", optimizer=name, lr=lr, **io, **base))
    return out


@registry.add("dp-charlm", "charlm, one worker, 300 steps of batch 128: DP-SGD at epsilon 8 (delta 1e-7 < 1/N) "
              "at two learning rates against non-private, AdamW (BENCHMARKS.md; ~8 minutes)")
def dp_charlm() -> list[Config]:
    base = dict(task="charlm", optimizer="adamw", steps=300, batch_size=128, eval_every=50, schedule="cosine",
                warmup_steps=20)
    dp = "target_epsilon=8,clip=1.0,delta=1e-7"
    return [Config(name="nonprivate", lr=3e-3, grad_clip=1.0, **base),
            Config(name="eps8-lr3e-3", lr=3e-3, dp=dp, **base),
            Config(name="eps8-lr1e-2", lr=1e-2, dp=dp, **base)]


# --- communication compression (issue 13) ----------------------------------------------------------------------

COMPRESSORS = {  # run name → --compress spec, two or three settings per compressor
    "topk0.01-ef": "topk,ratio=0.01,feedback=ef", "topk0.001-ef": "topk,ratio=0.001,feedback=ef",
    "topk0.01-ef21": "topk,ratio=0.01,feedback=ef21", "topk0.01-econtrol": "topk,ratio=0.01,feedback=econtrol",
    "randk0.01-ef": "randk,ratio=0.01,unbiased=false,feedback=ef",
    "randk0.1-ef": "randk,ratio=0.1,unbiased=false,feedback=ef",
    "qsgd16": "qsgd,levels=16", "qsgd4": "qsgd,levels=4", "terngrad": "terngrad",
    "signsgd-vote": "signsgd,vote=majority", "scaled-sign-ef": "scaled_sign,feedback=ef",
    "onebit-ef": "onebit,feedback=ef", "powersgd-r1": "powersgd,rank=1", "powersgd-r2": "powersgd,rank=2",
    "powersgd-r4": "powersgd,rank=4", "int8": "int8", "int4": "int4",
}


@registry.add("compression", "charlm, 8 workers, 300 steps, same tokens: ddp uncompressed and with every "
              "compressor at two or three settings, DGC with SGD-momentum, and diloco / streaming-diloco combined "
              "with PowerSGD and int4; loss-vs-bytes frontier (BENCHMARKS.md; ~60 minutes)")
def compression() -> list[Config]:
    base = dict(task="charlm", optimizer="adamw", lr=3e-3, steps=300, batch_size=8, workers=8, eval_every=50,
                schedule="cosine", warmup_steps=20, grad_clip=1.0, step_time=0.05,
                optimizer_args={"weight_decay": 0.01}, network="bandwidth=1G,latency=1ms")
    out = [Config(name="ddp", strategy="ddp", **base)]
    out += [Config(name=f"ddp-{name}", strategy="ddp", compress=spec, **base) for name, spec in COMPRESSORS.items()]
    sgdm = {**base, "optimizer": "sgd", "lr": 0.1, "optimizer_args": {}}
    out += [Config(name="ddp-sgdm", strategy="ddp", **{**sgdm, "optimizer_args": {"momentum": 0.9}}),
            Config(name="ddp-dgc0.01", strategy="ddp", compress="dgc,ratio=0.01", **sgdm),
            Config(name="ddp-dgc0.001", strategy="ddp", compress="dgc,ratio=0.001", **sgdm)]
    # the papers' setting for error feedback and PowerSGD: SGD with momentum, against ddp-sgdm
    out += [Config(name=f"ddp-sgdm-{name}", strategy="ddp", compress=COMPRESSORS[name],
                   **{**sgdm, "optimizer_args": {"momentum": 0.9}}) for name in ("topk0.01-ef", "powersgd-r2")]
    local = {"sync_every": 50, "outer_lr": 0.7}
    for h in (10, 50):
        hl = {**local, "sync_every": h}
        out += [Config(name=f"diloco-h{h}", strategy="diloco", strategy_args=hl, **base),
                Config(name=f"diloco-h{h}-powersgd-r4", strategy="diloco", strategy_args=hl,
                       compress="powersgd,rank=4", **base),
                Config(name=f"diloco-h{h}-int4", strategy="diloco", strategy_args=hl, compress="int4", **base)]
    out.append(Config(name="streaming-h50-int4", strategy="streaming-diloco",
                      strategy_args={**local, "fragments": 2, "overlap": 1, "precision": "int4"}, **base))
    return out


# ---- Byzantine robustness (issue 14, section 4) -------------------------------------------------------------
#: the attacks of the ``byzantine`` presets: (run-name tag, attack spec after ``attack=``)
BYZANTINE_ATTACKS = (("signflip", "signflip"), ("labelflip", "labelflip"), ("gaussian200", "gaussian,sigma=200"),
                     ("alie", "alie"), ("ipm0.1", "ipm,eps=0.1"), ("ipm100", "ipm,eps=100"),
                     ("mimic", "mimic,learn=20"), ("nan", "nan"))


def _robust_aggregators(f: int) -> dict[str, str]:
    """Every registered aggregator (looked up now) as a spec for f Byzantine workers: ``f=`` where the rule
    takes it. Linear rules other than ``mean`` are the mean again and decentralised (per-rank) rules need a
    strategy of their own, so both are left out."""
    import dataclasses

    from .exchange import aggregators

    out = {}
    for name in aggregators.names():
        cls = aggregators.get(name)
        if (cls.linear and name != "mean") or getattr(cls, "per_rank", False):
            continue
        keys = {fl.name for fl in dataclasses.fields(cls.Options)}
        out[name] = f"{name},f={f}" if "f" in keys else name
    return out


def _byzantine(counts: tuple[int, ...], splits: tuple[str, ...], steps: int) -> list[Config]:
    base = dict(task="digits", optimizer="sgd", lr=0.1, optimizer_args={"momentum": 0.9}, steps=steps,
                batch_size=16, workers=16, eval_every=steps // 4, log_every=10, strategy="ddp", step_time=0.01)
    out = []
    for split in splits:
        tag = split.replace("dirichlet:", "dir")
        out.append(Config(name=f"{tag}-clean-mean", data_split=split, **base))
        for f in counts:
            for agg_name, agg in _robust_aggregators(f).items():
                out += [Config(name=f"{tag}-f{f}-{agg_name}-{atag}", data_split=split, aggregate=agg,
                               byzantine=f"count={f},attack={attack}", **base) for atag, attack in BYZANTINE_ATTACKS]
            # each pre-aggregation rule before the rules that fell to an attack without one, where the pair's
            # bound holds (bucketing of s = 2 leaves n/2 vectors: too few for Krum's n > 2f + 2 at f = 3)
            for pre_name, pre in PRE_AGGREGATIONS.items():
                for agg_name, agg in _robust_aggregators(f).items():
                    pair = Config(aggregate=agg, pre_aggregate=pre.format(f=f), **base)
                    if agg_name not in PRE_BEFORE or not _valid(pair):
                        continue
                    out += [pair.replace(name=f"{tag}-f{f}-{pre_name}-{agg_name}-{atag}", data_split=split,
                                         byzantine=f"count={f},attack={attack}")
                            for atag, attack in BYZANTINE_ATTACKS]
    return out


def _valid(cfg: Config) -> bool:
    from .errors import ConfigError

    try:
        cfg.validate()
    except ConfigError:
        return False
    return True


#: aggregators the ``byzantine`` presets also run after each pre-aggregation rule
PRE_BEFORE = ("krum", "cclip", "trimmed-mean")
#: the pre-aggregation rules (run-name tag → --pre-aggregate spec, f filled in): nearest-neighbour mixing
#: (Allouah et al., 2023), bucketing of s = 2 (Karimireddy et al., 2022), adaptive robust clipping
PRE_AGGREGATIONS = {"nnm": "nnm,f={f}", "bucketing": "bucketing,s=2", "arc": "arc,f={f}"}


@registry.add("byzantine", "digits MLP, 16 workers, ddp, 300 steps: every aggregator x every attack at f = 1 and 3, "
              "and NNM, bucketing and ARC before Krum, centered clipping and trimmed mean, iid and dirichlet:0.5 "
              "splits, against the clean mean (498 runs; BENCHMARKS.md; hours on 2 CPU cores)")
def byzantine() -> list[Config]:
    return _byzantine((1, 3), ("iid", "dirichlet:0.5"), 300)


@registry.add("byzantine-quick", "digits MLP, 16 workers, ddp, 100 steps: every aggregator x every attack at f = 3, "
              "and NNM, bucketing and ARC before Krum, centered clipping and trimmed mean, iid split, against the "
              "clean mean (121 runs, ~20 minutes)")
def byzantine_quick() -> list[Config]:
    return _byzantine((3,), ("iid",), 100)


#: the rules of the ``byzantine-charlm`` row: the mean and the two best on ``digits`` (BENCHMARKS.md)
BYZANTINE_CHARLM_RULES = {"mean": ("mean", None), "geomed": ("geomed", None), "nnm-krum": ("krum,f=3", "nnm,f=3")}


@registry.add("byzantine-charlm", "charlm, 16 workers, ddp, AdamW, 200 steps: the mean, the geometric median and "
              "NNM -> Krum under every attack but labelflip (charlm has no classes) at f = 3, iid, against the clean "
              "mean (22 runs)")
def byzantine_charlm() -> list[Config]:
    base = dict(task="charlm", optimizer="adamw", lr=3e-3, steps=200, batch_size=8, workers=16, eval_every=50,
                log_every=10, schedule="cosine", warmup_steps=20, optimizer_args={"weight_decay": 0.01},
                strategy="ddp", step_time=0.05)
    out = [Config(name="charlm-clean-mean", **base)]
    for rname, (agg, pre) in BYZANTINE_CHARLM_RULES.items():
        out += [Config(name=f"charlm-f3-{rname}-{atag}", aggregate=agg, pre_aggregate=pre,
                       byzantine=f"count=3,attack={attack}", **base)
                for atag, attack in BYZANTINE_ATTACKS if atag != "labelflip"]
    return out


# ---- asynchronous and advanced local-update methods (issue 15, benchmarks) ---------------------------------------
#: per-worker compute-time multipliers of the ``async`` preset (4 = four times slower than a speed-1 worker)
ASYNC_SPEEDS = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def _async_runs(sync_steps: int) -> list[Config]:
    """The ``async`` preset at ``sync_steps`` synchronous steps. A synchronous runner step is one step of every
    worker, so it takes the slowest worker's 4 × 0.05 s; an event-clock runner step (async-diloco, A-EDiT) is a
    0.05 s slice of the fastest worker's time: event-clock runs take 4× the steps (and warm-up and eval periods)
    for the same simulated time."""
    from . import strategies

    slow = int(max(ASYNC_SPEEDS) / min(ASYNC_SPEEDS))
    base = dict(task="charlm", optimizer="adamw", lr=3e-3, batch_size=8, workers=len(ASYNC_SPEEDS),
                schedule="cosine", grad_clip=1.0, step_time=0.05, worker_speeds=list(ASYNC_SPEEDS),
                optimizer_args={"weight_decay": 0.01}, network="bandwidth=1G,latency=1ms")
    sync = dict(base, steps=sync_steps, warmup_steps=20, eval_every=sync_steps // 25)
    evt = dict(base, steps=slow * sync_steps, warmup_steps=slow * 20, eval_every=slow * (sync_steps // 25),
               log_every=slow * 10)
    dn = {"sync_every": 50, "server": "dn", "outer_lr": 0.7, "dylu": True, "grace": 0.0}  # as measured first
    out = [
        Config(name="ddp", strategy="ddp", **sync),
        Config(name="diloco-h50", strategy="diloco", strategy_args={"sync_every": 50, "outer_lr": 0.7}, **sync),
        Config(name="async-dn-dylu", strategy="async-diloco", strategy_args=dn, **evt),
        Config(name="async-naive", strategy="async-diloco",
               strategy_args={"sync_every": 50, "server": "nesterov", "outer_lr": 0.1, "dylu": False}, **evt),
        Config(name="gossip-ring-merge", strategy="gossip",
               strategy_args={"topology": "ring", "sync_every": 10, "merge_at": sync_steps}, **sync),
        Config(name="async-dn-dylu-slow", strategy="async-diloco",
               strategy_args={**dn, "slow_prob": 0.1, "slow_factor": 4.0}, **evt),
        # DN takes 4x more outer steps per second than sync diloco here: the same with half the outer lr
        Config(name="async-dn-dylu-lr0.35", strategy="async-diloco", strategy_args={**dn, "outer_lr": 0.35}, **evt),
        # DyLU's floor makes the slowest workers push 0.1 s before the others: a 0.2 s grace joins them to the batch
        Config(name="async-dn-dylu-grace0.2", strategy="async-diloco", strategy_args={**dn, "grace": 0.2}, **evt),
        # the default grace (auto: DyLU's rounding gap, 0.1 s here)
        Config(name="async-dn-dylu-auto", strategy="async-diloco", strategy_args={**dn, "grace": "auto"}, **evt),
        Config(name="async-dn-dylu-slow-grace0.2", strategy="async-diloco",
               strategy_args={**dn, "grace": 0.2, "slow_prob": 0.1, "slow_factor": 4.0}, **evt),
    ]
    if "edit" in strategies.registry.names():  # A-EDiT: syncs every 2.5 s (the fastest worker's 50 steps)
        out.append(Config(name="a-edit", strategy="edit", strategy_args={"sync_time": 2.5, "outer_lr": 0.7}, **evt))
    return out


@registry.add("async", "charlm, 8 workers of speeds 1,1,1,1,2,2,4,4 at 0.05 s per step, 50 s of simulated time "
              "(250 synchronous steps, 1000 event-clock steps): ddp, sync diloco (H=50), async-diloco with Delayed "
              "Nesterov + DyLU (outer lr 0.7 and 0.35, a 0.2 s grace period; random slowdowns with and without "
              "the grace), naive async Nesterov, gossip ring + one merge, A-EDiT when `edit` is registered; time "
              "to a target loss (BENCHMARKS.md; ~60 minutes on 2 free CPU cores)")
def async_() -> list[Config]:
    return _async_runs(250)


def _local4(steps: int = 600) -> dict:
    """charlm, 4 workers, the ``strategies-4`` settings (AdamW 3e-3, cosine, 20 warm-up steps, 1 Gbit/s)."""
    return dict(task="charlm", optimizer="adamw", lr=3e-3, steps=steps, batch_size=8, workers=4, eval_every=50,
                schedule="cosine", warmup_steps=20, grad_clip=1.0, step_time=0.05,
                optimizer_args={"weight_decay": 0.01}, network="bandwidth=1G,latency=1ms")


@registry.add("desloc-bytes", "charlm, 4 workers, 600 steps, same tokens: DES-LOC (K_x = H, K_u = 3H, K_v = 6H) vs "
              "Local Adam (desloc with K_x = K_u = K_v = H) vs DiLoCo at H = 16, DES-LOC and Local Adam at H = 64, "
              "and ddp; loss vs bytes (BENCHMARKS.md; ~20 minutes on 2 free CPU cores)")
def desloc_bytes() -> list[Config]:
    base = _local4()
    out = [Config(name="ddp", strategy="ddp", **base)]
    for h in (16, 64):
        out += [Config(name=f"desloc-h{h}", strategy="desloc", strategy_args={"sync_every": h}, **base),
                Config(name=f"local-adam-h{h}", strategy="desloc",
                       strategy_args={"sync_every": h, "sync_u": h, "sync_v": h}, **base)]
    out.append(Config(name="diloco-h16", strategy="diloco", strategy_args={"sync_every": 16, "outer_lr": 0.7}, **base))
    return out


@registry.add("local-claims", "charlm, 4 workers, 600 steps, same tokens: the papers' claims of issue 15 not "
              "covered by async/desloc-bytes/qsr — MT-DAO vs Local Adam at K = 32, EDiT vs DiLoCo at H = 50, "
              "scaled Local SGD (shared adam/rmsprop preconditioner) vs plain Local SGD at H = 16, gossip + a "
              "single merge vs no gossip + merge vs Local SGD vs ddp on a contiguous split (BENCHMARKS.md; 16 runs)")
def local_claims() -> list[Config]:
    base = _local4()
    k32 = {"sync_every": 32, "sync_u": 32, "sync_v": 32}
    sgd = {**base, "optimizer": "sgd", "optimizer_args": {"weight_decay": 0.01}}
    out = [Config(name="ddp", strategy="ddp", **base),
           Config(name="local-adam-k32", strategy="desloc", strategy_args=k32, **base),
           Config(name="mtdao-k32", strategy="desloc", strategy_args=k32, **{**base, "optimizer": "mtdao"}),
           Config(name="diloco-h50", strategy="diloco", strategy_args={"sync_every": 50, "outer_lr": 0.7}, **base),
           Config(name="edit-h50", strategy="edit", strategy_args={"sync_every": 50, "outer_lr": 0.7}, **base)]
    out += [Config(name=f"localsgd-sgd-h16-lr{lr:g}", strategy="localsgd", strategy_args={"sync_every": 16},
                   **{**sgd, "lr": lr}) for lr in (0.3, 1.0)]
    out += [Config(name=f"scaled-local-{pre}-h16", strategy="scaled-local",
                   strategy_args={"sync_every": 16, "preconditioner": pre}, **sgd) for pre in ("adam", "rmsprop")]
    # --grad-clip clips the scaled gradient (up to 1/alpha_min = 100x the raw one): without it, an lr sweep
    out += [Config(name=f"scaled-local-adam-h16-noclip-lr{lr:g}", strategy="scaled-local",
                   strategy_args={"sync_every": 16, "preconditioner": "adam"}, **{**sgd, "lr": lr, "grad_clip": 0.0})
            for lr in (1e-3, 3e-3, 1e-2)]
    contig = {**base, "data_split": "contiguous"}
    out += [Config(name="ddp-contig", strategy="ddp", **contig),
            Config(name="localsgd-h20-contig", strategy="localsgd", strategy_args={"sync_every": 20}, **contig),
            Config(name="gossip-onepeer-merge-contig", strategy="gossip",
                   strategy_args={"topology": "one-peer-exponential", "sync_every": 20, "merge_at": 600}, **contig),
            Config(name="nocomm-merge-contig", strategy="gossip",
                   strategy_args={"topology": "none", "merge_at": 600}, **contig)]
    return out


@registry.add("qsr", "charlm, 4 workers, 600 steps, cosine to 0: localsgd with the Quadratic Synchronization Rule "
              "(H_base 5, alpha 0.006: 59 rounds; H_base 10, alpha 0.01: 25 rounds) vs fixed H with the same number "
              "of rounds (10, 24) and fixed H_base (BENCHMARKS.md; ~15 minutes on 2 CPU cores)")
def qsr() -> list[Config]:
    base = _local4()
    fixed = {h: Config(name=f"localsgd-h{h}", strategy="localsgd", strategy_args={"sync_every": h}, **base)
             for h in (5, 10, 24)}
    rule = {(h, a): Config(name=f"qsr-h{h}-a{a:g}", strategy="localsgd",
                           strategy_args={"sync_every": h, "sync_rule": f"qsr,alpha={a:g}"}, **base)
            for h, a in ((5, 0.006), (10, 0.01))}
    return [rule[5, 0.006], fixed[10], fixed[5], rule[10, 0.01], fixed[24]]


# ---- the loss–bytes–time headline (issue 17, item 2) ----------------------------------------------------------

def _headline(workers: int, steps: int, seed: int) -> dict:
    """charlm at the ``strategies-4`` settings for ``steps`` steps (same tokens per worker step), on the
    cross-region network (1 Gbit/s, 30 ms) with the stated 50 ms step time."""
    return dict(_local4(steps), workers=workers, seed=seed, eval_every=steps // 12, network="cross-region")


def _streaming(h: int, precision: str) -> dict:
    return {"sync_every": h, "outer_lr": 0.7, "fragments": 2, "overlap": 1, "mix_alpha": 0.5, "precision": precision}


@registry.add("headline", "charlm, 3000 steps at 4 workers (and 1500 at 8: the same tokens), cross-region "
              "network: ddp against streaming-diloco int4 at H = 100 and 200 (753x and 1506x fewer bytes) and "
              "diloco int4 at H = 200, two seeds for ddp and the 1506x run at 4 workers and for both 8-worker runs "
              "(BENCHMARKS.md; ~3 hours on one CPU core)")
def headline() -> list[Config]:
    out = []
    for workers, steps, seeds in ((4, 3000, (0, 1)), (8, 1500, (0, 1))):
        for seed in seeds:
            base = _headline(workers, steps, seed)
            tag = f"n{workers}-s{seed}"
            out.append(Config(name=f"{tag}-ddp", strategy="ddp", **base))
            hs = (200, 100) if seed == 0 and workers == 4 else (200,) if workers == 4 else (100,)
            out += [Config(name=f"{tag}-streaming-h{h}-int4", strategy="streaming-diloco",
                           strategy_args=_streaming(h, "int4"), **base) for h in hs]
            if seed == 0 and workers == 4:
                out.append(Config(name=f"{tag}-diloco-h200-int4", strategy="diloco",
                                  strategy_args={"sync_every": 200, "outer_lr": 0.7}, compress="int4", **base))
    # ddp and the two streaming runs of seed 0, then seed 1, then 8 workers, then the diloco comparison
    order = ("n4-s0-ddp", "n4-s0-streaming-h200-int4", "n4-s0-streaming-h100-int4", "n4-s1-ddp",
             "n4-s1-streaming-h200-int4", "n8-s0-ddp", "n8-s0-streaming-h100-int4", "n4-s0-diloco-h200-int4",
             "n8-s1-ddp", "n8-s1-streaming-h100-int4")
    return sorted(out, key=lambda c: order.index(c.name))


@registry.add("headline-sizes", "charlm, 4 workers, 600 steps, cross-region: ddp against streaming-diloco int4 at "
              "H = 50 (376x fewer bytes) at model widths 32, 64 and 128 (the gap against model size; BENCHMARKS.md; "
              "~20 minutes on one CPU core)")
def headline_sizes() -> list[Config]:
    out = []
    for width in (32, 64, 128):
        base = {**_headline(4, 600, 0), "task_args": {"d_model": width}}
        out += [Config(name=f"d{width}-ddp", strategy="ddp", **base),
                Config(name=f"d{width}-streaming-h50-int4", strategy="streaming-diloco",
                       strategy_args=_streaming(50, "int4"), **base)]
    return out


@registry.add("headline-steps", "charlm, 4 workers, cross-region: ddp against streaming-diloco int4 at H = 100 "
              "(753x fewer bytes) at 600 and 1500 steps (with the headline's 3000: the gap against steps; "
              "BENCHMARKS.md; ~20 minutes on one CPU core)")
def headline_steps() -> list[Config]:
    out = []
    for steps in (600, 1500):
        base = _headline(4, steps, 0)
        out += [Config(name=f"t{steps}-ddp", strategy="ddp", **base),
                Config(name=f"t{steps}-streaming-h100-int4", strategy="streaming-diloco",
                       strategy_args=_streaming(100, "int4"), **base)]
    return out
