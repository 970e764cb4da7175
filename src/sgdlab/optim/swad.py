"""SWAD: dense stochastic weight averaging over an overfit-aware window chosen from validation loss.

Reference: Junbum Cha, Sanghyuk Chun, Kyungjae Lee, Han-Cheol Cho, Seunghyun Park, Yunsung Lee, Sungrae Park,
"SWAD: Domain Generalization by Seeking Flat Minima", NeurIPS 2021, arXiv:2102.08604; the rule is the
authors' ``LossValley`` (khanrc/swad, ``domainbed/swad.py``), ported here.

Dense averaging: after every base step the weights enter a *segment* average (the mean of the iterates
since the last evaluation). At each evaluation of the current weights with validation loss ``l``, the
segment is frozen with ``l`` and its step range, pushed into two queues, ``converge`` (length ``N_s =
n_converge``) and ``smooth`` (length ``N_e = n_tolerance``), and a new segment starts. Then:

* **start**: once ``converge`` is full and its oldest segment has the smallest loss, training has converged
  there; ``threshold = mean(losses in converge) * (1 + r)`` (``r = tolerance_ratio``) and the final
  average is seeded from the queues (the reference's rule for ``N_e > N_s``: the segments of the first
  ``N_e - N_s + 1`` in ``smooth`` after the last one above the threshold; for ``N_e < N_s`` the next
  ``N_s - N_e`` in ``converge``);
* **continue**: at each later evaluation, while ``min(losses in smooth) <= threshold`` the oldest segment in
  ``smooth`` joins the final average (segments before the converge step do not);
* **stop**: once ``min(losses in smooth) > threshold`` the valley is dead and the final average is fixed
  (the reference stops training there; here the run continues and the average no longer changes);
* at the end (and whenever the averaged weights are asked for before that) the segments still in
  ``smooth`` join while the minimum loss of those left stays ``<= threshold``.

The final average is an equal-weight mean of segment averages (``AveragedModel.update_parameters`` of the
reference): as there, it is created holding the converge segment with a count of 0, so the first segment
added replaces it. Defaults (the reference's ``config.yaml``): ``n_converge = 3``, ``n_tolerance = 6``,
``tolerance_ratio = 0.3``; the evaluation period (the reference's ``checkpoint_freq``) is the runner's
``eval_every``. The loss is the evaluation's ``val_loss`` (the reference uses the in-domain validation loss
of the current model). Before convergence :meth:`SWAD.averaged_parameters` is None and the current weights
are evaluated (the reference returns the last segment then, with an error message).

Step protocol (:mod:`sgdlab.optim.protocol`): ``after_evaluate(metrics)`` feeds the loss valley and
``averaged_parameters()`` gives the final average, which the runner swaps into the evaluated model (with
``torch.optim.swa_utils.update_bn`` where the model has BatchNorm; the reference updates BN for 500 steps).
State: the segment and final averages (+8 B/param on the device) and up to ``N_s + N_e`` frozen segments
on the CPU, as in the reference.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import check_range
from ._wrapper import ForwardingWrapper

__all__ = ["SWAD", "swad", "Segment", "LossValley"]


class Segment:
    """Averaged weights (a list of tensors) with a count and the step range and loss they stand for."""

    def __init__(self, weights: list[torch.Tensor], n: int = 0, start: int = -1, end: int = -1,
                 loss: float | None = None):
        self.weights, self.n, self.start, self.end, self.loss = weights, n, start, end, loss

    @torch.no_grad()
    def update(self, weights: list[torch.Tensor], start: int, end: int) -> None:
        """The reference's ``AveragedModel.update_parameters``: copy at count 0, else the running mean."""
        for a, w in zip(self.weights, weights, strict=True):
            w = w.detach().to(a.device)
            if self.n == 0:
                a.copy_(w)
            else:
                a.add_(w - a, alpha=1.0 / (self.n + 1))
        self.n += 1
        if self.n == 1:
            self.start = start
        self.end = end

    def copy(self, device: torch.device | str | None = None) -> Segment:
        return Segment([w.detach().to(device or w.device, copy=True) for w in self.weights], self.n, self.start,
                       self.end, self.loss)

    def to_dict(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "n": self.n, "start": self.start, "end": self.end, "loss": self.loss}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        return cls([w.clone() for w in d["weights"]], int(d["n"]), int(d["start"]), int(d["end"]), d["loss"])


