"""The training configuration: one frozen dataclass, named presets, one validation pass."""

from __future__ import annotations

import ast
import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from agc_optax.training.parallel import PARALLEL_MODES

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """The configuration (flags) cannot work; the message says which field and why."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on. Fields match the CLI flags (``--batch-size`` -> ``batch_size``).

    Attributes:
      model: a name from ``agc_optax.models.list_models()``.
      model_overrides: constructor keywords for the model (``widths``, ``stochdepth_rate`` ...).
      dataset: ``digits`` (offline), ``cifar10``, ``tfds:<name>`` (in memory), or
        ``imagefolder`` / ``arrayrecord`` (streamed by the grain pipeline).
      data_dir: directory of the ``cifar10`` / ``tfds:`` files, the ImageFolder tree
        (``train/<class>/*``, ``val/<class>/*``) or ``agc-prepare``'s shards.
      image_size: side length of the upsampled digits; the train resolution of streamed data.
      test_image_size: eval resolution of streamed data (default ``image_size``).
      augment: streamed data's augmentation on top of crop and flip: ``none`` or a DeepMind-style
        name such as ``cutmix_mixup_randaugment_405``.
      workers: decoding processes of the streaming pipeline (default: CPUs - 1, up to 32).
      batch_size: global batch size (all devices and processes together).
      lr: peak learning rate per 256 examples; the run uses ``lr * batch_size / 256``.
      warmup_epochs: linear warm-up length, then cosine decay to zero.
      momentum: SGD momentum (Nesterov).
      weight_decay: coupled L2, not applied to gains and biases.
      clipping: AGC threshold lambda.
      agc: apply AGC; ``False`` gives plain SGD + weight decay (``--no-agc``).
      global_clip: clip by global gradient norm at this value instead of AGC (``--global-clip``).
      epochs: training length in epochs, used when ``steps`` is ``None``.
      steps: training length in steps.
      ema: EMA decay of the weights (DeepMind warm-up), ``None`` for no EMA.
      label_smoothing: label smoothing of the cross-entropy.
      dtype: compute dtype (parameters stay float32).
      parallel: ``jit`` (mesh + shardings) or ``pmap``.
      shard_params: split parameters, optimizer state and EMA over the devices, FSDP style
        (``jit`` only; :class:`~agc_optax.training.parallel.ShardedPlacement`), for models
        whose replicated state does not fit one device.
      run_dir: where metrics, plots and (by default) checkpoints go.
      checkpoint_dir: checkpoints, default ``<run_dir>/checkpoints``.
      checkpoint_every: steps between checkpoints, default once per epoch.
      compile_cache: directory of JAX's persistent compilation cache, ``None`` for none (unless
        ``JAX_COMPILATION_CACHE_DIR`` sets one). A rerun or ``resume`` of the same configuration
        then loads its compiled steps instead of compiling them (NF-ResNet-50's train step on
        2 CPU cores: 2.7 s instead of 8.9 s, tracing included; ``benchmarks/RESULTS.md``). The
        cache is trusted code: keep it where only you can write.
      resume: continue from the newest readable checkpoint.
      max_bad_steps: the run stops (:class:`~agc_optax.training.trainer.TrainingDiverged`) after
        this many consecutive steps whose update was skipped for a non-finite loss, gradient or
        update norm.
      seed: seeds parameters, data order, augmentation and dropout.
      eval_every: steps between evaluations, default once per epoch.
      log_every: steps between metric records.
      update_norm: also record ``update_norm``, the norm of each logged step's change to the
        weights; off by default because it costs a copy of every weight on every step (see
        :func:`agc_optax.training.make_train_step`).
      step_programs: 2 compiles the train step as two XLA programs, the gradients and the
        update, side by side (:class:`~agc_optax.training.TwoProgramStep`): NF-ResNet-50's
        and F0's compile in about 0.7x the time of one program on 2 CPU cores, and their steps
        run within 2% of one program's (the default run's 4 ms step takes 0.3-0.5 ms more: the
        update no longer overlaps the end of the backward pass); 1 compiles one program.
      progress: show the progress bar.
      coordinator: ``host:port`` of process 0 for multi-process runs.
      num_processes: number of processes.
      process_id: this process.
    """

    model: str = "nf_resnet26"
    model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int = 16
    test_image_size: int | None = None
    augment: str = "none"
    workers: int | None = None
    batch_size: int = 64
    lr: float = 0.4
    warmup_epochs: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 2e-5
    clipping: float = 0.01
    agc: bool = True
    global_clip: float | None = None
    epochs: float = 10.0
    steps: int | None = None
    ema: float | None = 0.99
    label_smoothing: float = 0.1
    dtype: str = "float32"
    parallel: str = "jit"
    shard_params: bool = False
    run_dir: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    compile_cache: str | None = None
    resume: bool = False
    max_bad_steps: int = 5
    seed: int = 0
    eval_every: int | None = None
    log_every: int = 10
    update_norm: bool = False
    step_programs: int = 2
    progress: bool = True
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (stored next to every checkpoint)."""
        out = dataclasses.asdict(self)
        out["model_overrides"] = {k: _jsonable(v) for k, v in self.model_overrides.items()}
        return out


def add_model_arg_flag(parser: Any) -> None:
    """Adds the repeatable ``--model-arg KEY=VALUE`` flag (read by :func:`parse_model_args`) to an
    ``argparse`` parser: one definition for ``agc-train`` and ``agc-eval``."""
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model constructor override, repeatable, e.g. --model-arg 'widths=(32,64,128,256)'",
    )


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``--model-arg KEY=VALUE`` items as constructor keywords (values read as Python literals).

    ``true`` and ``false`` in any case are booleans, as a shell user writes them; a value that
    is not a literal stays a string (a bare word such as an activation name).

    Example:
      >>> parse_model_args(["canonical_conv_grads=true", "widths=(16, 32)", "activation=gelu"])
      {'canonical_conv_grads': True, 'widths': (16, 32), 'activation': 'gelu'}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"`--model-arg {item}`: expected KEY=VALUE, e.g. stochdepth_rate=0.1")
        if value.strip().lower() in ("true", "false"):
            out[key] = value.strip().lower() == "true"
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return repr(v)


# A small NF-ResNet-26 (stage widths 16..128, no stochastic depth): learns the 16x16 digits to
# ~97.5% test accuracy with AGC at 0.1 (benchmarks/RESULTS.md, the default-run sweep); much of
# the run's time is compiling the train step.
_SMALL_NF_RESNET = {
    "width": 1,  # the multiplier applies to `widths` too
    "widths": (16, 32, 64, 128),
    "stem_width": 16,
    "stochdepth_rate": 0.0,
}

PRESETS: dict[str, Config] = {
    # The default run. At batch 64 a larger lambda than ImageNet's 0.01 (batch 4096) works best,
    # as the paper reports for small batches (Brock et al. 2021, fig. 3). 0.1 won a sweep over
    # 0.05-0.4 and two seeds (benchmarks/default_run_clipping.py; 0.4 diverges at this lr).
    "digits": Config(model_overrides=_SMALL_NF_RESNET, lr=1.0, clipping=0.1, epochs=25.0),
    # Tests and smoke runs: 20 steps of a tiny network, most of the time spent compiling.
    "smoke": Config(
        model_overrides={
            "width": 1,
            "widths": (8, 8, 16, 16),
            "depths": (1, 1, 1, 1),
            "stem_width": 8,
            "stochdepth_rate": 0.0,
        },
        image_size=8,
        batch_size=32,
        steps=20,
        eval_every=10,
        checkpoint_every=10,
        log_every=5,
    ),
    # CIFAR-10 from `--data-dir`; a full-width NF-ResNet-26 (accelerator recommended).
    "cifar10": Config(
        dataset="cifar10",
        model_overrides={"width": 1, "stochdepth_rate": 0.1},
        batch_size=256,
        lr=0.4,
        clipping=0.02,
        epochs=100.0,
        warmup_epochs=5.0,
        ema=0.999,
    ),
}


def _nfnet_presets() -> dict[str, Config]:
    """The paper's ImageNet recipe per variant (Brock et al. 2021): batch 4096, lr 0.1 per 256,
    lambda 0.01, 360 epochs, the variant's train/test resolutions and augmentation (F0: 192/256,
    cutmix_mixup_randaugment_405), streamed from an ImageFolder (``--data-dir``)."""
    from agc_optax.models.nfnet import NFNET_VARIANTS
    from agc_optax.training.data.pipeline import NFNET_AUGMENT

    presets = {}
    for name, augment in NFNET_AUGMENT.items():
        variant = NFNET_VARIANTS[name.removeprefix("nfnet_").upper()]
        presets[name] = Config(
            model=name,
            dataset="imagefolder",
            image_size=variant.train_imsize,
            test_image_size=variant.test_imsize,
            augment=augment,
            batch_size=4096,
            lr=0.1,
            clipping=0.01,
            epochs=360.0,
            warmup_epochs=5.0,
            ema=0.99999,
            dtype="bfloat16",
        )
    return presets


PRESETS.update(_nfnet_presets())
DEFAULT_PRESET = "digits"


def validate(config: Config, valid_models: list[str]) -> None:
    """Checks every field once, before anything is built.

    Raises:
      ConfigError: naming the field (flag), the received value and what would work.
    """
    if config.model not in valid_models:
        raise ConfigError(f"unknown model `{config.model}`; valid: {', '.join(valid_models)}")
    streaming = config.dataset in ("imagefolder", "arrayrecord")
    if not (
        config.dataset in ("digits", "cifar10") or config.dataset.startswith("tfds:") or streaming
    ):
        raise ConfigError(
            f"unknown dataset `{config.dataset}`; valid: digits, cifar10, tfds:<name>, "
            "imagefolder, arrayrecord"
        )
    if streaming and not config.data_dir:
        raise ConfigError(f"`--dataset {config.dataset}` needs `--data-dir`")
    if config.workers is not None and config.workers < 0:
        raise ConfigError(f"`--workers` must be >= 0, got {config.workers}")
    from agc_optax.training.data import AugmentPolicy, DataError

    try:
        AugmentPolicy.parse(config.augment)
    except DataError as e:
        raise ConfigError(str(e)) from None

    def positive(name: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or not value > 0:
            raise ConfigError(f"`--{name.replace('_', '-')}` must be > 0, got {value}")

    def finite(name: str, value: Any) -> None:
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"`--{name.replace('_', '-')}` must be a finite number, got {value}")

    positive("batch_size", config.batch_size)
    positive("image_size", config.image_size)
    positive("test_image_size", config.test_image_size, allow_none=True)
    positive("lr", config.lr)
    finite("lr", config.lr)
    positive("clipping", config.clipping)  # inf is AGC's documented "never clip"
    positive("global_clip", config.global_clip, allow_none=True)
    positive("steps", config.steps, allow_none=True)
    positive("epochs", config.epochs)
    finite("epochs", config.epochs)  # a length in steps follows from it
    finite("warmup_epochs", config.warmup_epochs)
    positive("max_bad_steps", config.max_bad_steps)
    positive("log_every", config.log_every)
    positive("eval_every", config.eval_every, allow_none=True)
    positive("checkpoint_every", config.checkpoint_every, allow_none=True)
    if config.agc and config.global_clip is not None:
        raise ConfigError("`--global-clip` replaces AGC; it cannot be combined with AGC on")
    if config.ema is not None and not 0.0 <= config.ema < 1.0:
        raise ConfigError(f"`--ema` must be in [0, 1), got {config.ema}")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f"`--label-smoothing` must be in [0, 1), got {config.label_smoothing}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"`--dtype` must be one of {', '.join(DTYPES)}, got `{config.dtype}`")
    if config.step_programs not in (1, 2):
        raise ConfigError(f"`--step-programs` must be 1 or 2, got {config.step_programs!r}")
    if config.parallel not in PARALLEL_MODES:
        raise ConfigError(f"`--parallel` must be one of {', '.join(PARALLEL_MODES)}")
    if config.shard_params and config.parallel != "jit":
        raise ConfigError(
            f"`--shard-params` splits the state over the `jit` mesh; it cannot be combined with "
            f"`--parallel {config.parallel}` (use `--parallel jit`)"
        )
    if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
        raise ConfigError(
            f"`--process-id` {config.process_id} must be in [0, `--num-processes` "
            f"{config.num_processes})"
        )
    if config.num_processes > 1 and not config.coordinator:
        raise ConfigError("`--num-processes` > 1 needs `--coordinator host:port`")
    if config.resume and not (config.run_dir or config.checkpoint_dir):
        raise ConfigError("`--resume` needs the `--run-dir` (or `--checkpoint-dir`) of the run")
    if config.data_dir is not None and not os.path.isdir(config.data_dir):
        raise ConfigError(f"`--data-dir` `{config.data_dir}` is not a directory")
