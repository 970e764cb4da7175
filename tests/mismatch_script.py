"""Run under torchrun by tests: ranks started with different settings must refuse to train."""

import os
import sys

from sgdlab import Config, run
from sgdlab.errors import ConfigError

rank = int(os.environ["RANK"])
try:
    run(Config(task="digits", strategy="ddp", workers=2, backend="torch", steps=2, seed=rank, device="cpu",
               out=sys.argv[1]))
except ConfigError as e:
    print(f"rank {rank} refused: {e}", flush=True)
    os._exit(3)  # skip finalisation: gloo's threads can abort it (see sgdlab.cli.main)
os._exit(0)
