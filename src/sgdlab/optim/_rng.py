"""Seeded random draws owned by an optimizer: one ``torch.Generator`` per device.

An optimizer that draws random tensors (probes, tangents, initial velocities) keeps ``states``, a dict
``{str(device): generator state}``, and a ``seed``. :func:`device_generator` gives the device's generator,
seeded with ``seed`` on its first use on that device and otherwise restored from ``states``, and stores its
state back after the draw; the optimizer's ``state_dict`` saves :func:`copy_states` of ``states``, so a run
resumed from a checkpoint draws what the uninterrupted run would have drawn, and the global RNG is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["copy_states", "device_generator", "rademacher"]


@contextmanager
def device_generator(states: dict[str, torch.Tensor], seed: int, device: torch.device | str
                     ) -> Iterator[torch.Generator]:
    """Within the block, the generator of ``device`` (state ``states[str(device)]``, else seeded with
    ``seed``); its state is written back to ``states`` when the block ends without an error."""
    dev = str(device)
    gen = torch.Generator(device=device)
    if dev in states:
        gen.set_state(states[dev])
    else:
        gen.manual_seed(seed)
    yield gen
    states[dev] = gen.get_state()


def copy_states(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``states`` (for ``state_dict`` and ``load_state_dict``)."""
    return {d: s.clone() for d, s in states.items()}


def rademacher(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Independent signs +-1 (probability 1/2 each) shaped like ``p``, of its dtype and device."""
    return torch.randint(0, 2, p.shape, generator=gen, device=p.device).to(p.dtype).mul_(2).sub_(1)
