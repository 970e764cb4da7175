"""Multi-head attention: ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls): self- and
cross-attention, packed (``in_proj_weight``) or separate (``kdim``/``vdim``) input projections, masks; not
``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v``.

The rule runs the attention itself (scaled dot products, softmax, masks, dropout on the attention weights as
torch does) around its linear maps, each recorded as a :class:`~.linear.Linear` use over its sequence's
positions: for self-attention with the packed projection one use of ``x W_inᵀ + b_in``, else one per input
(:class:`Rows`: the rows of the packed weight and bias it reads, the uses adding into one per-example
gradient of the packed weight), and the output projection. The attention itself has no parameters, so these
are all the per-example gradients there are."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..grads import ParamGrads
from ..planning import Planner, Workspace
from ..recorder import Recorder
from ..rule import Rule, Unsupported, bind, register
from .linear import Linear

_NAMES = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
          "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
          "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
          "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_DEFAULTS = (True, None, True, None, False, None, None, None, None, None, True, False)


def _linear(rec: Recorder, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    weight, bias = rec.param(w, "a projection weight"), rec.param(b, "a projection bias")
    out = F.linear(x, w, b)
    if weight is None and bias is None:
        return out
    use = Linear(weight=weight, bias=bias, layout="W")
    use.x = use.keep(x)
    return rec.record(use, out)


@dataclass
class Rows(Linear):
    """A :class:`~.linear.Linear` use that reads rows ``[start, stop)`` of a packed weight (``weight_rows``)
    and of a packed bias of ``bias_size`` (``bias_rows``); ``None``: the whole parameter. A packed weight is read
    by several uses, so its per-example gradients are one (B, *shape) buffer each use adds its rows into."""

    weight_rows: tuple | None = None
    bias_rows: tuple | None = None
    bias_size: int = 0

    def tied_weight(self) -> str | None:
        return self.weight

    def plan(self, planner: Planner) -> str:
        if self.weight is not None and self.weight_rows is not None:
            raise Unsupported("rows of a packed projection weight read by one use only")
        return super().plan(planner)

    def assemble(self, plan: str, grads: dict[str, ParamGrads], b: int, workspace: Workspace) -> None:
        g = self.out_grads(b)
        if self.bias is not None:
            bias = g.sum(1)
            if self.bias_rows is not None:
                full = g.new_zeros(b, self.bias_size)
                full[:, self.bias_rows[0]:self.bias_rows[1]] = bias
                bias = full
            grads[self.bias].add_dense(bias)
        if self.weight is None:
            return
        if self.weight_rows is None:
            bias, self.bias = self.bias, None  # done above
            super().assemble(plan, grads, b, workspace)
            self.bias = bias
            return
        p = grads[self.weight]
        start, stop = self.weight_rows
        p.dense.view(b, *p.param.shape)[:, start:stop].baddbmm_(g.transpose(1, 2), self.activations(b))


def _rows(rec: Recorder, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: tuple | None,
          bias_rows: tuple | None) -> torch.Tensor:
    """``x W[rows]ᵀ + b[bias_rows]`` (``None``: all rows), recorded as a :class:`Rows` use."""
    weight, bias = rec.param(w, "a projection weight"), rec.param(b, "a projection bias")
    ws = w if rows is None else w[rows[0]:rows[1]]
    bs = None if b is None else b if bias_rows is None else b[bias_rows[0]:bias_rows[1]]
    out = F.linear(x, ws, bs)
    if weight is None and bias is None:
        return out
    use = Rows(weight=weight, bias=bias, layout="W", weight_rows=None if weight is None else rows,
               bias_rows=bias_rows, bias_size=0 if b is None else b.shape[0])
    use.x = use.keep(x)
    return rec.record(use, out)


def _mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A boolean (True: masked out) or additive mask as an additive one of ``like``'s dtype."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(mask, float("-inf"))
    return mask.to(like.dtype)


@register(F.multi_head_attention_forward)
class MultiHeadAttention(Rule):
    """Records the two projections of a multi-head attention (see the module docstring); the uses are
    :class:`~.linear.Linear` ones."""

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        (query, key, value, embed_dim, heads, w_in, b_in, bias_k, bias_v, add_zero_attn, dropout_p, w_out, b_out,
         training, key_padding_mask, need_weights, attn_mask, separate, w_q, w_k, w_v, static_k, static_v,
         average, _) = bind(args, kwargs, _NAMES, _DEFAULTS)
        if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
            raise Unsupported("bias_k, bias_v, add_zero_attn, static_k and static_v are not supported")
        if query.dim() != 3:
            raise Unsupported("unbatched input")
        # (B, T, ·): the module passes the sequence first
        x = rec.input(query.transpose(0, 1), 3)
        xk = x if key is query else rec.input(key.transpose(0, 1), 3)
        xv = xk if value is key else x if value is query else rec.input(value.transpose(0, 1), 3)
        b, t, e = x.shape
        s = xk.shape[1]
        if e != embed_dim or e % heads:
            raise Unsupported("an embedding size that does not match the heads")
        d = e // heads
        if query is key is value and not separate:
            q, k, v = _linear(rec, x, w_in, b_in).chunk(3, -1)
        else:
            thirds = [(0, e), (e, 2 * e), (2 * e, 3 * e)]
            if separate:
                (q, k, v) = (_rows(rec, xx, w, b_in, None, None if b_in is None else r)
                             for xx, w, r in zip((x, xk, xv), (w_q, w_k, w_v), thirds, strict=True))
            else:
                q = _rows(rec, x, w_in, b_in, thirds[0], thirds[0])
                if value is key:
                    k, v = _rows(rec, xk, w_in, b_in, (e, 3 * e), (e, 3 * e)).chunk(2, -1)
                else:
                    k = _rows(rec, xk, w_in, b_in, thirds[1], thirds[1])
                    v = _rows(rec, xv, w_in, b_in, thirds[2], thirds[2])
        q = q.reshape(b, t, heads, d).transpose(1, 2)
        k, v = (y.reshape(b, s, heads, d).transpose(1, 2) for y in (k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, S)
        m = _mask(attn_mask, scores)
        if m is not None:
            scores = scores + (m.view(b, heads, t, s) if m.dim() == 3 else m)
        m = _mask(key_padding_mask, scores)
        if m is not None:
            scores = scores + m.view(b, 1, 1, s)
        weights = torch.softmax(scores, -1)
        if dropout_p > 0 and training:
            weights = F.dropout(weights, dropout_p, training=True)
        out = _linear(rec, (weights @ v).transpose(1, 2).reshape(b, t, e), w_out, b_out)
        if need_weights:
            weights = weights.mean(1) if average else weights
        return out.transpose(0, 1), weights if need_weights else None
