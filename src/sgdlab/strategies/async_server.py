"""The server of ``async-diloco`` on ``--backend torch``: real asynchrony over point-to-point messages.

Rank 0 runs the server in a background thread next to its own worker; every rank, rank 0 included, is a
worker. Two extra gloo groups carry the traffic, so no thread ever shares one with a collective:

* ``up`` (workers → server): a header ``[rank, kind, version]`` (kind: push or done) with tag 0, then the
  pseudo-gradient as one fp32 vector with tag 1. The server thread receives headers from any rank.
* ``down`` (server → workers): the server's parameters as one fp32 vector (tag 2) and its update count
  (tag 3). Only rank 0 sends on it, one message at a time (``send_lock``).

A worker that pushes waits for the answer to its own push only, never for another worker. Rank 0's own
pushes are applied in-process, under the same lock as the server thread's. Order ``arrival`` (default):
pushes are applied as they arrive. Order ``rank``: the server gathers one round from every worker still
training, applies them in rank order and answers them all (deterministic; the workers then wait for each
other — for tests and reproducible comparisons, e.g. against the simulator).

When a worker has taken its last step it sends ``done``; rank 0's :meth:`close` waits until every rank
has, then the server thread ends. A server-side failure (a peer lost mid-message) is re-raised on rank 0.
Messages are moved to the CPU (gloo): on CUDA each push and answer costs a host copy.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.group import TorchGroup, WorkerLostError

PUSH, DONE = 0, 1
ORDERS = ("arrival", "rank")


class TorchServer:
    """The server thread (on rank 0) and every rank's side of the protocol. ``apply(g, rank, version)``
    applies one flat pseudo-gradient to the server state; ``snapshot()`` returns (flat parameters, update
    count); both are called under :attr:`lock`."""

    def __init__(self, group: TorchGroup, numel: int, apply: Any, snapshot: Any, order: str = "arrival"):
        self.rank, self.world, self.numel, self.order = group.rank, group.world, numel, order
        self.apply, self.snapshot = apply, snapshot
        timeout = timedelta(seconds=group.timeout_s)
        self.up = dist.new_group(backend="gloo", timeout=timeout)
        self.down = dist.new_group(backend="gloo", timeout=timeout)
        self.lock = threading.Condition()
        self.send_lock = threading.Lock()
        self.error: BaseException | None = None
        self.training = set(range(self.world))   # ranks that have not sent done
        self.pending: dict[int, tuple[torch.Tensor, int]] = {}  # order=rank: this round's pushes
        self.rounds = 0                           # order=rank: rounds completed
        self.answer0: tuple[torch.Tensor, int] | None = None
        self.thread: threading.Thread | None = None
        if self.rank == 0:
            self.thread = threading.Thread(target=self._serve, name="sgdlab-async-server", daemon=True)
            self.thread.start()

    # ---- every rank --------------------------------------------------------------------------------
    def push(self, g: torch.Tensor, version: int) -> tuple[torch.Tensor, int]:
        """Send pseudo-gradient ``g`` (flat fp32, CPU) from this rank; returns the server's answer."""
        if self.rank == 0:
            return self._push_local(g, version)
        try:
            dist.send(torch.tensor([self.rank, PUSH, version]), 0, group=self.up, tag=0)
            dist.send(g, 0, group=self.up, tag=1)
            params, count = torch.empty(self.numel), torch.empty(1, dtype=torch.int64)
            dist.recv(params, 0, group=self.down, tag=2)
            dist.recv(count, 0, group=self.down, tag=3)
        except (RuntimeError, dist.DistBackendError) as e:
            raise WorkerLostError(f"rank {self.rank}: lost the async-diloco server (rank 0) during a push "
                                  f"({_first_line(e)})") from None
        return params, int(count.item())

    def close(self) -> None:
        """This rank has finished training: tell the server; on rank 0 wait for every rank's last push."""
        if self.rank != 0:
            dist.send(torch.tensor([self.rank, DONE, 0]), 0, group=self.up, tag=0)
            return
        with self.lock:
            self._leave(0)
        assert self.thread is not None
        self.thread.join()
        if self.error is not None:
            raise self.error

    # ---- rank 0 ------------------------------------------------------------------------------------
    def _push_local(self, g: torch.Tensor, version: int) -> tuple[torch.Tensor, int]:
        with self.lock:
            self._raise_error()
            if self.order == "arrival":
                self.apply(g, 0, version)
                return self.snapshot()
            self.pending[0] = (g, version)
            target = self.rounds + 1
            self._maybe_complete()
            while self.rounds < target and self.error is None:
                self.lock.wait()
            self._raise_error()
            assert self.answer0 is not None
            return self.answer0

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _serve(self) -> None:
        try:
            hdr = torch.empty(3, dtype=torch.int64)
            while True:
                with self.lock:
                    if not self.training - {0}:
                        return
                src = dist.recv(hdr, None, group=self.up, tag=0)
                rank, kind, version = (int(x) for x in hdr.tolist())
                if kind == DONE:
                    with self.lock:
                        self._leave(rank)
                    continue
                g = torch.empty(self.numel)
                dist.recv(g, src, group=self.up, tag=1)
                with self.lock:
                    if self.order == "arrival":
                        self.apply(g, src, version)
                        answer = self.snapshot()
                    else:
                        self.pending[src] = (g, version)
                        self._maybe_complete()
                        continue
                self._answer(src, *answer)
        except BaseException as e:  # noqa: BLE001 — re-raised on rank 0's main thread
            with self.lock:
                self.error = WorkerLostError(f"rank 0: the async-diloco server stopped ({_first_line(e)}); "
                                             "every rank stops")
                self.lock.notify_all()

    def _leave(self, rank: int) -> None:
        """``rank`` has sent done (under the lock)."""
        self.training.discard(rank)
        if self.order == "rank":
            self._maybe_complete()
        self.lock.notify_all()

    def _maybe_complete(self) -> None:
        """order=rank: once every rank still training has pushed, apply the round in rank order and answer."""
        if not self.pending or not self.training <= set(self.pending):
            return
        members = sorted(self.pending)
        for r in members:
            g, version = self.pending[r]
            self.apply(g, r, version)
        self.pending = {}
        answer = self.snapshot()
        for r in members:
            if r == 0:
                self.answer0 = answer
            else:
                self._answer(r, *answer)
        self.rounds += 1
        self.lock.notify_all()

    def _answer(self, rank: int, params: torch.Tensor, count: int) -> None:
        with self.send_lock:
            dist.send(params, rank, group=self.down, tag=2)
            dist.send(torch.tensor([count]), rank, group=self.down, tag=3)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
