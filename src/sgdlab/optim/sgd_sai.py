"""SGD-SaI: SGD with momentum and learning-rate Scaling at Initialization.

Reference: Minghao Xu, Lichuan Xiang, Xu Cai, Hongkai Wen, "No More Adam: Learning Rate Scaling at
Initialization is All You Need", 2024, arXiv:2412.11768 (Algorithm 1).

Every parameter tensor is one block ``i``. At the first step (``t = 1``) each block's gradient
signal-to-noise ratio is computed once from its first gradient and normalised by the largest one::

    G_snr^i   = ||g_1^i||_2 / (sqrt(Var(g_1^i)) + eps)          (Alg. 1, line 12)
    Gt_snr^i  = G_snr^i / max_k G_snr^k                          (line 14)

after which the update is plain SGD with momentum (an EMA) and decoupled weight decay::

    m_1 = g_1;   m_t = mu * m_{t-1} + (1 - mu) * g_t   (t > 1)   (lines 8, 10)
    theta <- theta - lr * lambda * theta                          (line 17)
    theta <- theta - lr * Gt_snr^i * m_t                          (line 19)

``||.||_2`` is the Frobenius norm over all entries of the block and ``Var`` the sample variance of those
entries (Bessel-corrected, ``torch.std`` as in the authors' code). The paper applies the rule to every
block alike: biases, norm gains and embeddings are blocks like any matrix, and a 1-D tensor uses the
std of its entries. A block with a single entry has no variance; it is taken as 0 (authors' code),
so its g-SNR is ``|g| / eps``. The max runs over all blocks of all param groups that have a gradient
at the first step. A block whose gradient is still ``None`` then gets its g-SNR at its own first
gradient, normalised by the max over the blocks initialised in that same step. If every block's
first gradient is zero the scales are 0 (no NaN). The scale never changes afterwards and is kept as
``state["gsnr"]`` (a 0-dim tensor) next to ``state["momentum_buffer"]``.

Defaults: lr=1e-2, momentum=0.9, weight_decay=1e-2, eps=1e-8, the defaults of the authors' reference
implementation (github.com/AnonymousAlethiometer/SGD_SaI); the paper tunes lr and weight decay per task.

Differences from ``pytorch_optimizer.SGDSaI`` (4.1), which this class does NOT copy: (a) it does not
divide by ``max_k G_snr^k`` (line 14); (b) it starts the momentum buffer at zero, so ``m_1 = (1-mu) g_1``
instead of ``g_1`` (line 10); (c) for tensors with ``ndim <= 1`` or a leading dimension of 1, and
whenever the std is 0, it uses ``G_snr = ||g||`` (no division). With ``momentum=0``, only >=2-D
blocks, ``lr_po = lr / max_k G_snr^k`` and ``weight_decay_po = weight_decay * max_k G_snr^k`` the two
coincide (tested).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import check_range
from ._base import ElementwiseOptimizer, defaults_from
from ._compiled import Kernel, compiled_mode

__all__ = ["SGDSaI"]


def _raw_gsnr(grad: torch.Tensor, eps: float) -> torch.Tensor:
    """``||g||_2 / (std(g) + eps)`` for one block (0-dim tensor, at least float32 precision)."""
    g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
    sigma = g.std() if g.numel() > 1 else torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.linalg.vector_norm(g) / (sigma + eps)


def _sgd_sai_kernel(p, g, m, scale, keep, lr, decay):
    m.mul_(keep).add_(g * (1.0 - keep))
    p.copy_(p * decay - lr * (m * scale))


class SGDSaI(ElementwiseOptimizer):
    """SGD-SaI (Xu et al., 2024, arXiv:2412.11768): SGDM with a per-tensor lr scale fixed at step 1.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate ``eta`` (default 1e-2).
        momentum: EMA coefficient ``mu`` in [0, 1) (default 0.9).
        weight_decay: decoupled weight decay ``lambda`` >= 0, applied as ``theta *= 1 - lr * lambda``
            (not scaled by the g-SNR; default 1e-2).
        eps: ``epsilon`` > 0 added to the gradient std (default 1e-8).
        foreach, compiled: code path, as for every elementwise optimizer
            (:class:`~sgdlab.optim._base.ElementwiseOptimizer`).
        maximize: maximise the objective (the gradient is negated, Alg. 1 lines 3-4).

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGDSaI(model.parameters(), lr=1e-2)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
    """

    state_names = ("momentum_buffer", "gsnr")  # set by _initialize at a block's first step
    counted = False
    kernel = Kernel(_sgd_sai_kernel, "SGDSaI")

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.9,
                 weight_decay: float = 1e-2, eps: float = 1e-8, *, foreach: bool | None = None,
                 compiled: bool | str | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_range("eps", group["eps"], low=0.0, low_open=True)

    @torch.no_grad()
    def _initialize(self, new: list[tuple[dict[str, Any], torch.Tensor]]) -> None:
        """Alg. 1 lines 10-14 for the blocks seen for the first time: m = g, fixed normalised g-SNR."""
        raw = [_raw_gsnr(p.grad, g["eps"]) for g, p in new]
        dev = raw[0].device
        stacked = torch.stack([r.to(device=dev, dtype=torch.float64) for r in raw])
        top = stacked.max()
        scales = torch.where(top > 0, stacked / top, torch.zeros_like(stacked))
        for i, (group, p) in enumerate(new):
            grad = -p.grad if group["maximize"] else p.grad
            state = self.state[p]
            state["momentum_buffer"] = grad.detach().clone(memory_format=torch.preserve_format)
            state["gsnr"] = scales[i].to(device=p.device, dtype=p.dtype)

    def _prepare(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
        new = [(g, p) for g, ps in groups for p in ps if "gsnr" not in self.state[p]]
        if new:
            self._initialize(new)
        self._fresh = {id(p) for _, p in new}  # their first step: m = g already (line 10)

    def _mode(self, group: dict[str, Any], params: list, grads: list, columns: list[list]) -> str | None:
        return compiled_mode(group["compiled"], [*params, *grads])  # judged on the params and grads alone

    def _update(self, group, t, p, g, m, scale, ops) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        # line 8 on the blocks past their first step; on the first step line 10 (m = g) was done in _initialize
        if ops.batched:
            old = [i for i, x in enumerate(p) if id(x) not in self._fresh]
            if old:
                old_m = [m[i] for i in old]
                ops.mul_(old_m, mu)
                ops.add_(old_m, [g[i] for i in old], alpha=1.0 - mu)
        elif id(p) not in self._fresh:
            ops.mul_(m, mu)
            ops.add_(m, g, alpha=1.0 - mu)
        if wd != 0:
            ops.mul_(p, 1.0 - lr * wd)  # line 17
        ops.add_(p, ops.mul(m, scale), alpha=-lr)  # line 19

    def _compiled(self, mode, group, params, grads, states, columns) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        # m <- keep m + (1 - keep) g: keep = momentum (line 8), or 1 on the first step (m = g already, line 10)
        coefs = [[1.0 if id(p) in self._fresh else mu, lr, 1.0 - lr * wd] for p in params]
        self.kernel.run(mode, list(zip(params, grads, *columns, strict=True)), coefs)
