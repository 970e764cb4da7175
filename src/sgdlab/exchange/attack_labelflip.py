"""``labelflip``: a data attack — the Byzantine workers train on flipped labels, y → C − 1 − y, and send
the (honest-looking) update computed from them.

Label flipping as in the Byzantine-robustness benchmarks of Allen-Zhu et al. (ICLR 2021) and
Karimireddy et al. (ICLR 2022), and ByzFL's ``LabelFlipping``. Not omniscient; the vector is not
changed in the exchange. The runner applies :meth:`LabelFlip.poison` to every training batch of the
Byzantine workers (the last ``count`` ranks), on both backends; only classification tasks (those with
``num_classes``: ``digits``, ``logreg``) can be attacked this way.

ByzFL differs: its honest clients also compute gradients on flipped labels (with the model in eval mode)
and the attackers send the mean of those; here the Byzantine workers simply train on their own shard
with flipped labels, every step, as any worker would.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .base import Attack, Slot


class LabelFlip(Attack):
    name = "labelflip"
    description = "data attack: the Byzantine workers train on labels y -> C-1-y and send their update unchanged"
    data_attack = True

    def __call__(self, own: torch.Tensor, honest: list[torch.Tensor] | None, slot: Slot, rank: int) -> torch.Tensor:
        return own

    def check_task(self, task: Any) -> None:
        if getattr(task, "num_classes", None) is None:
            raise ConfigError(f"attack labelflip flips class labels; task {task.name!r} has none (classification "
                              "tasks: digits, logreg)")

    def poison(self, task: Any, batch: Any) -> Any:
        self.check_task(task)
        x, y = batch
        return x, (task.num_classes - 1) - y
