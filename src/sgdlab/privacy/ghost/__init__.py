"""Per-example gradient norms and clipped gradient sums without per-example gradients of the whole model.

DP-SGD needs, for a micro-batch of ``B`` examples, every example's gradient norm ``‖g_i‖`` and the clipped
sum ``Σ_i c_i g_i``. Most parameters enter the model through an operation whose weight gradient is a sum over
the example's positions of outer products, ``G_i = Σ_t g_{i,t} a_{i,t}ᵀ`` (``a`` the operation's input,
``g`` the loss gradient with respect to its output). One ordinary forward and one backward that stops at the
operations' outputs (so no weight gradient is formed) give ``a`` and ``g`` for every example at once; then:

* **norms** (Lee & Kifer 2021; Li, Tramèr, Liang & Hashimoto 2021, "ghost norm"):
  ``‖G_i‖ = ‖a_i‖ ‖g_i‖`` when the example has one position (``T = 1``); otherwise ``G_i`` itself by one
  batched matrix product (as many multiply-adds as the non-private weight gradient) while the memory budget
  lasts, and beyond it ``Σ_{t,t'} (a_t·a_{t'})(g_t·g_{t'})`` from two ``T×T`` Gram matrices or ``G_i`` a few
  examples at a time, whichever takes fewer multiply-adds;
* **clipped sum** (Bu, Wang, Zha & Karypis 2022, "book-keeping"): ``Σ_i c_i G_i`` of the kept ``G_i`` (one
  matrix-vector product), else ``(c ⊙ g)ᵀ a``, one matrix product the size of the non-private weight
  gradient. No second backward pass is needed (ghost clipping proper, Li et al., runs the backward again on
  the reweighted loss: about a non-private backward more).

Parts: :mod:`.recorder` (a ``TorchFunctionMode`` active during the forward, and forward hooks), one rule per
operation kind in :mod:`.rules` (which parameters a use reaches, its plan, its norms and clipped sum),
:mod:`.planning` (the memory budget and the workspace), :mod:`.grads` (a parameter's per-example norms and
clipped sum) and :mod:`.clipper`. Operations are recognised at the level of torch functions, so a parameter
used outside its module (a tied output embedding ``h @ E.t()``, a sliced position table ``P[:t]``) is seen:

=========================================  =============================================================
``F.linear``, ``x @ W``, ``x @ W.t()``     :mod:`.rules.linear`: the outer-product rule (``T`` = positions)
``torch.addmm(b, x, W)`` (HF ``Conv1D``)   :mod:`.rules.addmm`: the same, ``x``'s rows read as (B, T)
``F.conv1d``, ``F.conv2d`` (any groups)    :mod:`.rules.conv`: the same with the input's patches
``F.embedding``                            :mod:`.rules.embedding`: ``G_i`` by scatter, or token-equality
``F.embedding``, index broadcast (1, T)    :mod:`.rules.broadcast`: a view, recorded where it meets the batch
``torch.lstm``, ``gru``, ``rnn_*``, cells  :mod:`.rules.recurrent`: run step by step, linear uses over ``T``
``F.multi_head_attention_forward``         :mod:`.rules.attention`: its input and output projections
``F.layer_norm``, ``F.group_norm``         :mod:`.rules.norm`: per-example ``Σ g ⊙ x̂`` and ``Σ g``
``x + P``, ``x - P``, ``x * P``            :mod:`.rules.elementwise`: ``P`` broadcast over the batch
``P.t()``, ``P.T``, ``P[ints, slices]``    :mod:`.rules.views`: followed back to the parameter (and
                                           ``P.to(...)`` that returns ``P``)
=========================================  =============================================================

A rule is a :class:`Rule` subclass registered in :data:`RULES` for torch functions or for a module type
(then each call of such a module is handed to its :meth:`Rule.from_module`, and the operations on its own
parameters inside it are not followed)::

    @register(ExpScale)  # out = x ⊙ exp(s), so ∂out/∂s = out
    class ExpScaleRule(Rule):  # per-example gradient of s: Σ_t g_t ⊙ out_t, materialised
        @classmethod
        def from_module(cls, rec, module, args, kwargs, out):
            use = cls()
            use.name, use.y = rec.param(module.s, "s"), use.keep(out)
            rec.record(use, out)

        def names(self):
            return [self.name]

        def assemble(self, plan, grads, b, workspace):
            grads[self.name].add_dense((self.g * self.y).reshape(b, -1, self.y.shape[-1]).sum(1))

A rule that materialises large per-example gradients also implements :meth:`Rule.plan`, asking the
:class:`Planner` for room.

A parameter reached through several uses (tied weights) has its per-example gradients materialised and
summed. Any other operation on a trainable parameter, an input whose first dimension is not the
micro-batch, ``Embedding(max_norm=…, scale_grad_by_freq=True, sparse=True)``, an input modified in place
after use, or a parameter that the loss's autograd graph reaches without a recorded operation (a custom
``autograd.Function``) raise :class:`Unsupported`; the caller then uses ``torch.func``.

Materialised per-example gradients and the temporaries that produce them live in a workspace kept from one
micro-batch to the next (at most :data:`MATERIALISE_BUDGET` elements): on the CPU, fresh allocations of
that size cost page faults comparable to the matrix products that fill them.

The per-example loss is the one :class:`~sgdlab.privacy.dpsgd.DPSGD` defines, ``ℓ_i`` = the loss function
on a batch of that one example; for a loss that is the mean over the batch of per-example means (every
sgdlab task), ``Σ_i ℓ_i = B · loss(batch)``, which is what is differentiated here. The engine checks this
(and the batch-first layout assumed above) once against ``torch.func`` before trusting the fast path.
"""

from __future__ import annotations

from . import rules
from .clipper import GhostClipper
from .grads import ParamGrads
from .planning import MATERIALISE_BUDGET, Planner, Workspace
from .recorder import Recorder
from .rule import RULES, Rule, Unsupported, register

__all__ = ["MATERIALISE_BUDGET", "RULES", "GhostClipper", "ParamGrads", "Planner", "Recorder", "Rule",
           "Unsupported", "Workspace", "register", "rules"]
