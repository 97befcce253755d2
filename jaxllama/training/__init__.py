"""Training: config, data, loss, optimizer, sharded train step, checkpoints, metrics, recipes.

`python -m jaxllama.train --config configs/train/tiny.yaml` is the command-line entry point;
`run(load_train_config(path, overrides))` does the same from Python.
"""

from jaxllama.training.config import TrainConfig, load_train_config
from jaxllama.training.recipe import load_recipe, run_recipe, validate_recipe
from jaxllama.training.trainer import run

__all__ = [
           "TrainConfig",
           "load_recipe",
           "load_train_config",
           "run",
           "run_recipe",
           "validate_recipe",
]
