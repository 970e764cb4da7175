"""Synthetic problems with known optima, for testing optimizers.

* ``quadratic``: least squares ``f(w) = ½·mean((Xw − y)²)`` whose Hessian has eigenvalues log-spaced
  from 1 to ``condition``; ``y = X w*`` (plus optional noise), so the optimum is known exactly.
* ``logreg``: L2-regularised logistic regression on non-separable synthetic data; the optimum is found
  once by Newton's method in float64.
* ``rosenbrock``: ``(a − x)² + b·(y − x²)²`` from ``(x0, y0)``; optimum ``(a, a²)``. No data: the batch
  size is ignored.

``evaluate`` reports ``optimality_gap`` (training objective minus its minimum, the headline metric) and
``dist_to_opt`` (Euclidean distance of the weights to the optimum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check_range
from .base import Task


class _Linear(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class _SyntheticRegression(Task):
    metric = "optimality_gap"

    def _finish(self, x: torch.Tensor, y: torch.Tensor, n_train: int, w_opt: torch.Tensor) -> None:
        self.x_train, self.y_train = x[:n_train].float().to(self.device), y[:n_train].float().to(self.device)
        self.x_val, self.y_val = x[n_train:].float().to(self.device), y[n_train:].float().to(self.device)
        self.x64, self.y64 = x[:n_train], y[:n_train]
        self.w_opt = w_opt
        self.f_opt = float(self.objective64(w_opt))

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    def build_model(self) -> nn.Module:
        return _Linear(self.x_train.shape[1]).to(self.device)

    def get_batch(self, indices: torch.Tensor | None):
        i = indices.to(self.device)
        return self.x_train[i], self.y_train[i]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        w = model.weight.detach().double().cpu()
        out = {"val_loss": float(self.loss(model, (self.x_val, self.y_val))),
               "optimality_gap": float(self.objective64(w)) - self.f_opt,
               "dist_to_opt": float((w - self.w_opt).norm())}
        return out


@dataclass
class QuadraticOptions:
    dim: int = 50
    condition: float = 100.0   # ratio of the largest to the smallest Hessian eigenvalue
    num_examples: int = 2000   # training examples (plus 20% for validation)
    noise: float = 0.0         # label noise std; 0 makes the optimum interpolate every example
    data_seed: int = 0

    def validate(self) -> None:
        check_range("dim", self.dim, low=1, integer=True)
        check_range("condition", self.condition, low=1)
        check_range("num_examples", self.num_examples, low=2, integer=True)
        check_range("noise", self.noise, low=0)


class Quadratic(_SyntheticRegression):
    name = "quadratic"
    description = "ill-conditioned least squares with a known optimum (metric: optimality gap)"
    Options = QuadraticOptions

    def __init__(self, options: QuadraticOptions, device: torch.device, data: str | None = None):
        super().__init__(options, device, data)
        o = options
        g = torch.Generator().manual_seed(o.data_seed)
        n = o.num_examples + max(o.num_examples // 5, 1)
        eig = torch.logspace(0, torch.log10(torch.tensor(o.condition, dtype=torch.float64)).item(), o.dim,
                             dtype=torch.float64)
        x = torch.randn(n, o.dim, generator=g, dtype=torch.float64) * eig.sqrt()
        w_star = torch.randn(o.dim, generator=g, dtype=torch.float64)
        y = x @ w_star + o.noise * torch.randn(n, generator=g, dtype=torch.float64)
        xt, yt = x[:o.num_examples], y[:o.num_examples]
        w_opt = torch.linalg.lstsq(xt, yt.unsqueeze(1)).solution.squeeze(1)
        self._finish(x, y, o.num_examples, w_opt)

    def objective64(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.x64 @ w - self.y64) ** 2).mean()

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return 0.5 * ((model(x) - y) ** 2).mean()

    def sampled_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        """Squared loss is the Gaussian likelihood with unit variance: sample y ~ N(f(x), 1)."""
        f = model(batch[0])
        y_hat = f.detach() + torch.randn_like(f)
        return 0.5 * ((f - y_hat) ** 2).mean(), len(f)


@dataclass
class LogRegOptions:
    dim: int = 20
    num_examples: int = 2000
    l2: float = 1e-3
    data_seed: int = 0

    def validate(self) -> None:
        check_range("dim", self.dim, low=1, integer=True)
        check_range("num_examples", self.num_examples, low=2, integer=True)
        check_range("l2", self.l2, low=0, low_open=True)


class LogReg(_SyntheticRegression):
    name = "logreg"
    description = "L2-regularised logistic regression with a known optimum (metric: optimality gap)"
    Options = LogRegOptions
    num_classes = 2  # labels 0.0 / 1.0

    def __init__(self, options: LogRegOptions, device: torch.device, data: str | None = None):
        super().__init__(options, device, data)
        o = options
        g = torch.Generator().manual_seed(o.data_seed)
        n = o.num_examples + max(o.num_examples // 5, 1)
        x = torch.randn(n, o.dim, generator=g, dtype=torch.float64)
        w_true = torch.randn(o.dim, generator=g, dtype=torch.float64)
        y = torch.bernoulli(torch.sigmoid(x @ w_true), generator=g)
        self.x64, self.y64 = x[:o.num_examples], y[:o.num_examples]
        w = torch.zeros(o.dim, dtype=torch.float64)
        for _ in range(50):  # Newton's method; the objective is strongly convex
            p = torch.sigmoid(self.x64 @ w)
            grad = self.x64.t() @ (p - self.y64) / len(p) + o.l2 * w
            hess = (self.x64.t() * (p * (1 - p))) @ self.x64 / len(p) + o.l2 * torch.eye(o.dim, dtype=w.dtype)
            w = w - torch.linalg.solve(hess, grad)
            if grad.norm() < 1e-13:
                break
        self._finish(x, y, o.num_examples, w)

    @property
    def labels(self) -> torch.Tensor:
        return self.y_train.long()

    def objective64(self, w: torch.Tensor) -> torch.Tensor:
        z = self.x64 @ w
        return F.binary_cross_entropy_with_logits(z, self.y64) + 0.5 * self.options.l2 * w.dot(w)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        w = model.weight
        return F.binary_cross_entropy_with_logits(model(x), y) + 0.5 * self.options.l2 * w.dot(w)

    def sampled_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        """Labels sampled from the model's own Bernoulli; the L2 term has no sampled part."""
        z = model(batch[0])
        y_hat = torch.bernoulli(torch.sigmoid(z.detach()))
        return F.binary_cross_entropy_with_logits(z, y_hat), len(z)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = super().evaluate(model)
        out["val_accuracy"] = float(((model(self.x_val) > 0).float() == self.y_val).float().mean())
        return out


@dataclass
class RosenbrockOptions:
    a: float = 1.0
    b: float = 100.0
    x0: float = -1.5
    y0: float = 2.0


class Rosenbrock(Task):
    name = "rosenbrock"
    description = "the 2-D Rosenbrock function, optimum (a, a^2) (metric: optimality gap; no data)"
    Options = RosenbrockOptions
    metric = "optimality_gap"

    @property
    def num_train(self) -> None:
        return None

    def build_model(self) -> nn.Module:
        m = nn.Module()
        m.xy = nn.Parameter(torch.tensor([self.options.x0, self.options.y0]))
        return m.to(self.device)

    def get_batch(self, indices: torch.Tensor | None):
        return None

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        a, b = self.options.a, self.options.b
        x, y = model.xy[0], model.xy[1]
        return (a - x) ** 2 + b * (y - x * x) ** 2

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        f = float(self.loss(model, None))
        opt = torch.tensor([self.options.a, self.options.a ** 2], device=self.device)
        return {"val_loss": f, "optimality_gap": f, "dist_to_opt": float((model.xy - opt).norm())}
