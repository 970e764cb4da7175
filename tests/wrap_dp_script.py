"""Run under torchrun by tests: a user's loop wrapped with Distributed(..., "localsgd", dp=client-level)."""

import os
import sys

import torch

from sgdlab.distributed import Distributed

rank = int(os.environ["RANK"])
torch.manual_seed(0)
model = torch.nn.Linear(4, 1, bias=False)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
dd = Distributed(model, opt, "localsgd", sync_every=2, dp="noise=0.5,clip=0.05,unit=client,participation=0.5",
                 seed=3)
g = torch.Generator().manual_seed(rank)
for _ in range(6):
    x = torch.randn(8, 4, generator=g)
    (model(x).squeeze(1) - x.sum(1)).pow(2).mean().backward()
    dd.step()
    opt.zero_grad()
if rank == 0:
    torch.save({"weight": model.weight.detach(), "epsilon": dd.epsilon()}, sys.argv[1])
dd.close()
os._exit(0)  # skip finalisation: gloo's threads can abort it (see sgdlab.cli.main)
