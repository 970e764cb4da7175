"""The optimizer base (sgdlab.optim._base): a new Adam-family optimizer is its update written twice (eager and
as a kernel) and its signature; the dispatch rules are one for all."""

import math

import pytest
import torch

from sgdlab.errors import ConfigError
from sgdlab.optim import SparseGradientError
from sgdlab.optim._base import AdamFamily, buckets, defaults_from, use_foreach
from sgdlab.optim._compiled import Kernel

# --- an Adam-family optimizer in a few lines: Adam with decoupled weight decay (AdamW) -------------------

def _adamw_kernel(p, g, m, v, step_size, bc2, eps_bc2, decay, beta1: float, beta2: float):
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.copy_(p * decay - (step_size * bc2) * m / (v.sqrt() + eps_bc2))


class TinyAdamW(AdamFamily):
    """AdamW (Loshchilov & Hutter, 2019) on the sgdlab base."""

    kernel = Kernel(_adamw_kernel, "TinyAdamW")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, foreach: bool | None = None, compiled: bool | str | None = None,
                 maximize: bool = False):
        super().__init__(params, defaults_from(locals()))

    def _update(self, group, t, p, g, m, v, ops) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        ops.mul_(p, 1 - lr * wd)
        ops.lerp_(m, g, 1 - beta1)
        ops.mul_(v, beta2)
        ops.addcmul_(v, g, g, value=1 - beta2)
        denom = ops.sqrt(v)
        ops.div_(denom, math.sqrt(1 - beta2 ** t))
        ops.add_(denom, eps)
        ops.addcdiv_(p, m, denom, value=-lr / (1 - beta1 ** t))


@pytest.mark.parametrize("path", [dict(foreach=False, compiled=False), dict(foreach=True, compiled=False),
                                  dict(compiled="tensor"), dict(compiled="group")], ids=["eager", "foreach",
                                                                                          "tensor", "group"])
def test_an_adam_family_optimizer_in_a_few_lines_matches_torch_adamw(path):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(5, 3), (7,), (2, 3, 2)]]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, maximize=True)
    a = TinyAdamW([{"params": ours[:1]}, {"params": ours[1:], "lr": 0.02}], **kw, **path)
    b = torch.optim.AdamW([{"params": theirs[:1]}, {"params": theirs[1:], "lr": 0.02}], **kw, foreach=False)
    for _ in range(15):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        assert a.state[p]["step"].item() == 15
    with pytest.raises(ConfigError, match=r"betas\[1\]"):
        a.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "betas": (0.9, 1.0)})


def test_the_one_foreach_rule():
    cpu = [torch.zeros(2), torch.zeros(3, dtype=torch.float64)]
    assert use_foreach(None, cpu) and not use_foreach(False, cpu) and use_foreach(True, cpu)
    assert not use_foreach(None, cpu, devices=("cuda",))  # an optimizer whose multi-tensor path pays only there
    assert not use_foreach(None, [torch.zeros(2), torch.zeros(2, device="meta")])  # two device types

    class Sub(torch.Tensor):
        pass

    assert not use_foreach(None, [torch.zeros(2).as_subclass(Sub)])  # tensor subclasses: one tensor at a time


def test_buckets_group_by_device_dtype_and_key():
    ts = [torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(1), torch.zeros(1)]
    assert buckets(ts, batched=True) == [[0, 2, 3], [1]]
    assert buckets(ts, batched=True, keys=[1, 1, 2, 1]) == [[0, 3], [1], [2]]
    assert buckets(ts, batched=False) == [[0], [1], [2], [3]]


def test_the_sparse_gradient_error_is_both_runtime_and_value_error():
    err = SparseGradientError("Grams", (4, 2))
    assert isinstance(err, ConfigError) and isinstance(err, RuntimeError) and isinstance(err, ValueError)
    assert str(err).startswith("Grams does not support sparse gradients (got one for a parameter of shape (4, 2))")
