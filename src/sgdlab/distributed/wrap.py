"""Use a strategy inside your own training loop.

Under torchrun (one worker per process), wrap your model and optimizer and call ``step()`` where you
called ``optimizer.step()``::

    import torch.distributed as dist
    from sgdlab.distributed import Distributed

    model = MyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dd = Distributed(model, opt, "diloco", sync_every=100, outer_lr=0.7)  # rank 0's weights broadcast
    for batch in loader:                      # your data: give each rank its own shard
        loss = loss_fn(model(batch.x), batch.y)
        loss.backward()
        dd.step()                              # all-reduce / local step / outer step, as the strategy says
        opt.zero_grad()
    print(dd.bytes_sent)                       # bytes this worker sent, by the ring cost model

At construction every rank takes rank 0's parameters, buffers and optimizer state (every tensor in
``optimizer.state``: state that mirrors the weights, such as Lookahead's slow weights, must follow them;
the ranks' optimizers must hold state of the same layout, which is checked). Buffers (BatchNorm running
statistics) are then synchronised as the strategy's ``buffers`` option says (default ``average``: their
exact mean, after every ddp step and at every sync of the local strategies).

Without torchrun it runs one worker (nothing is exchanged). Strategy options are those of
``sgdlab list strategies -v``; the strategy's LR multiplier (ddp ``lr_scaling``) is not applied to an
optimizer you built yourself: scale its lr yourself. ``compress="NAME[,key=value...]"`` and
``aggregate="NAME[,key=value...]"`` choose the exchange's compressor and aggregator, and
``byzantine="count=F,attack=NAME[,key=value...]"`` makes the last F ranks send an attack, and
``pre_aggregate="NAME[,key=value...]"`` (``nnm,f=1``) maps the vectors before a robust aggregator
(``sgdlab list compressors|aggregators|attacks -v``). An optimizer that needs a closure (the step protocol,
:mod:`sgdlab.optim.protocol`) gets it through ``dd.step(closure)``.

Client-level DP (localsgd, diloco; :mod:`sgdlab.privacy.client`)::

    dd = Distributed(model, opt, "diloco", sync_every=100, dp="noise=1.0,clip=0.1,unit=client,participation=0.5",
                     seed=0)                       # the same seed on every rank
    ...
    print(dd.epsilon())                            # ε after the rounds completed so far

``target_epsilon=E`` also needs ``steps=`` (the run's length, to calibrate σ for its rounds).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .group import SimGroup, TorchGroup, torchrun_env
from .network import NetworkModel


class Distributed:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str = "ddp", *,
                 network: str | None = None, timeout: float = 60.0, dp: str | None = None, seed: int = 0,
                 steps: int | None = None, compress: str = "fp32", aggregate: str = "mean",
                 byzantine: str | None = None, pre_aggregate: str | None = None,
                 **options: Any):
        from ..exchange import ExchangeSpec
        from ..privacy import ClientDP, DPOptions
        from ..strategies import Worker, create, registry
        from ..strategies import options as strategy_options
        from ..strategies.base import check_client_dp

        device = next(model.parameters()).device
        net = NetworkModel.parse(network)
        opts = strategy_options(strategy, options)  # bad options fail before connecting
        spec = ExchangeSpec(compress, aggregate, byzantine, pre_aggregate)
        attack, _ = spec.attack()
        if attack is not None and attack.data_attack:
            raise ConfigError(f"byzantine={byzantine!r}: {attack.name} changes the Byzantine workers' training data, "
                              "which your loop owns; poison the last ranks' batches yourself, or use `sgdlab run`")
        self.client_dp = None
        if dp is not None:
            dp = DPOptions.parse(dp)
            if dp.unit != "client":
                raise ConfigError("Distributed(dp=...) is client-level DP: add unit=client (for DP-SGD of one "
                                  "worker use sgdlab.privacy.DPSGD in your loop)")
            if dp.target_epsilon is not None and steps is None:
                raise ConfigError("dp target_epsilon needs steps= (the number of steps the loop will take)")
            check_client_dp(registry.get(strategy), opts, spec)
        self.group = TorchGroup(net, device, timeout) if torchrun_env() else SimGroup(1, net)
        self.group.broadcast_([p.data for p in model.parameters()] + [b.data for b in model.buffers()])
        broadcast_optimizer_state(self.group, optimizer)
        if dp is not None:
            self.client_dp = ClientDP.from_options(
                dp, num_clients=self.group.world, sync_every=opts.sync_every,
                steps=steps if steps is not None else opts.sync_every, seed=seed)
        self.strategy = create(strategy, self.group, opts, client_dp=self.client_dp, exchange=spec, seed=seed)
        self.worker = Worker(self.group.local[0], model, optimizer)
        self.strategy.setup([self.worker])
        self.steps = 0

    def epsilon(self) -> float:
        """ε spent so far under client-level DP (at the ``delta`` of ``dp``)."""
        if self.client_dp is None:
            raise RuntimeError("epsilon(): this Distributed was built without dp=")
        return self.client_dp.epsilon(self.steps)

    def step(self, closure: Any = None) -> Any:
        """Replaces ``optimizer.step()``: the strategy's exchange around this worker's optimizer step.
        ``closure`` goes to the optimizer's ``step`` (torch.optim's convention); returns what it returns."""
        self.steps += 1
        self.strategy.after_backward([self.worker], self.steps)
        out = self.worker.optimizer.step() if closure is None else self.worker.optimizer.step(closure)
        self.strategy.after_step([self.worker], self.steps)
        return out

    @property
    def bytes_sent(self) -> float:
        return self.group.bytes_sent

    def eval_model(self) -> nn.Module:
        """The model that represents the run (the last synchronised parameters and buffers for local
        strategies)."""
        return self.strategy.eval_model([self.worker])

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "strategy": self.strategy.state_dict(), "group": self.group.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.strategy.load_state_dict(state["strategy"])
        self.group.load_state_dict(state["group"])

    def close(self) -> None:
        self.group.close()


def broadcast_optimizer_state(group: Any, optimizer: torch.optim.Optimizer) -> None:
    """Make every tensor of ``optimizer.state`` rank 0's (set-up traffic, not counted), after the weights
    were broadcast: state that copies the weights when the optimizer is built (Lookahead's slow weights,
    EMA or SWA copies) would otherwise keep this rank's own initial weights. Raises ``ConfigError`` unless
    every rank's state has the same layout (parameter, name, shape, dtype of each tensor)."""
    if not isinstance(group, TorchGroup):  # one process: nothing to share
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = optimizer.state
    tensors, layout = [], []
    for i, p in enumerate(params):
        for name, v in sorted(state.get(p, {}).items(), key=lambda kv: str(kv[0])):
            if torch.is_tensor(v):
                tensors.append(v)
                layout.append((i, str(name), tuple(v.shape), str(v.dtype)))
    digest = int.from_bytes(hashlib.sha256(repr(layout).encode()).digest()[:7], "big")
    bad = [r for r, (d,) in enumerate(group.gather_ints([digest])) if d != digest]
    if bad:
        raise ConfigError(f"rank {group.rank}: ranks {bad} hold optimizer state of another layout; build the "
                          "same optimizer on every rank before Distributed(...)")
    on_device = [v.data.to(group.device) for v in tensors]  # the tensor itself where it is on the device
    group.broadcast_(on_device)  # (NCCL needs device tensors: a CPU ``step`` counter goes there and back)
    for v, d in zip(tensors, on_device, strict=True):
        if v.device != group.device:
            v.data.copy_(d)
