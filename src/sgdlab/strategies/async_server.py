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

When a worker has taken its last step it sends ``done`` and its totals (bytes, pushes, steps, clock);
rank 0's :meth:`close` waits until every rank has, then the server thread ends.

A lost worker (killed, its host gone) does not stop the others. Every rank other than 0 bumps a heartbeat
counter on the rendezvous store every :data:`HEARTBEAT_S`; a watchdog thread on rank 0 declares a rank lost
when its counter has not moved for ``lost_after`` seconds (half of ``--timeout``, at least 2 s), or at once
when a message to or from it fails mid-way. The server then goes on without it and says so (a warning on
rank 0, ``lost_workers`` in the log): its pushes that arrived whole stay applied, the round it was in is
lost, a rank-order round no longer waits for it, and the barriers after training do not count it. If every
rank still training is lost after the last ``done`` arrived, the server thread ends when its receive times
out (``--timeout``). Any other server-side failure is re-raised on rank 0. Under ``torchrun`` a worker that
exits with an error makes torchrun stop every worker of the node (torchrun's rule); the server outlives a
lost worker where the launcher lets the others run (e.g. ``srun --kill-on-bad-exit=0``, or processes started
with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set by hand, as the test does).
Messages are moved to the CPU (gloo): on CUDA each push and answer costs a host copy.
"""

from __future__ import annotations

import threading
import time
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.group import TorchGroup, WorkerLostError, first_line

PUSH, DONE = 0, 1
ORDERS = ("arrival", "rank")
HEARTBEAT_S = 0.5
_MADE = [0]  # servers made by this process (every rank makes them in the same order: the store keys agree)


class TorchServer:
    """The server thread (on rank 0) and every rank's side of the protocol. ``apply(g, rank, version)``
    applies one flat pseudo-gradient to the server state; ``snapshot()`` returns (flat parameters, update
    count); both are called under :attr:`lock`."""

    def __init__(self, group: TorchGroup, numel: int, apply: Any, snapshot: Any, order: str = "arrival"):
        self.group = group
        self.rank, self.world, self.numel, self.order = group.rank, group.world, numel, order
        self.apply, self.snapshot = apply, snapshot
        timeout = timedelta(seconds=group.timeout_s)
        self.up = dist.new_group(backend="gloo", timeout=timeout)
        self.down = dist.new_group(backend="gloo", timeout=timeout)
        self.lock = threading.Condition()
        self.send_lock = threading.Lock()
        self.error: BaseException | None = None
        self.training = set(range(self.world))   # ranks that have not sent done (nor been lost)
        self.lost: list[int] = []                 # ranks declared lost, in order
        self.totals: dict[int, list[float]] = {}  # rank -> [bytes, pushes, steps, clock] sent with done
        self.pending: dict[int, tuple[torch.Tensor, int]] = {}  # order=rank: this round's pushes
        self.rounds = 0                           # order=rank: rounds completed
        self.answer0: tuple[torch.Tensor, int] | None = None
        self.lost_after = max(2.0, group.timeout_s / 2)
        self.key = f"{getattr(group, 'key', 'sgdlab')}/async{_MADE[0]}"
        _MADE[0] += 1
        self.store = group.store
        self.stopped = threading.Event()
        self.beat_until = float("inf")
        self.thread: threading.Thread | None = None
        self._hdr = torch.empty(3, dtype=torch.int64)  # kept alive: a receive may still be posted into it
        if self.rank == 0:
            self.thread = threading.Thread(target=self._serve, name="sgdlab-async-server", daemon=True)
            self.thread.start()
            target = self._watch
        else:
            target = self._beat
        self.helper = threading.Thread(target=target, name="sgdlab-async-liveness", daemon=True)
        self.helper.start()

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
                                  f"({first_line(e)})") from None
        return params, int(count.item())

    def close(self, totals: list[float]) -> dict[int, list[float]]:
        """This rank has finished training: tell the server, with this rank's ``totals``; on rank 0 wait for
        every rank's last push and return every finished rank's totals (lost ranks are missing)."""
        if self.rank != 0:
            try:
                dist.send(torch.tensor([self.rank, DONE, 0]), 0, group=self.up, tag=0)
                dist.send(torch.tensor(totals, dtype=torch.float64), 0, group=self.up, tag=4)
            except (RuntimeError, dist.DistBackendError) as e:
                raise WorkerLostError(f"rank {self.rank}: lost the async-diloco server (rank 0) at the end of the "
                                      f"run ({first_line(e)})") from None
            finally:  # keep beating a while: rank 0 may not have read the done yet
                self.beat_until = time.monotonic() + 2 * self.lost_after
            return {self.rank: totals}
        with self.lock:
            self.totals[0] = totals
            self._leave(0)
        assert self.thread is not None
        self.thread.join()
        self.stopped.set()
        if self.error is not None:
            raise self.error
        return dict(self.totals)

    # ---- liveness ----------------------------------------------------------------------------------
    def _beats(self, rank: int) -> int:
        """Rank 0: ``rank``'s heartbeat count so far."""
        return self.store.add(f"{self.key}/beat{rank}", 0)

    def _beat(self) -> None:
        """Ranks other than 0: bump this rank's heartbeat counter until closed."""
        key = f"{self.key}/beat{self.rank}"
        while not self.stopped.wait(HEARTBEAT_S) and time.monotonic() < self.beat_until:
            try:
                self.store.add(key, 1)
            except Exception:  # the store (rank 0's, without torchrun) is gone: the push will say so
                return

    def _watch(self) -> None:
        """Rank 0: declare lost every training rank whose heartbeat has not moved for ``lost_after`` s."""
        seen = {r: (0, time.monotonic()) for r in range(1, self.world)}
        while not self.stopped.wait(HEARTBEAT_S):
            with self.lock:
                ranks = sorted(self.training - {0})
            for r in ranks:
                try:
                    count = self._beats(r)
                except Exception:
                    return
                last, at = seen[r]
                now = time.monotonic()
                if count != last:
                    seen[r] = (count, now)
                elif now - at > self.lost_after:
                    with self.lock:
                        self._declare_lost(r, f"no heartbeat for {now - at:.1f} s")

    def _declare_lost(self, rank: int, why: str) -> None:
        """(under the lock) ``rank`` is gone: go on without it, and say so."""
        if rank not in self.training:
            return
        self.training.discard(rank)
        self.lost.append(rank)
        mark = getattr(self.group, "mark_lost", None)
        if mark is not None:
            mark(rank)
        warnings.warn(f"async-diloco: rank {rank} lost ({why}); the server goes on with ranks "
                      f"{', '.join(map(str, sorted(self.training)))}", RuntimeWarning, stacklevel=1)
        if self.order == "rank":
            self._maybe_complete()
        self.lock.notify_all()

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
            hdr = self._hdr
            while True:
                with self.lock:
                    if not self.training - {0}:
                        return
                try:
                    src = dist.recv(hdr, None, group=self.up, tag=0)
                except (RuntimeError, dist.DistBackendError):
                    if self._all_left_lost():  # nothing more can come: the others are done or gone
                        return
                    raise
                rank, kind, version = (int(x) for x in hdr.tolist())
                if kind == DONE:
                    totals = torch.empty(4, dtype=torch.float64)
                    if self._recv_from(totals, src, 4):
                        with self.lock:
                            self.totals[src] = totals.tolist()
                            self._leave(rank)
                    continue
                g = torch.empty(self.numel)
                if not self._recv_from(g, src, 1):
                    continue
                with self.lock:
                    if src not in self.training:  # declared lost while its message was on the way
                        continue
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
                self.error = WorkerLostError(f"rank 0: the async-diloco server stopped ({first_line(e)}); "
                                             "every rank stops")
                self.lock.notify_all()

    def _recv_from(self, buf: torch.Tensor, src: int, tag: int) -> bool:
        """The rest of ``src``'s message; False (and ``src`` declared lost) if its connection broke."""
        try:
            dist.recv(buf, src, group=self.up, tag=tag)
            return True
        except (RuntimeError, dist.DistBackendError) as e:
            with self.lock:
                self._declare_lost(src, f"its message broke off: {first_line(e)}")
            return False

    def _all_left_lost(self) -> bool:
        """After a receive timed out: whether every rank still training has stopped its heartbeat (then they
        are declared lost and the server ends); a rank whose heartbeat still moves is alive but silent."""
        time.sleep(2 * HEARTBEAT_S)
        with self.lock:
            left = sorted(self.training - {0})
        before = {r: self._beats(r) for r in left}
        time.sleep(4 * HEARTBEAT_S)
        alive = [r for r in left if self._beats(r) != before[r]]
        if alive:
            return False
        with self.lock:
            for r in left:
                self._declare_lost(r, f"nothing received for --timeout {self.group.timeout_s:g} s and no heartbeat")
            return not self.training - {0}

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
            elif r in self.training:  # a lost rank's push stays applied; nobody waits for its answer
                self._answer(r, *answer)
        self.rounds += 1
        self.lock.notify_all()

    def _answer(self, rank: int, params: torch.Tensor, count: int) -> None:
        """Send the server's parameters to ``rank`` (its push stays applied if it is gone)."""
        with self.send_lock:
            try:
                dist.send(params, rank, group=self.down, tag=2)
                dist.send(torch.tensor([count]), rank, group=self.down, tag=3)
            except (RuntimeError, dist.DistBackendError) as e:
                failed = e
            else:
                return
        with self.lock:
            self._declare_lost(rank, f"the answer to its push failed: {first_line(failed)}")

