"""Named sets of runs for ``sgdlab compare --preset NAME``."""

from __future__ import annotations

from collections.abc import Callable

from .config import Config
from .registry import Registry

registry: Registry[Callable[[], list[Config]]] = Registry("preset")


@registry.add("demo", "charlm, 4 simulated workers, same token budget: ddp, localsgd, diloco and "
              "streaming-diloco (int4) on a 1 Gbit/s network (~3 minutes on 2 CPU cores)")
def demo() -> list[Config]:
    base = dict(task="charlm", optimizer="adamw", lr=3e-3, steps=200, batch_size=8, workers=4, eval_every=40,
                schedule="cosine", warmup_steps=20, grad_clip=1.0, optimizer_args={"weight_decay": 0.01},
                network="bandwidth=1G,latency=1ms")
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
