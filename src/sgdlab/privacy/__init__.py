"""Private training: DP-SGD (:mod:`.dpsgd`), client-level DP for local-update strategies (:mod:`.client`)
and privacy accounting (:mod:`.accounting`)."""

from __future__ import annotations

from .accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT, epsilon, noise_multiplier
from .client import ClientDP
from .dpsgd import DPSGD, PoissonSampler, check_model
from .options import DPOptions
from .training import PrivateTraining

__all__ = ["ACCOUNTANTS", "ClientDP", "DEFAULT_ACCOUNTANT", "DPOptions", "DPSGD", "PoissonSampler", "PrivateTraining",
           "check_model", "epsilon", "noise_multiplier"]
