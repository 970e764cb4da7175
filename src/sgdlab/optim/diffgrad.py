"""diffGrad: Adam whose first moment is damped where consecutive gradients agree.

Reference: Shiv Ram Dubey, Soumendu Chakraborty, Swalpa Kumar Roy, Snehasis Mukherjee, Satish Kumar Singh,
Bidyut Baran Chaudhuri, "diffGrad: An Optimization Method for Convolutional Neural Networks", IEEE TNNLS
2020, arXiv:1909.11015.

Update rule (per element; t counts this parameter's steps, g_0 = 0)::

    m_t   = beta1 m_{t-1} + (1 - beta1) g_t
    v_t   = beta2 v_{t-1} + (1 - beta2) g_t^2
    m^_t  = m_t / (1 - beta1^t),   v^_t = v_t / (1 - beta2^t)
    xi_t  = sigmoid(|g_{t-1} - g_t|)                    (the "diffGrad friction coefficient", in [0.5, 1))
    theta_t = theta_{t-1} - lr * xi_t * m^_t / (sqrt(v^_t) + eps)

Defaults lr=1e-3, betas=(0.9, 0.999), eps=1e-8 are the paper's (Adam's) settings and the authors' code.

Weight decay: the paper has none; the authors' code adds an L2 term to the gradient. We offer decoupled
(AdamW-style) decay instead, applied before the update: theta <- theta * (1 - lr * weight_decay).

Difference from ``pytorch_optimizer.DiffGrad`` (and the authors' code): they use Adam's "efficient" form
lr * sqrt(1 - beta2^t) / (1 - beta1^t) * xi m / (sqrt(v) + eps), which puts eps on the uncorrected
sqrt(v) (and they add 1e-15 inside the square root). We follow the paper and add eps to sqrt(v^_t). The two
coincide when eps = 0.

The method is elementwise and treats every parameter (matrices, biases, norms, embeddings) the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._base import AdamFamily, adam_denominator, defaults_from
from ._compiled import Kernel

__all__ = ["DiffGrad"]


def _diffgrad_kernel(p, g, m, v, prev, step_size, bc2, eps_bc2, decay, beta1: float, beta2: float):
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # xi m / (sqrt(v) / bc2 + eps) with xi = 1 / (1 + exp(-|prev - g|)), as one division
    p.copy_(p * decay - (step_size * bc2) * m / ((1 + (-(prev - g).abs()).exp()) * (v.sqrt() + eps_bc2)))
    prev.copy_(g)


_DIFFGRAD_KERNEL = Kernel(_diffgrad_kernel, "DiffGrad")


class DiffGrad(AdamFamily):
    """diffGrad (Dubey et al., 2020, arXiv:1909.11015); see the module docstring for the update rule.

    Hyperparameters as for every Adam-family optimizer (:class:`~sgdlab.optim._base.AdamFamily`), with the
    paper's defaults lr=1e-3, betas=(0.9, 0.999), eps=1e-8; weight_decay=0.
    """

    state_names = ("exp_avg", "exp_avg_sq", "prev_grad")
    kernel = property(lambda self: _DIFFGRAD_KERNEL)  # the module's, looked up at each step

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, foreach: bool | None = None,
                 compiled: bool | str | None = None, maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    def _update(self, group, t, p, g, m, v, prev, ops) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd != 0:
            ops.mul_(p, 1 - lr * wd)
        denom = adam_denominator(m, v, g, t, beta1, beta2, eps, ops)
        xi = ops.sub(prev, g)
        ops.abs_(xi)
        ops.sigmoid_(xi)
        ops.mul_(xi, m)
        ops.addcdiv_(p, xi, denom, value=-lr / (1 - beta1 ** t))
        ops.copy_(prev, g)
