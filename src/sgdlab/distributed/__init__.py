"""Communication for distributed strategies: groups (simulator and torch.distributed), the network
model, and precision codecs."""

from .compress import PRECISIONS, Codec
from .group import Group, SimGroup, TorchGroup, WorkerLostError
from .network import NetworkModel
from .wrap import Distributed

__all__ = ["Distributed", "Codec", "PRECISIONS", "Group", "SimGroup", "TorchGroup", "WorkerLostError", "NetworkModel"]
