"""``sgdlab bench loop``: the runner's training throughput against a bare PyTorch loop.

Both loops train the same model (same task, batch size and optimizer, built by the same code) in the
same process, alternating in ABBA order, after one warm-up run each. The bare loop is what a user would write:
sample indices, forward, backward, ``step``, ``zero_grad``. The runner adds its sampler, LR schedule,
loss logging (batched host reads), JSONL metrics, progress bar and stop checks. Its time is the
training-loop time it reports (``wall_time_s``: evaluation and checkpoint writes excluded), and the
end-to-end time of ``Trainer.run`` (including model set-up, one final evaluation and checkpoint) is
shown beside it.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time

import torch

from .. import optim, tasks
from ..config import Config, RunSpec, resolve_device
from ..runner import Trainer
from ..runner.build import build_task


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(task: tasks.Task, spec: RunSpec, steps: int) -> float:
    """Seconds for ``steps`` training steps of a plain PyTorch loop."""
    torch.manual_seed(spec.seed)
    model = task.build_model()
    opt = optim.create(spec.optimizer, model.parameters(), lr=spec.lr, **spec.optimizer_kwargs())
    g = torch.Generator().manual_seed(spec.seed)
    _sync(task.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(task.num_train, (spec.batch_size,), generator=g)
        loss = task.loss(model, task.get_batch(idx))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    _sync(task.device)
    return time.perf_counter() - t0


def runner_loop(task: tasks.Task, cfg: Config, steps: int) -> tuple[float, float]:
    """(training-loop seconds reported by the runner, end-to-end seconds of ``Trainer.run``)."""
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stderr(io.StringIO()):
        c = cfg.replace(steps=steps, out=d)
        t0 = time.perf_counter()
        res = Trainer(c, task=task, progress=True).run(overwrite=True)
        total = time.perf_counter() - t0
    return res.summary["wall_time_s"], total


def main(args) -> int:
    device = resolve_device(args.device)
    cfg = Config(task=args.task, optimizer=args.optimizer, batch_size=args.batch_size, eval_every=0,
                 checkpoint_every=0, log_every=10, device=device)
    for assignment in args.sets:
        cfg = cfg.set(assignment)
    spec = cfg.spec()
    task = build_task(spec)
    print(f"bench loop: task={spec.task} optimizer={spec.optimizer} batch={spec.batch_size} steps={args.steps} "
          f"repeats={args.repeats} device={device} threads={torch.get_num_threads()}")
    bare_loop(task, spec, max(5, args.steps // 5))  # warm-up
    runner_loop(task, cfg, max(5, args.steps // 5))
    bare, run_loop, run_total = [], [], []
    for i in range(args.repeats):  # ABBA order, so neither loop always runs second
        for which in ("bare", "runner") if i % 2 == 0 else ("runner", "bare"):
            if which == "bare":
                bare.append(bare_loop(task, spec, args.steps))
            else:
                a, b = runner_loop(task, cfg, args.steps)
                run_loop.append(a)
                run_total.append(b)
    mb, ml, mt = (statistics.median(x) for x in (bare, run_loop, run_total))
    print("| loop | median s | steps/s | ratio to bare |")
    print("|---|---|---|---|")
    print(f"| bare PyTorch | {mb:.3f} | {args.steps / mb:.2f} | 1.000 |")
    print(f"| sgdlab runner (training loop) | {ml:.3f} | {args.steps / ml:.2f} | {mb / ml:.3f} |")
    print(f"| sgdlab runner (end to end: set-up, final eval, checkpoint) | {mt:.3f} | {args.steps / mt:.2f} "
          f"| {mb / mt:.3f} |")
    slowdown = ml / mb - 1
    verdict = "within" if slowdown <= 0.05 else "NOT within"
    print(f"runner training-loop overhead: {100 * slowdown:+.1f}% ({verdict} the 5% target)")
    return 0
