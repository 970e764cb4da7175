"""DP-SGD: differentially private training by per-example clipping and Gaussian noise.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang, "Deep Learning with Differential Privacy",
CCS 2016 (arXiv:1607.00133), Algorithm 1, with Poisson sampling as the accountants assume. One step:

1. **Sample** a batch ``B``: every training example is included independently with probability
   ``q = L / N`` (``L`` the expected batch size, ``N`` the number of training examples). ``|B|`` varies
   and may be 0.
2. **Per-example gradients** ``g_i = ∇θ ℓ(θ; x_i)`` for ``i ∈ B``, where ``ℓ(θ; x_i)`` is the task's
   loss on a batch of that one example (for a language model, the mean over the example's tokens), in
   physical micro-batches of at most ``max_physical_batch`` examples so that a large logical batch fits in
   memory. Only their norms and the clipped sum are needed, and ``grad_sample`` says how they are found:

   * ``ghost``: one forward and one backward of the micro-batch (no weight gradients), with per-example
     norms and the clipped sum formed from each layer's inputs and output gradients ("ghost norms" and
     "book-keeping", Li et al. 2021, Bu et al. 2022; :mod:`sgdlab.privacy.ghost`). Linear (``F.linear``,
     ``torch.addmm`` as in Hugging Face's ``Conv1D``, ``x @ W``), convolution (1-d, 2-d), embedding (an index
     that is a batch, or one broadcast over it, as GPT-2's positions), LayerNorm, GroupNorm, ``nn.LSTM``,
     ``nn.GRU``, ``nn.RNN`` and their cells (any layers and directions; packed sequences are refused),
     ``nn.MultiheadAttention`` (not ``add_bias_kv``, ``add_zero_attn``), and a matrix product or broadcast
     sum/product with a parameter (tied and sliced weights included) are supported; anything else is refused;
   * ``vmap``: ``torch.func`` (``vmap(grad(functional_call(...)))``) materialises every ``g_i``: any model
     (recurrent layers are run step by step, as ``vmap`` cannot batch torch's fused kernels), about
     ``max_physical_batch`` copies of the gradients in memory;
   * ``auto`` (the default): ``ghost`` where the model allows it, else ``vmap``, with a warning.

   Before trusting ``ghost``, the engine checks it once, on its first micro-batch of at least two
   examples: the sum of its per-example gradients against autograd's batch gradient, and the per-example
   norms of a few examples against ``vmap`` (1e-8 relative in float64, 1e-2 below); this catches a loss
   that is not the mean of its examples' losses or a layer that does not keep the batch in dimension 0.
   On a mismatch ``auto`` switches to ``vmap`` and ``ghost`` raises.

   Measured (``sgdlab bench dp``, 2-core CPU, two threads, batch 256 in one micro-batch; BENCHMARKS.md):
   ``ghost`` costs 1.24x the non-private step on the digits CNN (1.43–1.53x on the same machine on
   2026-12-03, old and new builds alike), 1.16x on charlm and 1.08x on charlm with
   an untied head, against 1.5–1.7x for ``vmap`` and 1.15–2.4x for Opacus 1.6's modes (whose fastest,
   expanded weights, is 1.39x and 1.06x slower than ``ghost``); on Hugging Face GPT-2 in charlm's shape,
   1.12x, against 2.70x for ``vmap`` and 1.77x for Opacus's fastest mode that runs it (hooks). ``ghost``
   also bounds memory
   (:data:`sgdlab.privacy.ghost.MATERIALISE_BUDGET`).

3. **Clip** each ``g_i`` to norm ``C``:

   * ``flat`` (the paper's): one L2 norm over all parameters, ``ḡ_i = g_i · min(1, C / (‖g_i‖ + 1e-6))``;
   * ``per_layer``: each of the ``K`` parameter tensors ``g_i^k`` is clipped to ``C / √K`` on its own,
     so the whole ``ḡ_i`` still has norm ≤ C and the same noise keeps the same guarantee.

4. **Noise and average**: ``g̃ = (Σ_{i∈B} ḡ_i + N(0, σ² C² I)) / L`` — the noise goes on the *sum*, and the
   sum is divided by the *expected* batch size ``L = qN``, not by ``|B|`` (dividing by the realised size
   would make the sensitivity depend on the batch).
5. ``g̃`` is written into ``p.grad``; any optimizer then takes its step (post-processing keeps the
   guarantee), so DP-SGD, DP-Adam, DP-anything come from the same engine.

The ``(ε, δ)`` bound of ``T`` such steps is computed by :mod:`sgdlab.privacy.accounting`.

**Random layers** (dropout in train mode, attention dropout, ``rrelu``) draw from torch's default generators
(the CPU's, and the CUDA device's for CUDA tensors), so ``torch.manual_seed`` before a step fixes them, and
every example gets its own draws, as in ordinary training: ``ghost`` runs one forward per micro-batch and its
norms, clipped sum and loss all come from that forward's masks; ``vmap`` runs with
``vmap(..., randomness="different")``, one independent draw per example (on the CPU, torch 2.13 draws them as
the batched forward would, so the same seed gives the same masks either way: observed, not promised). Each
micro-batch draws afresh, as consecutive forwards do. Recurrent layers run step by step in both modes (see
:mod:`sgdlab.privacy.ghost.rules.recurrent`), so the dropout between the layers of a multi-layer ``nn.LSTM``
or ``nn.GRU`` draws as that recurrence does, not as torch's fused kernel (the same distribution). The
self-check draws nothing from the training's stream: its reference forward replays the generators from where
the fast path's forward started (the same masks), and its per-example comparison with ``torch.func`` runs with
dropout off (:class:`~sgdlab.privacy.ghost.replay.NoDropout`), skipped for randomness it cannot switch off. So
with ``σ = 0`` and ``C = ∞``, ``ghost``'s private gradient is the ordinary mean gradient under the same masks
(the same seed, the same micro-batches; ``vmap``'s too, on the CPU as observed), and a step leaves the
generators where a plain forward and backward of those micro-batches would. A layer that draws from a
``torch.Generator`` of its own is not replayed: its check fails, and ``auto`` uses ``vmap``. The masks do not
depend on the data, so clipping still bounds each example's contribution and the guarantee is the same.

Layers that mix examples of a batch (BatchNorm, SyncBatchNorm, InstanceNorm with running statistics)
have no per-example gradient and are refused before training; GroupNorm and LayerNorm are per-example.

Sampling and noise come from ``torch.Generator`` objects owned by the engine (seeded from the run's seed),
whose states :meth:`DPSGD.state_dict` returns, so a checkpointed run resumes bit-identically.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import ConfigError, check_range
from .ghost import GhostClipper, Unsupported
from .ghost.replay import Generators, NoDropout
from .ghost.rules.recurrent import Unrolled

CLIPPINGS = ("flat", "per_layer")
GRAD_SAMPLES = ("auto", "ghost", "vmap")
DEFAULT_GRAD_SAMPLE = "auto"
_CHECK_EXAMPLES = 4  # examples of the first micro-batch whose norms are compared with torch.func's
DEFAULT_MAX_PHYSICAL_BATCH = 256
_NORM_EPS = 1e-6  # added to per-example norms before dividing (Opacus and TF Privacy do the same)


def check_model(model: nn.Module) -> None:
    """Raise ``ConfigError`` naming the first layer that mixes the examples of a batch."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"DP-SGD needs per-example gradients, but layer {name or '<model>'!r} "
                              f"({type(m).__name__}) mixes the examples of a batch through its batch statistics; "
                              "replace it with GroupNorm or LayerNorm")
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise ConfigError(f"DP-SGD needs per-example gradients, but layer {name or '<model>'!r} "
                              f"({type(m).__name__} with track_running_stats=True) accumulates statistics over "
                              "the batch; use track_running_stats=False, GroupNorm or LayerNorm")


