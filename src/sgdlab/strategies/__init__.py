"""Training strategies by name: how workers train and what they exchange (``sgdlab list strategies``).

Each strategy is one file, written once against :class:`sgdlab.distributed.group.Group`, and runs on
the in-process simulator (``--backend sim``) and on ``torch.distributed`` (``--backend torch``).
"""

from __future__ import annotations

from typing import Any

from ..distributed.group import Group
from ..exchange import ExchangeSpec
from ..options import build_options
from ..registry import Registry
from .base import Strategy, Worker
from .ddp import DDP
from .diloco import DiLoCo
from .gossip import Gossip
from .localsgd import LocalSGD
from .monna import MoNNA
from .single import Single
from .streaming_diloco import StreamingDiLoCo

__all__ = ["registry", "create", "options", "Strategy", "Worker"]

registry: Registry[type[Strategy]] = Registry("strategy")
for _cls in (Single, DDP, LocalSGD, DiLoCo, StreamingDiLoCo, Gossip, MoNNA):
    registry.register(_cls.name, _cls, _cls.description)

from .desloc import DESLOC  # noqa: E402  (issue 15, D7)

registry.register(DESLOC.name, DESLOC, DESLOC.description)

from .edit import EDiT  # noqa: E402  (issue 15, D9)

registry.register(EDiT.name, EDiT, EDiT.description)

from .scaled_local import ScaledLocal  # noqa: E402  (issue 15, D10)

registry.register(ScaledLocal.name, ScaledLocal, ScaledLocal.description)

from .async_diloco import AsyncDiLoCo  # noqa: E402  (issue 15, D5)

registry.register(AsyncDiLoCo.name, AsyncDiLoCo, AsyncDiLoCo.description)


def options(name: str, values: dict[str, Any] | None = None):
    """The validated options dataclass of strategy ``name``."""
    return build_options(registry.get(name).Options, dict(values or {}), f"option of strategy {name!r}")


def create(name: str, group: Group, values: Any = None, *, client_dp: Any = None,
           exchange: ExchangeSpec | None = None, seed: int = 0) -> Strategy:
    """Strategy ``name`` over ``group``. ``values``: its options (a dict, or the options dataclass already
    built by :func:`options`); ``client_dp``: a :class:`sgdlab.privacy.ClientDP` for client-level DP;
    ``exchange``: the compressor and aggregator of its exchange (default: its ``precision``, the mean);
    ``seed``: the run's seed (for stages that draw shared randomness)."""
    opts = values if isinstance(values, registry.get(name).Options) else options(name, values)
    strategy = registry.get(name)(opts, group, exchange, seed)
    if client_dp is not None:
        strategy.enable_client_dp(client_dp)
    return strategy
