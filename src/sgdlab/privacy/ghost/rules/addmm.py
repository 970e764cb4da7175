"""``torch.addmm(bias, x, W)``: Hugging Face's ``Conv1D`` (GPT-2's linears), which flattens the batch and the
positions into the rows of ``x`` (``x.view(-1, d_in)``)."""

from __future__ import annotations

from typing import Any

import torch

from ..recorder import Recorder
from ..rule import Unsupported, bind, register
from .linear import Linear
from .views import Transposed

_T = torch.Tensor


@register(torch.addmm, _T.addmm)
class AddMM(Linear):
    """``out = bias + x @ P`` (``layout`` "WT", or "W" for ``x @ P.t()``) with ``x`` of ``B·T`` rows: the
    rows are read as ``T`` consecutive positions of each example, as ``x.view(-1, d)`` of a batch-first
    (B, T, d) tensor gives them (the engine's check against ``torch.func`` catches another layout). The use is
    :class:`~.linear.Linear`'s, recorded on the output viewed as (B, T, d_out)."""

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        bias, x, p, beta, alpha = bind(args, kwargs, ("input", "mat1", "mat2", "beta", "alpha"), (1, 1))
        if beta != 1 or alpha != 1:
            raise Unsupported("beta or alpha other than 1")
        if rec.info(x) is not None:
            raise Unsupported("a parameter on the left of a matrix product")
        info = rec.info(p)
        if info is None:
            weight, layout = None, "WT"
        elif info.chain == ():
            weight, layout = info.name, "WT"
        elif len(info.chain) == 1 and isinstance(info.chain[0], Transposed):
            weight, layout = info.name, "W"
        else:
            raise Unsupported("a view of a parameter other than its transpose")
        bias_name = rec.param(bias, "the bias")
        if bias_name is not None and bias.dim() != 1:
            raise Unsupported("a bias that is not a vector")
        b = rec.batch
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] % b:
            raise Unsupported(f"the input's rows are not a multiple of the batch ({b})")
        use = cls(weight=weight, bias=bias_name, layout=layout)
        use.x = use.keep(x)
        out = func(*args, **kwargs)
        rows = out.view(b, x.shape[0] // b, out.shape[-1])
        rec.record(use, rows)
        return rows.view(out.shape)
