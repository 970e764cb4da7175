"""Run under torchrun by tests/test_buffers.py: user loops wrapped with Distributed, every rank starting from
its own seed (the wrapper must make rank 0's weights, buffers and optimizer state everyone's).

* ddp and diloco on a BatchNorm CNN with different data per rank: each rank's model state and eval model;
* Lookahead(SGD) under ddp: the slow weights right after the wrapper is built, and the final weights;
* the runner (--backend torch) on a BatchNorm task, ddp and localsgd.

usage: torchrun --standalone --nproc-per-node 2 tests/buffers_script.py OUT_DIR
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
import zoo
from bn_task import RUNS, bn_config, bn_task

from sgdlab import run
from sgdlab.distributed import Distributed
from sgdlab.errors import ConfigError
from sgdlab.optim import Lookahead

rank, out = int(os.environ["RANK"]), sys.argv[1]
dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # ours: every Distributed below shares it
result = {}
for name, kw, steps in [("ddp", {}, 2), ("ddp-broadcast", {"buffers": "broadcast"}, 2),
                        ("diloco", {"sync_every": 2, "outer_lr": 0.7}, 3)]:
    model, make_batch = zoo.bn_cnn(seed=100 + rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = name.split("-")[0]
    dd = Distributed(model, opt, strategy, **kw)
    for t in range(steps):
        x, y = make_batch(8, seed=1000 * rank + t)
        F.cross_entropy(model(x), y).backward()
        dd.step()
        opt.zero_grad()
    result[name] = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                    "eval": {k: v.clone() for k, v in dd.eval_model().state_dict().items()},
                    "bytes": dd.bytes_sent}
    dd.close()

torch.manual_seed(100 + rank)
lin = torch.nn.Linear(4, 1, bias=False)
opt = Lookahead(torch.optim.SGD(lin.parameters(), lr=0.1), k=2, alpha=0.5)
dd = Distributed(lin, opt, "ddp")
result["slow_at_start"] = opt.slow[lin.weight]["slow_param"].clone()
g = torch.Generator().manual_seed(rank)
for _ in range(5):
    x = torch.randn(8, 4, generator=g)
    (lin(x).squeeze(1) - x.sum(1)).pow(2).mean().backward()
    dd.step()
    opt.zero_grad()
result["lookahead"] = lin.weight.detach().clone()
inner = torch.optim.SGD(lin.parameters(), lr=0.1)  # rank 0 wraps it in Lookahead, rank 1 does not: refused
try:
    Distributed(lin, Lookahead(inner) if rank == 0 else inner, "ddp")
except ConfigError as e:
    result["layout_error"] = f"{type(e).__name__}: {e}"
torch.save(result, f"{out}/rank{rank}.pt")
dd.close()

for strategy in RUNS:  # the runner on --backend torch
    run(bn_config(strategy, f"{out}/runner-{strategy}", backend="torch"), task=bn_task())
dist.barrier()  # leave together: a rank exiting while a peer still talks can abort the peer
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip finalisation: gloo's threads can abort it (see sgdlab.cli.main)
