"""``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check_range
from ..models import MLP, SmallCNN
from .base import Task


@dataclass
class DigitsOptions:
    model: str = "mlp"         # "mlp" or "cnn"
    hidden: int = 128          # MLP width
    channels: int = 16         # CNN channels of the first convolution
    val_fraction: float = 0.2  # fixed split (independent of --seed)

    def validate(self) -> None:
        if self.model not in ("mlp", "cnn"):
            raise ConfigError(f"digits option model={self.model!r}; allowed: mlp, cnn")
        check_range("hidden", self.hidden, low=1, integer=True)
        check_range("channels", self.channels, low=1, integer=True)
        check_range("val_fraction", self.val_fraction, low=0, high=1, low_open=True, high_open=True)


class Digits(Task):
    name = "digits"
    description = "scikit-learn's 8x8 digits, MLP or small CNN (metric: validation accuracy)"
    Options = DigitsOptions
    metric = "val_accuracy"
    metric_higher_is_better = True
    num_classes = 10

    def __init__(self, options: DigitsOptions, device: torch.device, data: str | None = None):
        super().__init__(options, device, data)
        from sklearn.datasets import load_digits

        ds = load_digits()
        x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
        y = torch.tensor(ds.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        n_val = int(len(y) * options.val_fraction)
        tr, va = perm[n_val:], perm[:n_val]
        self.x_train, self.y_train = x[tr].to(device), y[tr].to(device)
        self.x_val, self.y_val = x[va].to(device), y[va].to(device)

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def labels(self) -> torch.Tensor:
        return self.y_train

    def info(self) -> dict:
        return {"num_train": self.num_train, "num_val": len(self.y_val)}

    def build_model(self) -> nn.Module:
        o = self.options
        m = MLP(64, o.hidden, 10) if o.model == "mlp" else SmallCNN(o.channels, 10)
        return m.to(self.device)

    def get_batch(self, indices: torch.Tensor | None):
        i = indices.to(self.device)
        return self.x_train[i], self.y_train[i]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def sampled_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        from ..optim.sophia import gnb_loss

        return gnb_loss(model(batch[0])), len(batch[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        logits = model(self.x_val)
        model.train(was_training)
        return {"val_loss": F.cross_entropy(logits, self.y_val).item(),
                "val_accuracy": (logits.argmax(-1) == self.y_val).float().mean().item()}
