"""Recurrent layers: ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu`` (what ``nn.LSTM``,
``nn.GRU`` and ``nn.RNN`` call), any number of layers, both directions, ``proj_size``, batch first or not; and
the cells (``torch.lstm_cell``, … of ``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``). A
packed sequence is refused with a :class:`~sgdlab.errors.ConfigError` naming the layer (on either path: packing
reorders the examples, and ``torch.func`` cannot pack one example at a time).

A recurrent layer reuses its weights at every time step, so an example's weight gradient is a sum over its
``T`` steps of outer products, ``G_i = Σ_t g_{i,t} a_{i,t}ᵀ``: the same form as a linear layer over a sequence.
The rule runs the layer's recurrence itself (the cell equations of ``torch.nn``'s documentation) with one
linear map per weight:

* the input weights ``W_ih`` (and ``b_ih``) act on the whole input sequence at once: one
  :class:`~.linear.Linear` use with ``T`` positions;
* the recurrent weights ``W_hh`` (``b_hh``, and ``W_hr`` of a projected LSTM) act step by step on the previous
  state; their output at step ``t`` is ``h_{t-1} W_hhᵀ + b_hh + z[:, t]`` with ``z`` a (B, T, ·) zero tensor
  that requires a gradient, so that the backward's gradient with respect to ``z`` is the gradient with
  respect to every step's output at once; with ``a`` the stacked previous states that is again one
  :class:`~.linear.Linear` use with ``T`` positions (its ghost norms, kept gradients and clipped sums).

A cell, called by the model once per step, has its two linear maps recorded at each call (one position
each); a weight used at several steps then gets one per-example gradient the uses add into.

The recurrence is also what :class:`Unrolled` runs in place of torch's fused kernels under ``torch.func``,
whose ``vmap`` cannot batch them (``nn.GRU``, ``nn.RNN``, their cells, and ``nn.LSTM`` in float64, end in a
RuntimeError).

Measured (2-core CPU, batch 256, 32 steps, 32 features, hidden 128, a loaded machine): the step costs about
1.5x (GRU, RNN) to 1.9x (LSTM) the non-private one with torch's fused kernels, against 11-35x for ``vmap``;
running the recurrence step by step costs most of the difference (torch's own backward of the gates' split).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ....errors import ConfigError
from ..recorder import Recorder
from ..rule import Rule, Unsupported, register
from .linear import Linear

KINDS = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "tanh", torch.rnn_relu: "relu"}
CELLS = {torch.lstm_cell: "lstm", torch.gru_cell: "gru", torch.rnn_tanh_cell: "tanh", torch.rnn_relu_cell: "relu"}


class _Plain:
    """The linear maps of the recurrence as plain ``F.linear`` calls."""

    def sequence(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def steps(self, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor, steps: int):
        return lambda h, t: F.linear(h, w, b)

    def done(self) -> None:
        pass


class _Recorded(_Plain):
    """The linear maps of the recurrence, each recorded as one :class:`~.linear.Linear` use."""

    def __init__(self, rec: Recorder):
        self.rec = rec
        self.pending: list[tuple[Linear, list[Any], torch.Tensor]] = []

    def _use(self, w: torch.Tensor, b: torch.Tensor | None) -> Linear | None:
        weight, bias = self.rec.param(w, "a weight"), self.rec.param(b, "a bias")
        return None if weight is None and bias is None else Linear(weight=weight, bias=bias, layout="W")

    def sequence(self, x, w, b):
        use = self._use(w, b)
        if use is None:
            return F.linear(x, w, b)
        use.x = use.keep(x)
        return self.rec.record(use, F.linear(x, w, b))

    def steps(self, w, b, x, steps):
        use = self._use(w, b)
        if use is None:
            return super().steps(w, b, x, steps)
        z = x.new_zeros(x.shape[0], steps, w.shape[0]).requires_grad_()
        zs = z.unbind(1)  # one backward node for all steps (z[:, t] would zero-fill a (B, T, ·) gradient each)
        inputs: list[Any] = [None] * steps  # step t's input, in the order of z
        self.pending.append((use, inputs, z))

        def step(h: torch.Tensor, t: int) -> torch.Tensor:
            inputs[t] = h.detach()
            return F.linear(h, w, b) + zs[t]
        return step

    def done(self) -> None:
        for use, inputs, z in self.pending:
            use.x = use.keep(torch.stack(inputs, 1))
            self.rec.record(use, z)
        self.pending.clear()

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` on a batch ``x`` (B, D), recorded (one position)."""
        return self.sequence(self.rec.input(x), w, b)


