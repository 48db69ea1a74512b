"""Training NFNets with AGC: data, data-parallel set-up, the train step, checkpoints, the trainer.

The CLI is ``python -m agc_optax.train`` (``agc-train``); this package is its library side.
``__all__`` is its API; the modules behind it (``step``, ``recipe``, ``parallel``, ...) are not.
"""

from agc_optax.training.checkpoint import Checkpointer, CheckpointWarning, CheckpointWriteError
from agc_optax.training.config import PRESETS, Config, ConfigError, validate
from agc_optax.training.data import (
    DataError,
    DataPosition,
    Dataset,
    Split,
    TrainBatches,
    eval_batches,
    load_cifar10,
    load_dataset,
    load_digits,
)
from agc_optax.training.metrics import MetricsWriter, plot_metrics, read_metrics
from agc_optax.training.recipe import build_optimizer, learning_rate_schedule
from agc_optax.training.step import (
    Gradients,
    SplitModel,
    TrainState,
    TrainStep,
    TwoProgramStep,
    ema_decay,
    init_state,
    make_eval_step,
    make_train_step,
    split_model,
)
from agc_optax.training.trainer import Preempted, RunResult, TrainingDiverged, train

__all__ = [
    "PRESETS",
    "CheckpointWarning",
    "CheckpointWriteError",
    "Checkpointer",
    "Config",
    "ConfigError",
    "DataError",
    "DataPosition",
    "Dataset",
    "Gradients",
    "MetricsWriter",
    "Preempted",
    "RunResult",
    "Split",
    "SplitModel",
    "TrainBatches",
    "TrainState",
    "TrainStep",
    "TrainingDiverged",
    "TwoProgramStep",
    "build_optimizer",
    "ema_decay",
    "eval_batches",
    "init_state",
    "load_cifar10",
    "load_dataset",
    "learning_rate_schedule",
    "load_digits",
    "make_eval_step",
    "make_train_step",
    "plot_metrics",
    "read_metrics",
    "split_model",
    "train",
    "validate",
]
