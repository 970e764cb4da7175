"""Named sets of runs for ``sgdlab compare --preset NAME``."""

from __future__ import annotations

from collections.abc import Callable

from .config import Config
from .registry import Registry

registry: Registry[Callable[[], list[Config]]] = Registry("preset")


@registry.add("demo", "charlm: SGD, SGD with momentum and AdamW, same token budget (~2 minutes on 2 CPU cores)")
def demo() -> list[Config]:
    base = dict(task="charlm", steps=300, batch_size=32, eval_every=50, schedule="cosine", warmup_steps=20,
                grad_clip=1.0)
    return [
        Config(name="sgd", optimizer="sgd", lr=1.0, **base),
        Config(name="sgd-momentum", optimizer="sgd", lr=0.1, optimizer_args={"momentum": 0.9}, **base),
        Config(name="adamw", optimizer="adamw", lr=3e-3, optimizer_args={"weight_decay": 0.01}, **base),
    ]
