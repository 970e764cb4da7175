"""Communication groups: the one interface every strategy talks to, with two backends.

* :class:`SimGroup` holds all N workers in this process (deterministic; reductions in rank order).
* :class:`TorchGroup` holds one worker per process and uses ``torch.distributed`` (gloo on CPU, NCCL on
  CUDA), started by ``torchrun``.

Both provide the sum, the gather and the all-to-all (:meth:`Group.scatter_chunks`) of payload tensors
that :class:`sgdlab.exchange.Exchange` builds every exchange from, point-to-point messages to graph
neighbours (:meth:`Group.exchange_neighbors`, for decentralised strategies), count the bytes each worker sends
(with the ring cost model of :mod:`sgdlab.distributed.network`) and keep each worker's simulated clock.
Measurement-only traffic (the clock maximum, logged losses) is not counted.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import CheckpointError, ConfigError, SgdlabError
from .network import NetworkModel


class WorkerLostError(SgdlabError, RuntimeError):
    """A peer process stopped answering a collective."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


class Group:
    """Collectives over the workers of a run. ``local`` lists the ranks that live in this process."""

    world: int
    local: list[int]

    def __init__(self, network: NetworkModel):
        self.network = network
        self.bytes_sent = 0.0               # cumulative, per worker (every worker sends the same)
        self.clocks = [0.0 for _ in self.local]  # simulated seconds, per local worker
        self.comm_time = 0.0                # simulated seconds spent in collectives

    # ---- backend primitives ------------------------------------------------------------------------
    def _sum(self, flats: list[torch.Tensor]) -> torch.Tensor:
        """The sum over all workers of one tensor per local worker (sim: in rank order)."""
        raise NotImplementedError

    def _gather(self, payloads: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        raise NotImplementedError

    def _scatter(self, chunks: list[list[list[torch.Tensor]]]) -> list[list[list[torch.Tensor]]]:
        raise NotImplementedError

    def max_clock(self) -> float:
        raise NotImplementedError

    def mean_vector(self, values: list[float]) -> list[float]:
        """Element-wise mean over processes of a vector that is already a mean over this process's
        workers (measurement only: logged losses, stop requests)."""
        raise NotImplementedError

    # ---- collectives (called by sgdlab.exchange.Exchange) ------------------------------------------
    def sum_payloads(self, payloads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Element-wise sum over all workers of each payload tensor (``payloads[i]``: local worker i's)."""
        if len(payloads) != len(self.local):
            raise ValueError(f"expected payloads of {len(self.local)} local workers, got {len(payloads)}")
        return [self._sum([p[j] for p in payloads]) for j in range(len(payloads[0]))]

    def gather_payloads(self, payloads: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Every worker's payload tensors, in rank order."""
        if len(payloads) != len(self.local):
            raise ValueError(f"expected payloads of {len(self.local)} local workers, got {len(payloads)}")
        return self._gather(payloads)

    def scatter_chunks(self, chunks: list[list[list[torch.Tensor]]]) -> list[list[list[torch.Tensor]]]:
        """The exchange of a reduce-scatter of payloads (an all-to-all): ``chunks[i][j]`` are local worker
        i's payload tensors for rank j (chunk j has the same shapes on every worker; sizes may differ
        between chunks, and may be 0). Returns, per local worker, the N copies of its own chunk in rank
        order: ``out[i][s]`` is rank s's chunk ``local[i]``. The reduction is the caller's (a compressor
        decodes and averages what it receives); bytes are charged by the caller."""
        if len(chunks) != len(self.local):
            raise ValueError(f"expected chunks of {len(self.local)} local workers, got {len(chunks)}")
        if any(len(c) != self.world for c in chunks):
            raise ValueError(f"expected one chunk per rank ({self.world}) from every local worker")
        return self._scatter(chunks)

    def mean_exact_(self, per_worker: list[list[torch.Tensor]]) -> float:
        """Replace every local worker's tensors by their mean over all workers, in their own dtype, outside
        the exchange (no compressor, no aggregator): one ring all-reduce, charged by the tensors' bytes.
        For model state that must stay exact (BatchNorm running statistics). Returns the completion time."""
        flats = [_flat_by_dtype(ts) for ts in per_worker]
        totals = self.sum_payloads(flats)
        for ts in per_worker:
            _unflat_by_dtype([t / self.world for t in totals], ts)
        return self.charge(*self.network.all_reduce(_nbytes(flats[0]), self.world))

    def broadcast_exact_(self, per_worker: list[list[torch.Tensor]]) -> float:
        """Replace every local worker's tensors by rank 0's (counted, unlike the set-up :meth:`broadcast_`):
        one broadcast, charged by the tensors' bytes. Returns the completion time."""
        if len(per_worker) != len(self.local):
            raise ValueError(f"expected tensors of {len(self.local)} local workers, got {len(per_worker)}")
        flats = self._broadcast([_flat_by_dtype(ts) for ts in per_worker])
        for ts in per_worker:
            _unflat_by_dtype(flats, ts)
        return self.charge(*self.network.broadcast(_nbytes(flats), self.world))

    def _broadcast(self, payloads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Rank 0's payload tensors (``payloads[i]``: local worker i's)."""
        raise NotImplementedError

    # ---- point-to-point: neighbour exchange (decentralised strategies, e.g. gossip) ------------------
    def exchange_neighbors(self, tensors: list[list[torch.Tensor]], sends_to: list[list[int]]
                           ) -> list[dict[int, list[torch.Tensor]]]:
        """Point-to-point messages along a directed graph: rank r sends its tensors, as one message, to
        every rank in ``sends_to[r]`` (the whole graph, the same on every process; distinct ranks, no
        self-loops). ``tensors[i]``: local worker i's tensors (the same shapes on every worker). Returns, per
        local worker, ``{sender rank: its tensors}`` for every rank that sends to it.

        Cost (:meth:`NetworkModel.send`): a worker sends its d_r messages of S bytes one after another on its
        own link, in τ_r = d_r·(α + 8S/β); receiving overlaps sending. A worker waits for its senders only,
        not for the slowest worker: with c the clocks at the start, rank r's exchange ends at
        ``max(c_r + τ_r, max over senders s of c_s + τ_s)`` (a message has arrived once its sender has sent
        all of its messages). ``bytes_sent`` grows by the mean over workers of d_r·S (d·S on a regular
        graph), ``comm_time`` by the largest τ_r. The senders' clocks travel with the messages, uncounted."""
        world = self.world
        if len(tensors) != len(self.local):
            raise ValueError(f"expected tensors of {len(self.local)} local workers, got {len(tensors)}")
        if len(sends_to) != world:
            raise ValueError(f"expected sends_to for {world} ranks, got {len(sends_to)}")
        for r, dsts in enumerate(sends_to):
            if len(set(dsts)) != len(dsts) or any(not 0 <= d < world or d == r for d in dsts):
                raise ValueError(f"sends_to[{r}]={dsts}: ranks must be distinct, in [0, {world}) and not {r}")
        recv_from = [[s for s in range(world) if r in sends_to[s]] for r in range(world)]
        got = self._p2p(tensors, sends_to, recv_from)
        nbytes = sum(t.numel() * t.element_size() for t in tensors[0])
        costs = [self.network.send(nbytes, len(d)) for d in sends_to]
        self.bytes_sent += sum(c[0] for c in costs) / world
        self.comm_time += max(c[1] for c in costs)
        self.clocks = [max([c + costs[r][1]] + [got[i][s][1] + costs[s][1] for s in recv_from[r]])
                       for i, (r, c) in enumerate(zip(self.local, self.clocks, strict=True))]
        return [{s: ts for s, (ts, _) in g.items()} for g in got]

    def _p2p(self, tensors: list[list[torch.Tensor]], sends_to: list[list[int]], recv_from: list[list[int]]
             ) -> list[dict[int, tuple[list[torch.Tensor], float]]]:
        """Per local worker, ``{sender: (its tensors, its clock before the exchange)}``."""
        raise NotImplementedError

    def charge(self, sent: float, seconds: float, wait: bool = True) -> float:
        """Count a collective that sends ``sent`` bytes per worker and takes ``seconds``; it starts when
        the slowest worker arrives. Returns its completion time; ``wait`` advances the clocks to it."""
        self.bytes_sent += sent
        self.comm_time += seconds
        done = self.max_clock() + seconds
        if wait:
            self.wait_until(done)
        return done

    # ---- simulated time ----------------------------------------------------------------------------
    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Make every process's ``tensors`` equal to rank 0's (set-up traffic, not counted)."""

    def advance(self, i: int, seconds: float) -> None:
        self.clocks[i] += seconds

    def wait_until(self, t: float) -> None:
        self.clocks = [max(c, t) for c in self.clocks]

    def sim_time(self) -> float:
        return self.max_clock()

    def state_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "clocks": list(self.clocks), "comm_time": self.comm_time}

    def load_state_dict(self, st: dict) -> None:
        self.bytes_sent, self.clocks, self.comm_time = st["bytes_sent"], list(st["clocks"]), st["comm_time"]

    def close(self, clean: bool = True) -> None:
        pass

    # ---- what the runner asks of a backend (defaults: every worker in this one process) --------------
    #: whether the run directory must be named (--out): every process writes into the same one
    needs_out = False
    #: whether a checkpoint keeps the one it replaces, so that processes that checkpoint independently
    #: can agree on a step all of them have (:meth:`agreed_step`)
    keeps_previous_checkpoint = False

    @property
    def is_lead(self) -> bool:
        """Whether this process writes the run's shared files (config, metrics, summary): rank 0's does."""
        return self.local[0] == 0

    def barrier(self) -> None:
        """Wait until every process gets here (one process: nothing to wait for)."""

    def check_same(self, fingerprint: str) -> None:
        """Raise unless every process runs the configuration with this fingerprint (one process: it does)."""

    def stops_at_once(self, requested: bool) -> bool:
        """Whether a stop request (Ctrl-C, SIGTERM) that this process has seen ends the run at this step.
        One process stops at once; processes that must stop together vote at logging steps instead."""
        return requested

    def stop_vote(self, requested: bool) -> float:
        """This process's stop vote, averaged with the logged losses at a logging step (> 0: all stop)."""
        return 0.0

    def agreed_step(self, steps: list[int]) -> int | None:
        """The newest of ``steps`` (this process's checkpoint steps) that every process has; None if none."""
        return max(steps, default=None)


def _dtypes(tensors: list[torch.Tensor]) -> list[torch.dtype]:
    return sorted({t.dtype for t in tensors}, key=str)


def _flat_by_dtype(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One flat tensor per dtype (in a fixed order), holding ``tensors`` of that dtype in order."""
    return [torch.cat([t.detach().reshape(-1) for t in tensors if t.dtype == d]) for d in _dtypes(tensors)]


def _unflat_by_dtype(flats: list[torch.Tensor], tensors: list[torch.Tensor]) -> None:
    for d, flat in zip(_dtypes(tensors), flats, strict=True):
        offset = 0
        for t in tensors:
            if t.dtype == d:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _nbytes(flats: list[torch.Tensor]) -> int:
    return sum(f.numel() * f.element_size() for f in flats)


class SimGroup(Group):
    """All ``world`` workers in this process."""

    def __init__(self, world: int, network: NetworkModel):
        self.world, self.local = world, list(range(world))
        super().__init__(network)

    def _sum(self, flats):
        total = flats[0].clone()
        for f in flats[1:]:
            total += f
        return total

    def _gather(self, payloads):
        return [[t.clone() for t in p] for p in payloads]

    def _scatter(self, chunks):
        return [[[t.clone() for t in chunks[src][dst]] for src in range(self.world)] for dst in self.local]

    def _broadcast(self, payloads):
        return payloads[0]  # local worker 0 is rank 0

    def _p2p(self, tensors, sends_to, recv_from):
        return [{s: ([t.clone() for t in tensors[s]], self.clocks[s]) for s in recv_from[r]} for r in self.local]

    def max_clock(self) -> float:
        return max(self.clocks)

    def mean_vector(self, values: list[float]) -> list[float]:
        return list(values)


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun, else None."""
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    except (KeyError, ValueError):
        return None


_GROUPS_MADE = [0]  # default process groups this process has created (one per run: compare runs several)


def _init_process_group(backend: str, timeout: timedelta, env: tuple[int, int, int]) -> None:
    """The default process group. The first group of a torchrun worker's first attempt uses torchrun's store
    as it is; a later one (a torchrun restart, ``TORCHELASTIC_RESTART_COUNT`` > 0, or the next run of a
    ``compare``/``frontier`` set in the same processes) uses it under a prefix naming the attempt and the
    group: torchrun keeps its store, so without a prefix a worker reads the peer addresses of an earlier group
    and fails to connect (torch issue #135712). Every rank trains the same runs in the same order, so the
    prefixes agree."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
    made = _GROUPS_MADE[0]
    _GROUPS_MADE[0] += 1
    if attempt == "0" and made == 0:
        dist.init_process_group(backend, timeout=timeout)
        return
    store, rank, world = next(dist.rendezvous("env://", rank=env[0], world_size=env[1], timeout=timeout))
    prefix = f"sgdlab/attempt{attempt}" + (f"/group{made}" if made else "")
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world,
                            timeout=timeout)


def neighbour_exchange(ops: list) -> None:
    """Post the point-to-point operations ``ops`` together and wait for all of them."""
    for work in dist.batch_isend_irecv(ops):
        work.wait()


class TorchGroup(Group):
    """One worker per process over ``torch.distributed`` (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, network: NetworkModel, device: torch.device, timeout_s: float = 60.0):
        env = torchrun_env()
        if env is None:
            raise ConfigError("--backend torch must be started by torchrun, e.g. "
                              "`torchrun --nproc-per-node 4 -m sgdlab run --backend torch ...` "
                              "(RANK/WORLD_SIZE are not set)")
        self.rank, world, _ = env
        self.owns = not dist.is_initialized()  # a caller's own process group is left open
        if self.owns:
            _init_process_group("nccl" if device.type == "cuda" else "gloo", timedelta(seconds=timeout_s), env)
        self.world, self.local = dist.get_world_size(), [self.rank]
        self.device, self.timeout_s = device, timeout_s
        super().__init__(network)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as e:  # a peer died or timed out
            first = first_line(e)
            lost = self._lost_ranks()
            who = f"lost rank {', '.join(map(str, lost))}" if lost else "lost contact with a peer process"
            raise WorkerLostError(f"rank {self.rank}: {who} during {getattr(fn, '__name__', 'a collective')} "
                                  f"({first}); every rank stops. Resume from the last checkpoint with --resume."
                                  ) from None

    @property
    def store(self) -> dist.Store:
        """The rendezvous store of the default process group (torchrun's agent's, or rank 0's without it)."""
        return dist.distributed_c10d._get_default_store()

    def _lost_ranks(self, wait_s: float = 5.0) -> list[int]:
        """Ranks that do not check in on the rendezvous store within ``wait_s`` (survivors of a failure
        all check in; the store lives in torchrun's agent, not in a worker). Empty if unknown."""
        try:
            store = self.store
            store.set(f"sgdlab/alive/{self.rank}", "1")
            keys = {r: f"sgdlab/alive/{r}" for r in range(self.world)}
            deadline = time.monotonic() + min(wait_s, self.timeout_s)
            while time.monotonic() < deadline:
                missing = [r for r, k in keys.items() if not store.check([k])]
                if not missing:
                    return []
                time.sleep(0.2)
            return missing
        except Exception:  # the store itself may be gone; then we cannot tell
            return []

    def _sum(self, flats):
        total = flats[0].clone()
        self._call(dist.all_reduce, total, op=dist.ReduceOp.SUM)
        return total

    def _gather(self, payloads):
        (mine,) = payloads
        out: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        for t in mine:
            bufs = [torch.empty_like(t) for _ in range(self.world)]
            self._call(dist.all_gather, bufs, t.contiguous())
            for r in range(self.world):
                out[r].append(bufs[r])
        return out

    def _scatter(self, chunks):
        """One ``all_to_all_single`` per payload tensor (uneven splits; gloo and NCCL both have it)."""
        (mine,) = chunks
        own = mine[self.rank]  # what every rank sends here has the shapes of our own chunk
        out: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        for k, like in enumerate(own):
            send = torch.cat([mine[j][k].reshape(-1) for j in range(self.world)])
            recv = torch.empty(like.numel() * self.world, dtype=like.dtype, device=like.device)
            self._call(dist.all_to_all_single, recv, send, output_split_sizes=[like.numel()] * self.world,
                       input_split_sizes=[mine[j][k].numel() for j in range(self.world)])
            for src, part in enumerate(recv.view(self.world, like.numel())):
                out[src].append(part.view_as(like))
        return [out]

    def _broadcast(self, payloads):
        (mine,) = payloads
        for t in mine:
            self._call(dist.broadcast, t, src=0)
        return mine

    def _p2p(self, tensors, sends_to, recv_from):
        """Every send and receive posted at once (``batch_isend_irecv``, gloo and NCCL), then all waited on:
        no order of peers can deadlock. One tag per tensor; the sender's clock goes last."""
        (mine,) = tensors
        outgoing = [t.contiguous() for t in mine]
        outgoing.append(torch.tensor([self.clocks[0]], dtype=torch.float64, device=self.device))
        ops, bufs = [], {}
        for dst in sends_to[self.rank]:
            ops += [dist.P2POp(dist.isend, t, dst, tag=k) for k, t in enumerate(outgoing)]
        for src in recv_from[self.rank]:
            bufs[src] = [torch.empty_like(t) for t in outgoing]
            ops += [dist.P2POp(dist.irecv, b, src, tag=k) for k, b in enumerate(bufs[src])]
        if ops:
            self._call(neighbour_exchange, ops)
        return [{s: (b[:-1], float(b[-1].item())) for s, b in bufs.items()}]

    def max_clock(self) -> float:
        t = torch.tensor([self.clocks[0]], dtype=torch.float64, device=self.device)
        self._call(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def mean_vector(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._call(dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return (t / self.world).tolist()

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self._call(dist.broadcast, t, src=0)

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of ``len(values)`` integers (measurement/control traffic)."""
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        bufs = [torch.empty_like(mine) for _ in range(self.world)]
        self._call(dist.all_gather, bufs, mine)
        return [b.tolist() for b in bufs]

    def check_same(self, fingerprint: str) -> None:
        """Raise unless every rank runs the same configuration."""
        mine = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8, device=self.device)
        bufs = [torch.empty_like(mine) for _ in range(self.world)]
        self._call(dist.all_gather, bufs, mine)
        bad = [r for r, b in enumerate(bufs) if not torch.equal(b, mine)]
        if bad:
            raise ConfigError(f"rank {self.rank}: ranks {bad} run a different configuration; every rank must "
                              "be started with the same flags")

    def barrier(self) -> None:
        self._call(dist.barrier)

    def close(self, clean: bool = True) -> None:
        if self.owns and dist.is_initialized():
            if clean:  # tear down together: a rank leaving while a peer still talks can abort the peer
                self._call(dist.barrier)
            dist.destroy_process_group()

    needs_out = True
    keeps_previous_checkpoint = True

    def stops_at_once(self, requested: bool) -> bool:
        return False  # every rank must stop at the same step: the request is voted on (stop_vote)

    def stop_vote(self, requested: bool) -> float:
        return float(requested)

    def agreed_step(self, steps: list[int]) -> int | None:
        """The newest step that every rank has (a rank that died between the others' checkpoint and its
        own leaves them one checkpoint apart; each keeps two)."""
        mine = sorted(steps, reverse=True)[:2]
        gathered = self.gather_ints(mine + [-1] * (2 - len(mine)))
        common = set(gathered[0]).intersection(*gathered[1:]) - {-1}
        if not common:
            raise CheckpointError(f"rank {self.rank}: the ranks' checkpoints share no step (steps per rank: "
                                  f"{[[s for s in st if s >= 0] for st in gathered]}); cannot resume consistently")
        return max(common)


class IndependentTorchGroup(TorchGroup):
    """A :class:`TorchGroup` whose processes never wait for each other during training (asynchronous
    strategies): measurement stays local — the logged losses are this process's worker's, the clock is its
    own, a stop request stops this process — and a run cannot resume (its processes checkpoint at different
    moments of the shared state). The strategy's own messages are its only traffic.

    A rank may be lost mid-run (killed, or its host gone) while the others go on: rank 0's strategy marks it
    (:meth:`mark_lost`), and the barriers after training wait only for the ranks not lost — they are counted
    on the rendezvous store rather than by a collective, which a dead peer would never join."""

    _made = [0]  # groups of this kind made by this process (every rank makes them in the same order)

    def __init__(self, network: NetworkModel, device: torch.device, timeout_s: float = 60.0):
        super().__init__(network, device, timeout_s)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
        self.key = f"sgdlab/independent/attempt{attempt}/{IndependentTorchGroup._made[0]}"
        IndependentTorchGroup._made[0] += 1
        self.lost: set[int] = set()
        self._barriers = 0

    def mark_lost(self, rank: int) -> None:
        """Rank 0: ``rank`` is gone; later barriers do not wait for it."""
        self.lost.add(rank)
        self.store.set(f"{self.key}/lost", ",".join(map(str, sorted(self.lost))))

    def _lost_now(self) -> set[int]:
        if self.rank == 0 or not self.store.check([f"{self.key}/lost"]):
            return set(self.lost)
        return {int(r) for r in self.store.get(f"{self.key}/lost").decode().split(",") if r}

    def barrier(self) -> None:
        """Wait (up to the timeout) until every rank not lost has reached this barrier. Rank 0 also waits
        until they have all seen it complete: without torchrun rank 0 hosts the store they poll."""
        key = f"{self.key}/barrier{self._barriers}"
        self._barriers += 1
        try:
            self._count_to(f"{key}/in", "did not reach the end of the run")
            self.store.add(f"{key}/seen", 1)
            if self.rank == 0:
                self._count_to(f"{key}/seen", "did not leave the end of the run", add=False)
        except WorkerLostError:
            raise
        except (RuntimeError, dist.DistError) as e:
            raise WorkerLostError(f"rank {self.rank}: lost the rendezvous store at the end of the run "
                                  f"({first_line(e)})") from None

    def _count_to(self, key: str, what: str, add: bool = True) -> None:
        count = self.store.add(key, 1 if add else 0)
        deadline = time.monotonic() + self.timeout_s
        while count < self.world - len(self._lost_now()):
            if time.monotonic() > deadline:
                raise WorkerLostError(f"rank {self.rank}: {self.world - count} rank(s) {what} within --timeout "
                                      f"{self.timeout_s:g} s")
            time.sleep(0.05)
            count = self.store.add(key, 0)

    def close(self, clean: bool = True) -> None:
        if self.owns and dist.is_initialized():
            if clean:
                self.barrier()
            dist.destroy_process_group()

    def max_clock(self) -> float:
        return self.clocks[0]

    def mean_vector(self, values: list[float]) -> list[float]:
        return list(values)

    def stops_at_once(self, requested: bool) -> bool:
        return requested

    def stop_vote(self, requested: bool) -> float:
        return 0.0

    def agreed_step(self, steps: list[int]) -> int | None:
        raise CheckpointError("an asynchronous run on --backend torch cannot resume: its processes checkpoint at "
                              "different moments, so no checkpoint step is consistent across them; start it again "
                              "(or use --backend sim, which resumes bit-identically)")
