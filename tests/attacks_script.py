"""Run by tests/test_attacks.py under torchrun: trains several configurations with --backend torch in one
process group; a run that stops with DivergenceError writes its message to ``OUT/NAME/error.rank<R>.txt``.

usage: torchrun --standalone --nproc-per-node N tests/attacks_script.py OUT_DIR JSON_CONFIGS
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from sgdlab import Config, run
from sgdlab.errors import DivergenceError

out, configs = sys.argv[1], json.loads(sys.argv[2])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
for name, kw in configs.items():
    try:
        run(Config(**{**kw, "backend": "torch", "out": f"{out}/{name}"}))
    except DivergenceError as e:
        Path(f"{out}/{name}/error.rank{rank}.txt").write_text(str(e))
    dist.barrier()
dist.barrier()  # leave together: a rank exiting while a peer still talks can abort the peer
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip finalisation: gloo's threads can abort it (see sgdlab.cli.main)
