"""sgdlab: train neural networks with stochastic-gradient methods and measure what each method buys.

>>> import sgdlab
>>> result = sgdlab.run(sgdlab.Config(task="digits", optimizer="sgd", lr=0.1, steps=200, out="runs/digits"))
>>> result.summary["val_accuracy"]
"""

__version__ = "0.1.0"

from . import optim, tasks  # noqa: E402
from .config import Config, RunSpec  # noqa: E402
from .errors import ConfigError, DivergenceError, SgdlabError  # noqa: E402
from .runner import RunResult, Trainer, load_run, run  # noqa: E402

__all__ = ["Config", "RunSpec", "run", "Trainer", "RunResult", "load_run", "optim", "tasks", "SgdlabError",
           "ConfigError", "DivergenceError", "__version__"]
