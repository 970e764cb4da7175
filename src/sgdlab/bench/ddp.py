"""``sgdlab bench ddp``: the torch backend's ``ddp`` strategy against plain
``torch.nn.parallel.DistributedDataParallel`` on the same model, batch and optimizer.

``sgdlab bench ddp`` starts ``torchrun --standalone --nproc-per-node N`` on this module. In one process
group, every rank alternates (ABBA) timed blocks of: (a) sgdlab's runner with ``--strategy ddp
--backend torch`` (training-loop time as it reports it: logging, metrics and byte counting included,
evaluation and checkpoints excluded), and (b) a bare loop over ``DistributedDataParallel(model)``.
Both use the same task, model, per-rank batch size, optimizer and gloo (CPU) or NCCL (CUDA).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def add_arguments(p) -> None:
    from ..config import Config, describe

    p.add_argument("--nproc", type=int, default=2, help="processes (workers); default 2")
    p.add_argument("--task", default=Config.task, help=describe("task"))
    p.add_argument("--optimizer", default=Config.optimizer, help=describe("optimizer"))
    p.add_argument("--batch-size", type=int, default=16, help="per-rank batch size")
    p.add_argument("--steps", type=int, default=30, help="timed steps per block")
    p.add_argument("--repeats", type=int, default=4)


def main(args) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "sgdlab.bench.ddp", args.task, args.optimizer, str(args.batch_size), str(args.steps),
           str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2)
                                                                                    // args.nproc)))}
    return subprocess.run(cmd, env=env).returncode


def _worker(task_name: str, optimizer: str, batch: int, steps: int, repeats: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from .. import optim
    from ..config import Config
    from ..runner import Trainer
    from ..runner.build import build_task

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    cfg = Config(task=task_name, optimizer=optimizer, strategy="ddp", workers=world, backend="torch",
                 batch_size=batch, eval_every=0, checkpoint_every=0, log_every=10, device=device)
    spec = cfg.spec()
    task = build_task(spec)

    def ours(n: int) -> float:
        with tempfile.TemporaryDirectory() as d:
            out = [d]
            dist.broadcast_object_list(out, src=0)  # one run directory for all ranks
            res = Trainer(cfg.replace(steps=n, out=out[0]), task=task, progress=False).run(overwrite=True)
            t = torch.tensor([res.summary.get("wall_time_s", 0.0)], dtype=torch.float64)
            dist.broadcast(t, src=0)
            dist.barrier()
        return float(t.item())

    def theirs(n: int) -> float:
        torch.manual_seed(spec.seed)
        model = DistributedDataParallel(task.build_model())
        opt = optim.create(spec.optimizer, model.parameters(), lr=spec.lr, **spec.optimizer_kwargs())
        g = torch.Generator().manual_seed(spec.seed + rank)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            idx = torch.randint(task.num_train, (batch,), generator=g)
            loss = task.loss(model, task.get_batch(idx))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss.item()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    ours(max(3, steps // 5))
    theirs(max(3, steps // 5))
    a, b = [], []
    for i in range(repeats):
        for which in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
            (a if which == "ours" else b).append(ours(steps) if which == "ours" else theirs(steps))
    if rank == 0:
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"bench ddp: task={task_name} optimizer={optimizer} per-rank batch={batch} ranks={world} "
              f"device={device} steps={steps} repeats={repeats}")
        print("| loop | median s | steps/s | ratio to DistributedDataParallel |")
        print("|---|---|---|---|")
        print(f"| torch DistributedDataParallel | {mb:.3f} | {steps / mb:.2f} | 1.000 |")
        print(f"| sgdlab ddp (--backend torch) | {ma:.3f} | {steps / ma:.2f} | {mb / ma:.3f} |")
        print(f"sgdlab overhead: {100 * (ma / mb - 1):+.1f}% (goal: within 10%)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
