"""Communication for distributed strategies: groups (simulator and torch.distributed), the network
model, and the wrapper for your own training loop. What is sent is decided by :mod:`sgdlab.exchange`."""

from .group import Group, SimGroup, TorchGroup, WorkerLostError
from .network import NetworkModel
from .wrap import Distributed

__all__ = ["Distributed", "Group", "SimGroup", "TorchGroup", "WorkerLostError", "NetworkModel"]
