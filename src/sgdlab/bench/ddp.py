"""``sgdlab bench ddp``: the torch backend's ``ddp`` strategy against plain
``torch.nn.parallel.DistributedDataParallel`` on the same model, batch and optimizer.

``sgdlab bench ddp`` starts ``torchrun --standalone --nproc-per-node N`` on this module. In one process
group, every rank alternates (ABBA) timed blocks of: (a) sgdlab's runner with ``--strategy ddp
--backend torch`` (training-loop time as it reports it: logging, metrics and byte counting included,
evaluation and checkpoints excluded), and (b) a bare loop over ``DistributedDataParallel(model)``.
Both use the same task, model, per-rank batch size, optimizer and gloo (CPU) or NCCL (CUDA).

``--compress SPEC`` compresses both sides alike: sgdlab's exchange with ``SPEC`` against DDP with torch's
matching communication hook: ``powersgd,rank=r`` against ``powerSGD_hook`` (same rank, error feedback and
warm start, compressed from step 2 — the hook's earliest — and whenever the factors are smaller:
``min_compression_rate=1``, ``orthogonalization_epsilon=1e-8``), ``fp16``/``bf16`` against
``fp16_compress_hook``/``bf16_compress_hook``. After the timed blocks each side trains once more for
``--steps`` steps from the same initial model and reports its validation loss (the data order differs).
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
    p.add_argument("--compress", default="fp32", metavar="SPEC",
                   help="compressor on both sides: powersgd[,rank=R] (DDP: powerSGD_hook), fp16 or bf16 (DDP: "
                        "the fp16/bf16 compress hooks); default fp32 (no hook)")


def main(args) -> int:
    _hook_for(args.compress)  # a spec without a DDP counterpart fails here, before torchrun starts
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "sgdlab.bench.ddp", args.task, args.optimizer, str(args.batch_size), str(args.steps),
           str(args.repeats), args.compress]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2)
                                                                                    // args.nproc)))}
    return subprocess.run(cmd, env=env).returncode


def _hook_for(compress: str) -> tuple[str, int]:
    """(DDP hook name, rank) matching sgdlab's compressor spec; ("", 0) for fp32."""
    from ..errors import ConfigError
    from ..exchange import ExchangeSpec

    compressor, fb, _ = ExchangeSpec(compress).stages()
    if compressor.name == "fp32" and fb.name == "none":
        return "", 0
    if compressor.name == "powersgd" and compressor.options.error_feedback and fb.name == "none":
        return "powersgd", compressor.options.rank
    if compressor.name in ("fp16", "bf16") and fb.name == "none":
        return compressor.name, 0
    raise ConfigError(f"bench ddp --compress {compress!r}: DistributedDataParallel has no matching hook; "
                      "allowed: fp32, powersgd[,rank=R], fp16, bf16")


def _worker(task_name: str, optimizer: str, batch: int, steps: int, repeats: int, compress: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from .. import optim
    from ..config import Config
    from ..runner import Trainer
    from ..runner.build import build_task

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    hook, rank_r = _hook_for(compress)
    cfg = Config(task=task_name, optimizer=optimizer, strategy="ddp", workers=world, backend="torch",
                 batch_size=batch, eval_every=0, checkpoint_every=0, log_every=10, device=device,
                 compress=None if compress == "fp32" else compress)
    spec = cfg.spec()
    task = build_task(spec)

    def ours(n: int, evaluate: bool = False) -> float:
        with tempfile.TemporaryDirectory() as d:
            out = [d]
            dist.broadcast_object_list(out, src=0)  # one run directory for all ranks
            res = Trainer(cfg.replace(steps=n, out=out[0], eval_every=n if evaluate else 0), task=task,
                          progress=False).run(overwrite=True)
            t = torch.tensor([res.summary.get("final_val_loss" if evaluate else "wall_time_s") or 0.0],
                             dtype=torch.float64)
            dist.broadcast(t, src=0)
            dist.barrier()
        return float(t.item())

    def ddp_model() -> DistributedDataParallel:
        torch.manual_seed(spec.seed)
        # With a hook, one bucket: with DDP's default small first bucket, powerSGD_hook's collectives came
        # out in different orders on the two ranks under gloo (a size-mismatch abort); sgdlab sends one flat
        # buffer too.
        model = DistributedDataParallel(task.build_model(), bucket_cap_mb=1024 if hook else None)
        if hook == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
            state = ps.PowerSGDState(None, matrix_approximation_rank=rank_r, start_powerSGD_iter=2,
                                     min_compression_rate=1, orthogonalization_epsilon=1e-8, random_seed=spec.seed)
            model.register_comm_hook(state, ps.powerSGD_hook)
        elif hook:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            model.register_comm_hook(None, getattr(default_hooks, f"{hook}_compress_hook"))
        return model

    def theirs(n: int, evaluate: bool = False) -> float:
        model = ddp_model()
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
        if evaluate:
            t = torch.tensor([task.evaluate(model.module)["val_loss"]], dtype=torch.float64)
            dist.broadcast(t, src=0)
        return float(t.item())

    ours(max(3, steps // 5))
    theirs(max(3, steps // 5))
    a, b = [], []
    for i in range(repeats):
        for which in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
            (a if which == "ours" else b).append(ours(steps) if which == "ours" else theirs(steps))
    la, lb = ours(steps, evaluate=True), theirs(steps, evaluate=True)
    if rank == 0:
        ma, mb = statistics.median(a), statistics.median(b)
        theirs_name = f"torch DistributedDataParallel{f' + {hook} hook' if hook else ''}"
        print(f"bench ddp: task={task_name} optimizer={optimizer} per-rank batch={batch} ranks={world} "
              f"device={device} steps={steps} repeats={repeats} compress={compress}")
        print(f"| loop | median s | steps/s | ratio to DistributedDataParallel | val loss after {steps} steps |")
        print("|---|---|---|---|---|")
        print(f"| {theirs_name} | {mb:.3f} | {steps / mb:.2f} | 1.000 | {lb:.4f} |")
        print(f"| sgdlab ddp (--backend torch{f', --compress {compress}' if hook else ''}) | {ma:.3f} | "
              f"{steps / ma:.2f} | {mb / ma:.3f} | {la:.4f} |")
        print(f"sgdlab overhead: {100 * (ma / mb - 1):+.1f}% (goal: within 10%)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
