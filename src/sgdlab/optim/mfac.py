r"""M-FAC: inverse-Fisher preconditioning from a sliding window of gradients (the dynamic algorithm).

Reference: Elias Frantar, Eldar Kurtic, Dan Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", NeurIPS 2021, arXiv:2107.03356; code: github.com/IST-DASLab/M-FAC (``optim.py``:
``HInvFastUpMulti``, ``MFAC``).

Curvature: the damped empirical Fisher of the last ``m`` gradients (``m = ngrads``; the window starts as
zeros, which count towards ``m``), with all parameters of all groups as one vector of ``d`` entries::

    F = lambda I + (1/m) sum_{i=1..m} g_i g_i^T = lambda I + G^T G / m          G: the m x d window

Step ``t`` with gradient ``g`` (``g + wd * theta`` per group where ``weight_decay > 0``, before ``g`` enters the
window, as in the reference)::

    G[(t - 1) mod m] <- g                                           ring buffer: the oldest row is replaced
    K = G G^T, its row and column (t - 1) mod m <- G g              one pass over the window, O(dm)
    M = K / lambda + m I = C C^T                                    Cholesky, O(m^3)
    u = F^{-1} g = (g - G^T M^{-1} (G g / lambda)) / lambda         Woodbury; O(m^2) + O(dm)
    v <- momentum v + (1 - momentum) u                              (momentum > 0: EMA form)
    theta <- theta - lr * v                                         (v = u without momentum)

The paper unrolls ``m`` Sherman-Morrison updates ``H_k = H_{k-1} - H_{k-1} g_k g_k^T H_{k-1} / (m + g_k^T H_{k-1}
g_k)`` from ``H_0 = I / lambda``; the reference computes their coefficients from an unpivoted LU of exactly ``M``
(its ``D`` is the upper factor, its ``B`` is ``L^{-1} / lambda``). ``M`` is symmetric positive definite (its
eigenvalues are at least ``m``), so that LU is ``L diag(m + D_ii) L^T`` and equals our Cholesky factorisation
``C C^T`` with ``C = L diag(m + D_ii)^{1/2}``: the same dynamic algorithm (one O(dm) dot-product update of ``K``
and an O(m^3) refactorisation per step, an O(dm + m^2) product), with triangular solves in place of the
reference's explicit ``B`` recursion (a loop of ``m`` steps without its CUDA kernel). The result is tested against
a direct solve ``(F)^{-1} g`` in float64 and is invariant to the ring position.

Defaults are the reference ``MFAC`` class's: ``lr=1e-3, ngrads=1024, damp=1e-5, momentum=0, weight_decay=0``
(its model cards for BERT use ``lr=1e-4, damp=1e-6``). Unlike the reference, ``ngrads`` need not be a multiple of
32 nor at most 1024 (those are limits of its CUDA kernel), and TF32 is not switched off globally: the window
products run in the parameters' dtype and the ``m x m`` work in ``coef_dtype`` (default the parameters' dtype;
``"float64"`` for a better-conditioned solve when ``damp`` is small).

Early steps are Newton-like and large: with one non-zero row ``u = g / (lambda + |g|^2 / m)``, about
``m g / |g|^2``; warm the learning rate up or keep it small.

Per group: ``lr``, ``weight_decay``, ``momentum``, ``maximize``. ``ngrads``, ``damp`` and ``coef_dtype`` belong to
the optimizer (the Fisher is over all parameters together) and are saved in ``state_dict()``. Per parameter
state: its columns of the window (``grad_window``, ``m x numel``: 4m B/param in fp32, ~4 KiB/param at m = 1024)
and ``momentum_buffer``; ``K`` and the step count are the optimizer's. A parameter that has a window but no
gradient at a step enters it as a zero gradient (so ``K = G G^T`` stays exact) and is not moved.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, check_range
from ._base import Optimizer, check_flag

__all__ = ["MFAC"]

COEF_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64}


class MFAC(Optimizer):
    """M-FAC (Frantar, Kurtic & Alistarh, NeurIPS 2021, arXiv:2107.03356), the dynamic algorithm.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        ngrads: window size ``m`` (an integer >= 1), shared by all groups.
        damp: damping ``lambda > 0`` of the empirical Fisher, shared by all groups.
        momentum: EMA coefficient in [0, 1) of the preconditioned direction (0: none).
        weight_decay: L2 coefficient added to the gradient before it enters the window.
        coef_dtype: dtype of the ``m x m`` work: None (the parameters'), "float32" or "float64".
        maximize: ascend the objective.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> opt = MFAC(model.parameters(), lr=1e-3, ngrads=64, damp=1e-4)
    """

    def __init__(self, params, lr: float = 1e-3, ngrads: int = 1024, damp: float = 1e-5, momentum: float = 0.0,
                 weight_decay: float = 0.0, coef_dtype: str | None = None, *, maximize: bool = False):
        check_range("ngrads", ngrads, low=1, integer=True)
        check_range("damp", damp, low=0.0, low_open=True)
        if coef_dtype not in COEF_DTYPES:
            raise ConfigError(f"coef_dtype must be one of {tuple(COEF_DTYPES)}, got {coef_dtype!r}")
        self.ngrads, self.damp, self.coef_dtype = ngrads, float(damp), coef_dtype
        self._step = 0
        self._dots: torch.Tensor | None = None  # K = G G^T
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize))

    @classmethod
    def _validate(cls, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_range("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], low=0.0)
        check_flag("maximize", group["maximize"])

    # --- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["mfac"] = {"step": self._step, "ngrads": self.ngrads, "damp": self.damp, "coef_dtype": self.coef_dtype,
                      "dots": None if self._dots is None else self._dots.clone()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("mfac", None)
        if extra is None:
            raise ConfigError("not an MFAC state_dict: the 'mfac' entry is missing")
        super().load_state_dict(state_dict)
        self._step, self.ngrads, self.damp = int(extra["step"]), int(extra["ngrads"]), float(extra["damp"])
        self.coef_dtype = extra["coef_dtype"]
        dots = extra["dots"]
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if dots is not None and first is not None:
            dots = dots.to(device=first.device)
        self._dots = dots

    # --- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One M-FAC step over all groups together; returns the closure's loss."""
        loss = self._evaluate(closure)
        groups = [(group, self._with_grad(group)) for group in self.param_groups]
        live = [(group, p) for group, ps in groups for p in ps]
        if not live:
            return loss
        m, lam = self.ngrads, self.damp
        # every parameter with a window takes part; one without a gradient this step enters as zeros
        members: list[tuple[dict, torch.Tensor, torch.Tensor | None]] = []
        with_grad = {id(p) for _, p in live}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in with_grad:
                    g = -p.grad if group["maximize"] else p.grad
                    if group["weight_decay"] != 0:
                        g = g.add(p, alpha=group["weight_decay"])
                    members.append((group, p, g))
                elif "grad_window" in self.state.get(p, {}):
                    members.append((group, p, None))
        first = members[0][1]
        cdtype = COEF_DTYPES[self.coef_dtype] or first.dtype
        if self._dots is None:
            self._dots = torch.zeros(m, m, dtype=cdtype, device=first.device)
        dots = self._dots
        row = self._step % m
        # write g into row `row` of every window and accumulate G g (the new row of K)
        gg = torch.zeros(m, dtype=cdtype, device=dots.device)
        for _, p, g in members:
            st = self.state[p]
            if "grad_window" not in st:
                st["grad_window"] = torch.zeros(m, p.numel(), dtype=p.dtype, device=p.device)
            win = st["grad_window"]
            if g is None:
                win[row].zero_()
                continue
            flat = g.reshape(-1)
            win[row].copy_(flat)
            gg += (win @ flat).to(device=dots.device, dtype=cdtype)
        dots[row] = gg
        dots[:, row] = gg
        # z = M^{-1} (G g / lambda), M = K / lambda + m I
        system = dots / lam
        system.diagonal().add_(m)
        chol, info = torch.linalg.cholesky_ex(system)
        if info.item() != 0:  # cannot happen in exact arithmetic (eigenvalues >= m); rounding with tiny damp
            raise FloatingPointError(f"M-FAC: the {m}x{m} system K/damp + m I lost positive definiteness in "
                                     f"{cdtype} (damp={lam:g}); use coef_dtype='float64' or a larger damp")
        z = torch.cholesky_solve((gg / lam).unsqueeze(-1), chol).squeeze(-1)
        self._step += 1
        for group, p, g in members:
            if g is None:
                continue
            win = self.state[p]["grad_window"]
            zp = z.to(device=p.device, dtype=p.dtype)
            u = (g.reshape(-1) - win.T @ zp).div_(lam).reshape(p.shape)
            beta = group["momentum"]
            if beta > 0:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = st["momentum_buffer"]
                buf.lerp_(u, 1 - beta)
                u = buf
            p.add_(u, alpha=-group["lr"])
        return loss
