"""Run by tests under torchrun: trains several configurations with --backend torch in one process group.

usage: torchrun --standalone --nproc-per-node N tests/dist_script.py OUT_DIR JSON_CONFIGS
"""

import json
import os
import sys
from datetime import timedelta

import torch.distributed as dist

from sgdlab import Config, run

out, configs = sys.argv[1], json.loads(sys.argv[2])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
for name, kw in configs.items():
    stop_at = kw.pop("stop_at", None)  # stop there, then resume: must end as an uninterrupted run
    cfg = Config(**{**kw, "backend": "torch", "out": f"{out}/{name}"})
    if stop_at:
        run(cfg, stop_at=stop_at)
        run(cfg, resume=True)
    else:
        run(cfg)
dist.barrier()  # leave together: a rank exiting while a peer still talks can abort the peer
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip finalisation: gloo's threads can abort it (see sgdlab.cli.main)