def _step(kind: str, a: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of the cell from its input and recurrent pre-activations ``a`` and ``gh``: (h', c')."""
    if kind == "lstm":
        i, f, g, o = (a + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if kind == "gru":
        ir, iz, in_ = a.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, u = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return n + u * (h - n), None  # (1 - u) n + u h
    return (torch.tanh(a + gh) if kind == "tanh" else torch.relu(a + gh)), None


def _layer(kind: str, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, weights: list, reverse: bool,
           ops: _Plain) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One direction of one layer on ``x`` (B, T, D) from state ``h`` (and ``c``): (outputs, h_T, c_T)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    steps = x.shape[1]
    gi = ops.sequence(x, w_ih, b_ih).unbind(1)
    hh = ops.steps(w_hh, b_hh, x, steps)
    hr = ops.steps(w_hr, None, x, steps) if w_hr is not None else None
    outs: list[Any] = [None] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        h, c = _step(kind, gi[t], hh(h, t), h, c)
        if hr is not None:
            h = hr(h, t)
        outs[t] = h
    return torch.stack(outs, 1), h, c


def unrolled(kind: str, args: tuple, ops: _Plain) -> tuple:
    """What ``torch.lstm`` / ``gru`` / ``rnn_*`` return for ``args`` (not packed), computed step by step."""
    x, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first = args
    dirs = 2 if bidirectional else 1
    per = len(params) // (layers * dirs)
    projected = per == (5 if has_biases else 3)
    if kind == "lstm":
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    x = x if batch_first else x.transpose(0, 1)
    hs, cs = [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = list(params[k * per:(k + 1) * per])
            w_hr = w.pop() if projected else None
            w_ih, w_hh, b_ih, b_hh = w if has_biases else (*w, None, None)
            out, h, c = _layer(kind, x, h0[k], None if c0 is None else c0[k], [w_ih, w_hh, b_ih, b_hh, w_hr],
                               d == 1, ops)
            outs.append(out)
            hs.append(h)
            cs.append(c)
        x = outs[0] if dirs == 1 else torch.cat(outs, 2)
        if dropout > 0 and train and layer < layers - 1:
            x = F.dropout(x, dropout, training=True)
    ops.done()
    out = x if batch_first else x.transpose(0, 1)
    if kind == "lstm":
        return out, torch.stack(hs), torch.stack(cs)
    return out, torch.stack(hs)


def cell(kind: str, args: tuple, linear) -> Any:
    """What ``torch.lstm_cell`` / ``gru_cell`` / ``rnn_*_cell`` return for ``args``, with ``linear`` for the two
    linear maps."""
    x, hx, w_ih, w_hh, b_ih, b_hh = (*args, None, None)[:6]
    h, c = hx if kind == "lstm" else (hx, None)
    h, c = _step(kind, linear(x, w_ih, b_ih), linear(h, w_hh, b_hh), h, c)
    return (h, c) if kind == "lstm" else h


def _packed(args: tuple) -> bool:
    """Whether a call is the packed-sequence overload (``data, batch_sizes, hx, params, …``)."""
    return len(args) != 9 or not isinstance(args[3], bool)


def packed_refusal(model: nn.Module | None, params: Any) -> ConfigError:
    """The error for a recurrent layer given a packed sequence (``params``: its weights, to name it)."""
    first = params[0] if isinstance(params, (list, tuple)) and params else None
    layer = "a recurrent layer"
    for name, m in (model.named_modules() if model is not None else ()):
        if isinstance(m, nn.RNNBase) and any(w is first for w in m._flat_weights):
            layer = f"layer {name or '<model>'!r} ({type(m).__name__})"
            break
    return ConfigError(f"DP-SGD: {layer} is given a packed sequence, which has no per-example gradients here "
                       "(packing reorders the batch's examples); give it the padded batch instead (and, say, pick "
                       "each sequence's last valid output with torch.gather)")


@register(*KINDS)
class Recurrent(Rule):
    """Records the linear maps of a recurrent layer (see the module docstring); the uses are
    :class:`~.linear.Linear` ones, so this rule itself records none."""

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        if kwargs:
            raise Unsupported("keyword arguments")
        if _packed(args):
            raise packed_refusal(rec.model, args[3] if len(args) > 3 else None)
        x, hx, batch_first = args[0], args[1], args[8]
        rec.input(x if batch_first else x.transpose(0, 1), 3)
        for h in (hx if isinstance(hx, (tuple, list)) else (hx,)):
            if rec.info(h) is not None:
                raise Unsupported("a parameter as the initial state")
            if h.dim() != 3 or h.shape[1] != rec.batch:
                raise Unsupported("the initial state is not a batch")
        return unrolled(KINDS[func], args, _Recorded(rec))


@register(*CELLS)
class Cell(Rule):
    """``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``: the cell's two linear maps, each recorded as a
    :class:`~.linear.Linear` use on the batch (a cell called at every step reuses its weights: the uses add into
    one per-example gradient per weight)."""

    @classmethod
    def record(cls, rec: Recorder, func: Any, args: tuple, kwargs: dict) -> Any:
        if kwargs or len(args) < 4:
            raise Unsupported("keyword arguments")
        for h in (args[1] if isinstance(args[1], (tuple, list)) else (args[1],)):
            if rec.info(h) is not None:
                raise Unsupported("a parameter as the state")
        return cell(CELLS[func], args, _Recorded(rec).linear)


class Unrolled(TorchFunctionMode):
    """Runs recurrent layers step by step (as :func:`unrolled`), e.g. under ``torch.func.vmap``, which cannot
    batch torch's fused recurrent kernels."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._pack_padded_sequence:
            raise packed_refusal(None, None)
        if func in CELLS and not kwargs:
            return cell(CELLS[func], args, F.linear)
        kind = KINDS.get(func)
        if kind is None or kwargs or _packed(args):
            return func(*args, **kwargs)
        return unrolled(kind, args, _Plain())
