"""Random layers (dropout in train mode) in the engine's self-check of the fast path.

The check re-runs a forward that the fast path has already run, and compares. With random layers the two
must draw the same: :class:`Generators` saves the state of torch's default generators (the CPU's and each
CUDA device's the parameters live on) before the fast path's forward, and :meth:`Generators.replay` runs the
reference from that state, then puts the generators back where the fast path left them, so the check draws
nothing from the training's stream. A layer that draws from a ``torch.Generator`` of its own is not replayed.

The per-example comparison against ``torch.func`` runs each example on its own, where no replay can give it
the mask it had inside the batch; there :class:`NoDropout` switches dropout off for both sides (the layers'
other train-mode behaviour stays). Randomness it does not know (``torch.rand`` in a model's code) is left
alone: ``torch.func`` then refuses it and the engine skips that comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# dropout(input, p, training/train, inplace): the identity when off (alpha dropout too)
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout, torch.dropout_, torch.alpha_dropout, torch.alpha_dropout_, torch.feature_dropout,
             torch.feature_dropout_, torch.feature_alpha_dropout, torch.feature_alpha_dropout_}


class Generators:
    """The default generators a forward on ``devices`` (the parameters' devices) draws from."""

    def __init__(self, devices: set[torch.device] | list[torch.device]):
        self.cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                            for d in devices if d.type == "cuda"})

    def state(self) -> list[torch.Tensor]:
        return [torch.get_rng_state(), *(torch.cuda.get_rng_state(i) for i in self.cuda)]

    def _set(self, state: list[torch.Tensor]) -> None:
        torch.set_rng_state(state[0])
        for i, s in zip(self.cuda, state[1:], strict=True):
            torch.cuda.set_rng_state(s, i)

    @staticmethod
    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    @contextlib.contextmanager
    def replay(self, state: list[torch.Tensor] | None = None) -> Iterator[None]:
        """Run the body from ``state`` (None: from the current state); afterwards the generators are where
        they were before it."""
        with torch.random.fork_rng(devices=self.cuda):
            if state is not None:
                self._set(state)
            yield


class NoDropout(TorchFunctionMode):
    """Dropout off while active: the ``F.dropout`` family (and ``torch.dropout`` and friends) return their
    input, ``F.rrelu`` uses its fixed slope, ``F.scaled_dot_product_attention`` runs with ``dropout_p=0``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        if func is F.rrelu or func is F.rrelu_:  # rrelu(input, lower, upper, training, ...)
            args, kwargs = _set(args, kwargs, 3, "training", False)
        elif func is F.scaled_dot_product_attention:  # (query, key, value, attn_mask, dropout_p, ...)
            args, kwargs = _set(args, kwargs, 4, "dropout_p", 0.0)
        return func(*args, **kwargs)


def _set(args: tuple, kwargs: dict, index: int, name: str, value: object) -> tuple[tuple, dict]:
    """The call's arguments with argument ``name`` (at position ``index``) set to ``value``."""
    if len(args) > index:
        return (*args[:index], value, *args[index + 1:]), kwargs
    return args, {**kwargs, name: value}
