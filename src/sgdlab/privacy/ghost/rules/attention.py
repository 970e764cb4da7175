"""Multi-head attention: ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls), for
self-attention with the packed input projection (``query is key is value``, ``in_proj_weight``); no
``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/``static_v``.

The rule runs the attention itself (scaled dot products, softmax, masks, dropout on the attention weights as
torch does) around two linear maps, each recorded as a :class:`~.linear.Linear` use over the sequence's
``T`` positions: the packed ``q, k, v`` projection ``x W_inᵀ + b_in`` and the output projection. The attention
itself has no parameters, so these are all the per-example gradients there are."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

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
         training, key_padding_mask, need_weights, attn_mask, separate, _, _, _, static_k, static_v,
         average, _) = bind(args, kwargs, _NAMES, _DEFAULTS)
        if not (query is key is value):
            raise Unsupported("query, key and value are not the same tensor (only self-attention is followed)")
        if separate or w_in is None:
            raise Unsupported("separate q, k, v projection weights")
        if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
            raise Unsupported("bias_k, bias_v, add_zero_attn, static_k and static_v are not supported")
        if query.dim() != 3:
            raise Unsupported("unbatched input")
        x = rec.input(query.transpose(0, 1), 3)  # (B, T, E): the module passes the sequence first
        b, t, e = x.shape
        if e != embed_dim or e % heads:
            raise Unsupported("an embedding size that does not match the heads")
        d = e // heads
        q, k, v = (y.reshape(b, t, heads, d).transpose(1, 2) for y in _linear(rec, x, w_in, b_in).chunk(3, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
        m = _mask(attn_mask, scores)
        if m is not None:
            scores = scores + (m.view(b, heads, t, t) if m.dim() == 3 else m)
        m = _mask(key_padding_mask, scores)
        if m is not None:
            scores = scores + m.view(b, 1, 1, t)
        weights = torch.softmax(scores, -1)
        if dropout_p > 0 and training:
            weights = F.dropout(weights, dropout_p, training=True)
        out = _linear(rec, (weights @ v).transpose(1, 2).reshape(b, t, e), w_out, b_out)
        if need_weights:
            weights = weights.mean(1) if average else weights
        return out.transpose(0, 1), weights if need_weights else None
