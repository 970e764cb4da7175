"""Normalisation layers' affine parameters: ``F.layer_norm`` and ``F.group_norm``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..grads import ParamGrads
from ..planning import Workspace
from ..recorder import Recorder
from ..rule import Rule, Unsupported, bind, register


@dataclass
class Norm(Rule):
    """``out = x̂ ⊙ w + bias`` with ``x̂`` the normalised input: per-example gradients ``Σ g_i ⊙ x̂_i`` and
    ``Σ g_i``, summed over the dimensions the affine parameters are broadcast along, materialised (they are
    the size of the parameters); ``x̂`` is recomputed by the norm without its affine part."""

    weight: str | None = None
    bias: str | None = None
    x: torch.Tensor | None = None
    eps: float = 1e-5

    def names(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]

    def dims(self) -> list[int]:
        """The dimensions of ``x`` (after the batch) the affine parameters are broadcast along."""
        raise NotImplementedError

    def normalised(self) -> torch.Tensor:
        raise NotImplementedError

    def assemble(self, plan: str, grads: dict[str, ParamGrads], b: int, workspace: Workspace) -> None:
        g, dims = self.g, self.dims()
        if self.weight is not None:
            xhat = self.normalised()
            xhat.mul_(g)
            grads[self.weight].add_dense(xhat.sum(dims) if dims else xhat)
        if self.bias is not None:
            grads[self.bias].add_dense(g.sum(dims) if dims else g)


@register(F.layer_norm)
@dataclass
class LayerNorm(Norm):
    shape: tuple = ()

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        x, shape, w, b, eps = bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                                   (None, None, 1e-5))
        use = cls(shape=(shape,) if isinstance(shape, int) else tuple(shape), eps=eps)
        use.weight, use.bias = rec.param(w, "the weight"), rec.param(b, "the bias")
        use.x = use.keep(rec.input(x))
        if use.x.dim() <= len(use.shape):
            raise Unsupported("the normalised shape includes the batch dimension")
        return rec.record(use, func(*args, **kwargs))

    def dims(self) -> list[int]:
        return list(range(1, self.x.dim() - len(self.shape)))

    def normalised(self) -> torch.Tensor:
        return F.layer_norm(self.x, self.shape, eps=self.eps)


@register(F.group_norm)
@dataclass
class GroupNorm(Norm):
    groups: int = 1

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        x, groups, w, b, eps = bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"),
                                    (None, None, 1e-5))
        use = cls(groups=groups, eps=eps)
        use.weight, use.bias = rec.param(w, "the weight"), rec.param(b, "the bias")
        use.x = use.keep(rec.input(x))
        return rec.record(use, func(*args, **kwargs))

    def dims(self) -> list[int]:
        return list(range(2, self.x.dim()))

    def normalised(self) -> torch.Tensor:
        return F.group_norm(self.x, self.groups, eps=self.eps)