class LossValley:
    """The start/continue/stop rule on frozen segments (the reference's ``LossValley``, without a model)."""

    def __init__(self, n_converge: int, n_tolerance: int, tolerance_ratio: float):
        self.n_converge, self.n_tolerance, self.tolerance_ratio = n_converge, n_tolerance, tolerance_ratio
        self.converge_q: deque[Segment] = deque(maxlen=n_converge)
        self.smooth_q: deque[Segment] = deque(maxlen=n_tolerance)
        self.final: Segment | None = None
        self.converge_step: int | None = None
        self.threshold: float | None = None
        self.dead = False

    def smooth_loss(self, idx: int = 0, q: Iterable[Segment] | None = None) -> float:
        return min(s.loss for s in list(self.smooth_q if q is None else q)[idx:])

    def push(self, frozen: Segment) -> None:
        """One evaluation: ``frozen`` (a segment with its loss) enters the queues and the rule runs."""
        if self.dead:
            return
        self.converge_q.append(frozen)
        self.smooth_q.append(frozen)
        if self.converge_step is None:
            if len(self.converge_q) < self.n_converge:
                return
            losses = [s.loss for s in self.converge_q]
            if losses.index(min(losses)) != 0:
                return
            self.converge_step = self.converge_q[0].end
            self.final = Segment([w.clone() for w in self.converge_q[0].weights])  # count 0, as the reference
            self.threshold = sum(losses) / len(losses) * (1.0 + self.tolerance_ratio)
            if self.n_tolerance < self.n_converge:
                for i in range(self.n_converge - self.n_tolerance):
                    s = self.converge_q[1 + i]
                    self.final.update(s.weights, s.start, s.end)
            elif self.n_tolerance > self.n_converge:
                q = list(self.smooth_q)[: self.n_tolerance - self.n_converge + 1]
                start_idx = 0
                for i in reversed(range(len(q))):
                    if q[i].loss > self.threshold:
                        start_idx = i + 1
                        break
                for s in q[start_idx + 1:]:
                    self.final.update(s.weights, s.start, s.end)
            return
        if self.smooth_q[0].end < self.converge_step:
            return
        if self.smooth_loss() > self.threshold:
            self.dead = True
            return
        s = self.smooth_q[0]
        self.final.update(s.weights, s.start, s.end)

    def final_average(self) -> Segment | None:
        """The final average as the reference's ``get_final_model`` would return it now (None before
        convergence); the queues are not consumed."""
        if self.final is None:
            return None
        if self.dead:
            return self.final
        final, q = self.final.copy(), deque(self.smooth_q)
        if q:
            q.popleft()
        while q and self.smooth_loss(0, q) <= self.threshold:
            s = q.popleft()
            final.update(s.weights, s.start, s.end)
        return final


