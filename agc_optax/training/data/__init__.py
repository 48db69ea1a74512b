"""Training data: in-memory datasets, and a streaming grain pipeline for image folders and shards.

- :mod:`~agc_optax.training.data.in_memory`: ``digits`` (offline), ``cifar10`` and ``tfds:``
  datasets held in host memory, with the deterministic :class:`TrainBatches` order.
- :mod:`~agc_optax.training.data.sources`: ImageFolder trees and ArrayRecord shards as
  random-access sources of encoded images (``agc-prepare`` writes the shards).
- :mod:`~agc_optax.training.data.pipeline`: the grain pipeline (shuffle, shard by process,
  decode and augment in workers, batch, prefetch), resumable from its state.
- :mod:`~agc_optax.training.data.streaming`: the pipeline behind the trainer's dataset interface.
- :mod:`~agc_optax.training.data.augment`: per-image crops, flip, resize and RandAugment (host).
- :mod:`~agc_optax.training.data.mixing`: normalisation, MixUp and CutMix (device, in the step).

The streaming modules need the ``data`` extra (grain, array_record, Pillow):
``pip install 'agc_optax[data]'``.
"""

from agc_optax.training.data.in_memory import (
    DATASETS,
    DataError,
    DataPosition,
    Dataset,
    Split,
    TrainBatches,
    eval_batches,
    load_cifar10,
    load_dataset,
    load_digits,
    load_tfds,
)
from agc_optax.training.data.pipeline import (
    NFNET_AUGMENT,
    AugmentPolicy,
    epoch_order,
    eval_iterator,
    train_iterator,
)
from agc_optax.training.data.sources import (
    ArrayRecordSource,
    CorruptImageWarning,
    EncodedImage,
    ImageFolderSource,
    decode_image,
    open_source,
    write_array_records,
)
from agc_optax.training.data.streaming import (
    STREAMING_DATASETS,
    StreamingBatches,
    StreamingDataset,
    default_workers,
    is_streaming,
)

__all__ = [
    "DATASETS",
    "ArrayRecordSource",
    "AugmentPolicy",
    "CorruptImageWarning",
    "DataError",
    "DataPosition",
    "Dataset",
    "EncodedImage",
    "ImageFolderSource",
    "NFNET_AUGMENT",
    "STREAMING_DATASETS",
    "Split",
    "StreamingBatches",
    "StreamingDataset",
    "TrainBatches",
    "decode_image",
    "default_workers",
    "epoch_order",
    "eval_batches",
    "eval_iterator",
    "is_streaming",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_tfds",
    "open_source",
    "train_iterator",
    "write_array_records",
]
