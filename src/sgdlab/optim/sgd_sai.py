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

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ..errors import check_range
from ._compiled import Kernel, check_compiled, compiled_mode

__all__ = ["SGDSaI"]


def _raw_gsnr(grad: torch.Tensor, eps: float) -> torch.Tensor:
    """``||g||_2 / (std(g) + eps)`` for one block (0-dim tensor, at least float32 precision)."""
    g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
    sigma = g.std() if g.numel() > 1 else torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.linalg.vector_norm(g) / (sigma + eps)


class SGDSaI(torch.optim.Optimizer):
    """SGD-SaI (Xu et al., 2024, arXiv:2412.11768): SGDM with a per-tensor lr scale fixed at step 1.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate ``eta`` (default 1e-2).
        momentum: EMA coefficient ``mu`` in [0, 1) (default 0.9).
        weight_decay: decoupled weight decay ``lambda`` >= 0, applied as ``theta *= 1 - lr * lambda``
            (not scaled by the g-SNR; default 1e-2).
        eps: ``epsilon`` > 0 added to the gradient std (default 1e-8).
        foreach: multi-tensor path; ``None`` picks it when all params of a group share a device type.
        compiled: use the ``torch.compile``d kernel (one fused loop per tensor); None picks it for groups of
            at least 4M elements (:mod:`sgdlab.optim._compiled`), else ``foreach`` decides.
        maximize: maximise the objective (the gradient is negated, Alg. 1 lines 3-4).

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGDSaI(model.parameters(), lr=1e-2)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.9,
                 weight_decay: float = 1e-2, eps: float = 1e-8, *, foreach: bool | None = None,
                 compiled: bool | None = None, maximize: bool = False):
        check_range("lr", lr, low=0.0)
        check_range("momentum", momentum, low=0.0, high=1.0, high_open=True)
        check_range("weight_decay", weight_decay, low=0.0)
        check_range("eps", eps, low=0.0, low_open=True)
        check_compiled(compiled)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, foreach=foreach,
                        compiled=compiled, maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("compiled", None)
            group.setdefault("maximize", False)

    def _params_with_grad(self, group: dict[str, Any]) -> list[torch.Tensor]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SGDSaI does not support sparse gradients; use dense gradients "
                                   "(e.g. nn.Embedding(sparse=False))")
            out.append(p)
        return out

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

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SGD-SaI step (Alg. 1 lines 2-19). Returns the closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        groups = [(g, self._params_with_grad(g)) for g in self.param_groups]
        new = [(g, p) for g, ps in groups for p in ps if "gsnr" not in self.state[p]]
        if new:
            self._initialize(new)
        fresh = {id(p) for _, p in new}

        for group, params in groups:
            if not params:
                continue
            check_compiled(group.get("compiled"))
            mode = compiled_mode(group.get("compiled"), [t for p in params for t in (p, p.grad)])
            if mode:
                self._step_compiled(mode, group, params, fresh)
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device.type for p in params}) == 1
            if foreach:
                self._step_foreach(group, params, fresh)
            else:
                self._step_eager(group, params, fresh)
        return loss

    def _step_eager(self, group: dict[str, Any], params: list[torch.Tensor], fresh: set[int]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            buf = state["momentum_buffer"]
            if id(p) not in fresh:  # line 8; on the first step line 10 (m = g) was done in _initialize
                grad = -p.grad if group["maximize"] else p.grad
                buf.mul_(mu).add_(grad, alpha=1.0 - mu)
            if wd != 0:
                p.mul_(1.0 - lr * wd)  # line 17
            p.add_(buf * state["gsnr"], alpha=-lr)  # line 19

    def _step_compiled(self, mode: str, group: dict[str, Any], params: list[torch.Tensor], fresh: set[int]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        states = [self.state[p] for p in params]
        # m <- keep m + (1 - keep) g: keep = momentum (line 8), or 1 on the first step (m = g already, line 10)
        coefs = [[1.0 if id(p) in fresh else mu, lr, 1.0 - lr * wd] for p in params]
        _KERNEL.run(mode, [(p, g, s["momentum_buffer"], s["gsnr"]) for p, g, s in zip(params, grads, states,
                                                                                    strict=True)], coefs)

    def _step_foreach(self, group: dict[str, Any], params: list[torch.Tensor], fresh: set[int]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        scales = [self.state[p]["gsnr"] for p in params]
        buckets = _group_tensors_by_device_and_dtype([params, grads, bufs, scales])
        for (ps, gs, ms, ss), _ in buckets.values():
            old = [i for i, p in enumerate(ps) if id(p) not in fresh]
            if old:
                old_m = [ms[i] for i in old]
                old_g = [gs[i] for i in old]
                if group["maximize"]:
                    old_g = torch._foreach_neg(old_g)
                torch._foreach_mul_(old_m, mu)
                torch._foreach_add_(old_m, old_g, alpha=1.0 - mu)
            if wd != 0:
                torch._foreach_mul_(ps, 1.0 - lr * wd)
            torch._foreach_add_(ps, torch._foreach_mul(ms, ss), alpha=-lr)


def _sgd_sai_kernel(p, g, m, scale, keep, lr, decay):
    m.mul_(keep).add_(g * (1.0 - keep))
    p.copy_(p * decay - lr * (m * scale))


_KERNEL = Kernel(_sgd_sai_kernel, "SGDSaI")