class PoissonSampler:
    """Each of ``num_examples`` examples is in a batch independently with probability ``sample_rate``.

    Draws from the generator it is given (the DP engine's), so it has no state of its own.
    """

    def __init__(self, num_examples: int, sample_rate: float, generator: torch.Generator):
        self.num_examples, self.sample_rate, self.generator = num_examples, sample_rate, generator

    def next(self) -> torch.Tensor:
        u = torch.rand(self.num_examples, generator=self.generator, dtype=torch.float64)
        return (u < self.sample_rate).nonzero().flatten()

    def state_dict(self) -> dict[str, Any]:
        return {}  # the state is the engine's generator

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can substitute the model's parameters
    even where the loss reads them directly (e.g. an L2 term on ``model.weight``)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _batch_size(batch: Any) -> int:
    leaves, _ = tree_flatten(batch)
    return int(leaves[0].shape[0]) if leaves else 0


def _seed(seed: int, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"sgdlab-dp:{seed}:{what}".encode()).digest()[:8], "little") >> 1


class DPSGD:
    """Private gradients for ``model``: call :meth:`backward` where plain training calls
    ``loss_fn(model, batch).backward()``, then step any optimizer.

    Args:
        model: the model (checked with :func:`check_model`).
        loss_fn: ``loss_fn(model, batch)`` → mean loss over the batch; ``batch`` is a tensor or a tuple /
            list / dict of tensors whose first dimension indexes the examples.
        noise_multiplier: σ; the noise on the summed clipped gradients has standard deviation σ·C.
        max_grad_norm: the clipping bound C (``inf`` only with σ = 0, for tests and ablations).
        expected_batch_size: L = qN, the divisor of the noisy sum.
        clipping: ``"flat"`` or ``"per_layer"`` (see the module docstring).
        max_physical_batch: examples per forward/backward (with ``vmap``, about this many copies of the
            gradients are held).
        seed: seeds the engine's generators (sampling on the CPU, noise on the parameters' device).
        grad_sample: ``"auto"``, ``"ghost"`` or ``"vmap"``: how per-example norms and the clipped sum are
            computed (see the module docstring). ``ghost`` raises ``ConfigError`` for a model it cannot
            handle; ``auto`` then uses ``vmap``. Both give the same gradients up to rounding.

    Random layers (dropout in train mode) give each example its own draws from torch's default generators,
    in every mode; with ``ghost`` a step uses and consumes the draws of a plain forward of the same
    micro-batches (see the module docstring).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                 clipping: str = "flat", max_physical_batch: int = DEFAULT_MAX_PHYSICAL_BATCH, seed: int = 0,
                 grad_sample: str = DEFAULT_GRAD_SAMPLE):
        check_model(model)
        check_range("noise_multiplier", noise_multiplier, low=0)
        check_range("max_grad_norm", max_grad_norm, low=0, low_open=True)
        if math.isinf(max_grad_norm) and noise_multiplier > 0:
            raise ConfigError("max_grad_norm=inf needs noise_multiplier=0 (the noise scale is σ·C)")
        check_range("expected_batch_size", expected_batch_size, low=0, low_open=True)
        if clipping not in CLIPPINGS:
            raise ConfigError(f"clipping={clipping!r}; allowed: {', '.join(CLIPPINGS)}")
        check_range("max_physical_batch", max_physical_batch, low=1, integer=True)
        if grad_sample not in GRAD_SAMPLES:
            raise ConfigError(f"grad_sample={grad_sample!r}; allowed: {', '.join(GRAD_SAMPLES)}")
        self.model, self.loss_fn = model, loss_fn
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size, self.clipping = float(expected_batch_size), clipping
        self.max_physical_batch = max_physical_batch
        self._loss_module = _LossModule(model, loss_fn)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ConfigError("DP-SGD: the model has no trainable parameters")
        device = next(iter(self.params.values())).device
        self.sample_generator = torch.Generator().manual_seed(_seed(seed, "sample"))
        self.noise_generator = torch.Generator(device=device).manual_seed(_seed(seed, "noise"))
        self._generators = Generators({p.device for p in self.params.values()})
        self._per_example = {r: vmap(grad_and_value(self._example_loss), in_dims=(None, None, 0), randomness=r)
                             for r in ("different", "error")}
        self.grad_sample = grad_sample
        self._ghost: GhostClipper | None = None
        self._checked = False  # the fast path has been compared with torch.func on this model
        if grad_sample != "vmap":
            try:
                self._ghost = GhostClipper(model, loss_fn, self.params)
            except Unsupported as e:
                self._refuse(str(e))

    @property
    def method(self) -> str:
        """``"ghost"`` or ``"vmap"``: what the next step will use."""
        return "vmap" if self._ghost is None else "ghost"

    def _refuse(self, reason: str) -> None:
        if self.grad_sample == "ghost":
            raise ConfigError(f"DP-SGD grad_sample=ghost cannot handle this model: {reason}; "
                              "use grad_sample=vmap (or auto)")
        self._ghost = None
        warnings.warn(f"DP-SGD grad_sample=auto uses per-example gradients from torch.func (slower): {reason}",
                      UserWarning, stacklevel=2)

    def sampler(self, num_examples: int) -> PoissonSampler:
        """A Poisson sampler with rate ``expected_batch_size / num_examples`` on the engine's generator."""
        q = self.expected_batch_size / num_examples
        if q > 1:
            raise ConfigError(f"batch_size={self.expected_batch_size:g} (the expected batch with DP) is larger "
                              f"than the data ({num_examples} examples); allowed: batch_size <= {num_examples}")
        return PoissonSampler(num_examples, q, self.sample_generator)

    # ---- per-example gradients --------------------------------------------------------------
    def _example_loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], example: Any):
        one = tree_map(lambda t: t.unsqueeze(0), example)
        return functional_call(self._loss_module, {**params, **buffers}, (one,))

    def per_sample_gradients(self, batch: Any, *, randomness: str = "different"
                             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({name: tensor of shape (B, *param.shape)}, per-example losses (B,))`` for one micro-batch.

        Random layers draw for each example on its own (``vmap(..., randomness="different")``), from torch's
        default generators; ``randomness="error"`` refuses them (torch's ``RuntimeError``)."""
        params = {f"model.{n}": p.detach() for n, p in self.params.items()}
        buffers = {f"model.{n}": b for n, b in self.model.named_buffers()}
        with warnings.catch_warnings():  # SDPA has no vmap rule on the CPU: torch loops over the batch
            warnings.filterwarnings("ignore", message="There is a performance drop")
            with Unrolled():  # recurrent layers step by step: vmap cannot batch torch's fused kernels
                grads, losses = self._per_example[randomness](params, buffers, batch)
        return {n[len("model."):]: g for n, g in grads.items()}, losses.detach()

    def clip_factors(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-example multipliers (shape (B,), one per parameter tensor) that bring norms to ≤ C."""
        return self.factors({n: g.flatten(1).norm(dim=1) for n, g in grads.items()})

    def factors(self, norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`clip_factors` from the per-example norms (B,) of every parameter tensor."""
        def factor(norm: torch.Tensor, bound: float) -> torch.Tensor:
            return (bound / (norm + _NORM_EPS)).clamp(max=1.0)

        if self.clipping == "flat":
            f = factor(torch.stack(list(norms.values())).norm(dim=0), self.max_grad_norm)
            return {n: f for n in norms}
        bound = self.max_grad_norm / math.sqrt(len(norms))
        return {n: factor(v, bound) for n, v in norms.items()}

    def per_sample_norms(self, batch: Any) -> dict[str, torch.Tensor]:
        """``{name: per-example gradient norms (B,)}`` of one micro-batch, by the engine's method."""
        n = _batch_size(batch)
        if self._ghost is not None and n:
            try:
                params, _ = self._ghost.run(batch, n)
                return {k: params[k].norms(n) for k in self.params}
            except Unsupported as e:
                self._refuse(str(e))
        grads, _ = self.per_sample_gradients(batch)
        return {k: g.flatten(1).norm(dim=1) for k, g in grads.items()}

    def _check(self, micro: Any, n: int, params: dict[str, Any], norms: dict[str, torch.Tensor],
               start: list[torch.Tensor]) -> None:
        """Check the fast path once per engine, on its first micro-batch of ``n`` ≥ 2 examples, whose forward
        started from generator state ``start``:

        1. the sum of its per-example gradients equals autograd's gradient of the summed loss (catches a
           parameter reaching the loss through something the fast path did not see); the reference forward
           replays the generators from ``start``, so random layers draw the same masks as the fast path did
           (recurrent layers then run step by step, as the fast path ran them, for their dropout's draws);
        2. its per-example norms of the first few examples equal torch.func's (catches a loss that is not the
           mean of its examples' losses, or a layer that does not keep the batch in dimension 0) — skipped
           when torch.func cannot run the model. If the forward drew random numbers, each example alone
           cannot get the mask it had in the batch: both sides are then recomputed on those examples with
           dropout off (:class:`~sgdlab.privacy.ghost.replay.NoDropout`), and other randomness skips this.

        Afterwards the generators are where the fast path's forward left them.
        """
        exact = all(p.dtype == torch.float64 for p in self.params.values())
        rtol = 1e-8 if exact else 1e-2  # float32 (or TF32 convolutions on CUDA): structural errors are O(1)
        ones = torch.ones(n, device=next(iter(self.params.values())).device)
        ours = {k: params[k].clipped_sum(ones) for k in self.params}
        random = not self._generators.same(start, self._generators.state())
        # with random draws, recurrent layers as the fast path ran them (their dropout draws in its order)
        with self._generators.replay(start), Unrolled() if random else contextlib.nullcontext():
            reference = torch.autograd.grad(self.loss_fn(self.model, micro) * n, list(self.params.values()),
                                            allow_unused=True)
        for (k, mine), ref in zip(ours.items(), reference, strict=True):
            ref = torch.zeros_like(mine) if ref is None else ref
            scale = norms[k].sum().item() + ref.norm().item()
            if (mine - ref).norm().item() > rtol * scale:
                hint = " (or a random layer drawing from a generator of its own)" if random else ""
                raise Unsupported(f"the per-example gradients of {k!r} do not add up to the batch gradient{hint}")
        k = min(_CHECK_EXAMPLES, n)
        first = tree_map(lambda t: t[:k], micro)
        with self._generators.replay(), NoDropout() if random else contextlib.nullcontext():
            if random:  # the fast path again, on the first examples without dropout (its last use of params)
                params, _ = self._ghost.run(first, k)
                norms = {name: params[name].norms(k) for name in self.params}
            try:
                grads, _ = self.per_sample_gradients(first, randomness="error")
            except Exception:  # torch.func cannot run this model (e.g. random layers): nothing to compare with
                self._checked = True
                return
        ref = torch.stack([grads[name].flatten(1).norm(dim=1) for name in self.params]).double()
        got = torch.stack([norms[name][:k] for name in self.params]).double()
        bad = ((got - ref).abs() > rtol * ref + rtol * 1e-2 * ref.max()).any(dim=1)
        if bad.any():
            name = list(self.params)[int(bad.nonzero()[0])]
            raise Unsupported(f"per-example gradient norms of {name!r} differ from torch.func's (a loss that is "
                              "not the mean of its examples' losses, or a layer that does not keep the batch in "
                              "dimension 0?)")
        self._checked = True

    def _micro_clipped_sum(self, micro: Any, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self._ghost is not None:
            try:
                check = not self._checked and n >= 2
                start = self._generators.state() if check else None
                params, loss_sum = self._ghost.run(micro, n)  # one forward: the masks the gradients use
                norms = {k: params[k].norms(n) for k in self.params}
                factors = self.factors(norms)
                sums = {k: params[k].clipped_sum(factors[k]) for k in self.params}  # new tensors
                if check:  # after the sums: the check may run the fast path again
                    self._check(micro, n, params, norms, start)
                return sums, loss_sum
            except Unsupported as e:
                self._refuse(str(e))
        grads, losses = self.per_sample_gradients(micro)
        factors = self.clip_factors(grads)
        return ({k: torch.einsum("b,b...->...", factors[k].to(g.dtype), g) for k, g in grads.items()},
                losses.sum())

    # ---- the step ---------------------------------------------------------------------------
    def clipped_sum(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({name: Σ_i ḡ_i}, Σ_i ℓ_i)`` over ``batch`` in micro-batches: the step before noise and division."""
        n = _batch_size(batch)
        if 0 < n <= self.max_physical_batch:
            return self._micro_clipped_sum(batch, n)
        sums = {k: torch.zeros_like(p) for k, p in self.params.items()}
        loss_sum = None  # in the loss's dtype
        for start in range(0, n, self.max_physical_batch):
            micro = tree_map(lambda t, s=start: t[s:s + self.max_physical_batch], batch)
            part, losses = self._micro_clipped_sum(micro, min(self.max_physical_batch, n - start))
            for k, g in part.items():
                sums[k] += g
            loss_sum = losses if loss_sum is None else loss_sum + losses
        if loss_sum is None:  # an empty batch
            loss_sum = torch.zeros((), device=next(iter(self.params.values())).device)
        return sums, loss_sum

    def backward(self, batch: Any) -> torch.Tensor:
        """Write the private gradient of ``batch`` into ``p.grad`` and return the batch's summed loss
        divided by the expected batch size (an unbiased estimate of the mean loss; 0 for an empty batch)."""
        sums, loss_sum = self.clipped_sum(batch)
        grads = [sums[k] for k in self.params]  # new tensors, owned here
        std = self.noise_multiplier * self.max_grad_norm
        if std > 0:
            by_kind: dict[tuple, list[torch.Tensor]] = {}
            for g in grads:
                by_kind.setdefault((g.dtype, g.device), []).append(g)
            for (dtype, device), gs in by_kind.items():  # one draw per dtype and device
                z = torch.randn(sum(g.numel() for g in gs), generator=self.noise_generator, device=device,
                                dtype=dtype)
                torch._foreach_add_(gs, [v.view(g.shape) for v, g in zip(z.split([g.numel() for g in gs]), gs,
                                                                        strict=True)], alpha=std)
        torch._foreach_div_(grads, self.expected_batch_size)
        for p, g in zip(self.params.values(), grads, strict=True):
            p.grad = g
        return loss_sum / self.expected_batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"sample_generator": self.sample_generator.get_state(),
                "noise_generator": self.noise_generator.get_state(),
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sample_generator.set_state(state["sample_generator"].cpu())
        self.noise_generator.set_state(state["noise_generator"].cpu())
        self.noise_multiplier = float(state["noise_multiplier"])
