"""Training strategies by name: how workers train and what they exchange.

Only ``single`` (one worker, no communication) exists so far; the distributed strategies (ddp,
localsgd, diloco, streaming-diloco) are tracked in their own issue.
"""

from __future__ import annotations

from ..registry import Registry

registry: Registry[str] = Registry("strategy")
registry.register("single", "single", "one worker, no communication: the plain training loop")
