"""Run under torchrun by tests: a user's own loop wrapped with sgdlab.distributed.Distributed (ddp)."""

import os
import sys

import torch

from sgdlab.distributed import Distributed

rank = int(os.environ["RANK"])
torch.manual_seed(100 + rank)  # different init per rank: the wrapper must broadcast rank 0's
model = torch.nn.Linear(4, 1, bias=False)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
dd = Distributed(model, opt, "ddp")
g = torch.Generator().manual_seed(rank)
die = sys.argv[2:] == ["die-once"] and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
for step in range(5):
    if die and step == 2:
        os._exit(1)  # a worker dies in the first attempt; torchrun --max-restarts restarts every rank
    x = torch.randn(8, 4, generator=g)
    loss = (model(x).squeeze(1) - x.sum(1)).pow(2).mean()
    loss.backward()
    dd.step()
    opt.zero_grad()
if rank == 0:
    torch.save({"weight": model.weight.detach(), "bytes": dd.bytes_sent}, sys.argv[1])
dd.close()
os._exit(0)  # skip finalisation: gloo's threads can abort it (see sgdlab.cli.main)