class SWAD(ForwardingWrapper):
    """SWAD (Cha et al., NeurIPS 2021) around ``base_optimizer``; see the module docstring.

    Args:
        base_optimizer: a constructed ``torch.optim.Optimizer``.
        n_converge: converge-detector window ``N_s``, an integer >= 1 (default 3).
        n_tolerance: loss-smoothing window ``N_e``, an integer >= 1 (default 6).
        tolerance_ratio: ``r`` >= 0 of the threshold ``mean * (1 + r)`` (default 0.3).
    """

    key = "swad"

    def __init__(self, base_optimizer: torch.optim.Optimizer, n_converge: int = 3, n_tolerance: int = 6,
                 tolerance_ratio: float = 0.3):
        super().__init__(base_optimizer)
        check_range("n_converge", n_converge, low=1, integer=True)
        check_range("n_tolerance", n_tolerance, low=1, integer=True)
        check_range("tolerance_ratio", tolerance_ratio, low=0.0)
        self.valley = LossValley(n_converge, n_tolerance, float(tolerance_ratio))
        self.base_steps = 0
        self.segment: Segment | None = None

    def __repr__(self) -> str:
        v = self.valley
        return (f"SWAD(n_converge={v.n_converge}, n_tolerance={v.n_tolerance}, tolerance_ratio={v.tolerance_ratio}, "
                f"base_optimizer={self.base_optimizer!r})")

    # --- the step protocol (besides the base's needs: ForwardingWrapper) ------------------------------
    def after_evaluate(self, metrics: dict[str, float]) -> None:
        """Freeze the current segment with this evaluation's ``val_loss`` into the loss valley."""
        if self.segment is None or self.segment.n == 0:  # nothing averaged since the last evaluation
            return
        frozen = self.segment.copy("cpu")
        frozen.loss = float(metrics["val_loss"])
        self.valley.push(frozen)
        self.segment = None

    def averaged_parameters(self) -> dict[torch.Tensor, torch.Tensor] | None:
        """``{param: its SWAD average}`` once the loss valley has started, else None."""
        final = self.valley.final_average()
        if final is None:
            return None
        return {p: w.to(p.device) for p, w in zip(self._params(), final.weights, strict=True)}

    @property
    def window(self) -> tuple[int, int] | None:
        """The (first, last) base step of the current final average, None before convergence."""
        final = self.valley.final_average()
        return None if final is None else (final.start, final.end)

    # --- algorithm ---------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One base step, then the dense segment average. Returns the base step's result."""
        loss = self.base_optimizer.step(closure)
        self.base_steps += 1
        params = self._params()
        if self.segment is None:
            self.segment = Segment([p.detach().clone() for p in params])
        self.segment.update(params, self.base_steps, self.base_steps)
        self.own = {p: {"swad_segment": w} for p, w in zip(params, self.segment.weights, strict=True)}
        return loss

    def _own_state(self) -> dict[str, Any]:
        v = self.valley
        segments = list(dict.fromkeys([*v.converge_q, *v.smooth_q]))
        index = {id(s): i for i, s in enumerate(segments)}
        return {"base_steps": self.base_steps, "segment_n": 0 if self.segment is None else self.segment.n,
                "segment_range": None if self.segment is None else [self.segment.start, self.segment.end],
                "n_converge": v.n_converge, "n_tolerance": v.n_tolerance, "tolerance_ratio": v.tolerance_ratio,
                "segments": [s.to_dict() for s in segments],
                "converge_q": [index[id(s)] for s in v.converge_q], "smooth_q": [index[id(s)] for s in v.smooth_q],
                "final": None if v.final is None else v.final.to_dict(), "converge_step": v.converge_step,
                "threshold": v.threshold, "dead": v.dead}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        v = self.valley = LossValley(state["n_converge"], state["n_tolerance"], state["tolerance_ratio"])
        segments = [Segment.from_dict(d) for d in state["segments"]]
        v.converge_q.extend(segments[i] for i in state["converge_q"])
        v.smooth_q.extend(segments[i] for i in state["smooth_q"])
        v.final = None if state["final"] is None else Segment.from_dict(state["final"])
        v.converge_step, v.threshold, v.dead = state["converge_step"], state["threshold"], state["dead"]
        self.base_steps = int(state["base_steps"])
        self.segment = None
        if state["segment_n"]:
            params = self._params()
            start, end = state["segment_range"]
            self.segment = Segment([self.own[p]["swad_segment"] for p in params], int(state["segment_n"]), start, end)
            self.own = {p: {"swad_segment": w} for p, w in zip(params, self.segment.weights, strict=True)}


def swad(params: Iterable[Any], base: str = "sgd", n_converge: int = 3, n_tolerance: int = 6,
         tolerance_ratio: float = 0.3, **base_hyperparameters: Any) -> SWAD:
    """SWAD around the sgdlab optimizer registered as ``base``, built with ``base_hyperparameters``.

    >>> model = torch.nn.Linear(4, 2)
    >>> opt = swad(model.parameters(), base="sgd", lr=0.1, momentum=0.9)
    """
    from . import create  # lazy: sgdlab.optim imports this module for its registry

    return SWAD(create(base, params, **base_hyperparameters), n_converge=n_converge, n_tolerance=n_tolerance,
                tolerance_ratio=tolerance_ratio)
