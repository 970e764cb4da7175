"""Embeddings looked up with an index broadcast over the batch (Hugging Face GPT-2's positions:
``wpe(arange(T).unsqueeze(0))``, a (1, T) index), and ``Tensor.to`` that changes nothing.

A (1, T) lookup gives a (1, T, d) table that the model then adds to a batch; the gradient at the lookup is
already summed over the examples, so the lookup is followed as a view of the parameter (:class:`Gathered`)
and the operation that broadcasts it over the batch (``x + P``, :mod:`.elementwise`) records the use: the
per-example gradient with respect to the looked-up rows is ``g_i``, scattered back to the table's rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..planning import Workspace
from ..recorder import Recorder
from ..rule import Rule, Unsupported, bind, register
from .embedding import Embedding
from .views import Step

_T = torch.Tensor


@dataclass
class Gathered(Step):
    """``W[idx]`` with ``idx`` an index tensor of the view's leading shape (``padding_idx`` rows get none)."""

    idx: torch.Tensor
    shape: tuple  # the table's (V, d)
    padding_idx: int | None = None

    def workspace(self, b: int) -> int:
        return b * math.prod(self.shape)

    def back(self, g: torch.Tensor, workspace: Workspace) -> torch.Tensor:
        b, (v, d) = g.shape[0], self.shape
        idx = self.idx.reshape(-1)
        g = g.reshape(b, idx.numel(), d)
        if self.padding_idx is not None:
            g = g * (idx != self.padding_idx).to(g.dtype).view(1, -1, 1)
        full = workspace.take((b, v, d), g).zero_()
        rows = (torch.arange(b, device=idx.device).unsqueeze(1) * v + idx).reshape(-1)
        full.view(b * v, d).index_add_(0, rows, g.reshape(-1, d))
        return full


@register(F.embedding)
class BroadcastEmbedding(Embedding):
    """:class:`~.embedding.Embedding` for a batch of indices; an index that is not a batch (its first
    dimension 1, or none) makes the lookup a :class:`Gathered` view of the table."""

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        idx = args[0] if args else kwargs.get("input")
        if rec.batched(idx, 1) or not isinstance(idx, torch.Tensor) or rec.info(idx) is not None:
            return super().record(rec, func, args, kwargs)
        _, w, padding_idx, max_norm, _, scale_grad_by_freq, sparse = bind(
            args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                           "sparse"), (None, None, 2.0, False, False))
        if max_norm is not None or scale_grad_by_freq or sparse:
            raise Unsupported("max_norm, scale_grad_by_freq and sparse are not supported")
        if idx.dim() >= 1 and idx.shape[0] != 1:
            raise Unsupported(f"the indices are neither a batch of {rec.batch} nor broadcast over it")
        info = rec.info(w)
        if info is None or info.chain:
            raise Unsupported("the table is a view of a parameter")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += w.shape[0]
        out = func(*args, **kwargs)
        return rec.view(out, info, Gathered(idx.detach(), tuple(w.shape), padding_idx))


@register(_T.to)
class To(Rule):
    """``P.to(...)`` that returns ``P`` itself (same dtype and device) is followed; a conversion is not."""

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        if out is not args[0]:
            raise Unsupported("a parameter converted to another dtype or device")
        return out
