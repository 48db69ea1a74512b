"""The streaming input pipeline on grain: shuffle, shard, decode and augment, batch, prefetch.

Train data flow (one process)::

    record indices 0..N-1
      -> this process's shard: indices p, p + P, p + 2P, ...         (P = process count)
      -> shuffled per epoch from the seed, repeated forever          (grain's index shuffle)
      -> read + decode + crop/flip/resize + RandAugment              (one example, its own rng)
      -> batches of batch_size                                        (uint8 images, int32 labels)
      -> worker processes, each producing whole batches in turn      (grain mp_prefetch)
      -> a small buffer of ready batches                              (prefetch)

Every random choice of example ``k`` of the stream comes from ``np.random.default_rng([seed,
shard_index, k])`` and batch ``b`` is always examples ``b * batch_size ...``, so the batches are
the same whatever the number of workers, and the iterator's state (grain's ``get_state``: where
each worker stands) is all a checkpoint needs to resume exactly.

Memory is bounded by ``batch_size * (prefetch + workers * worker_buffer)`` images; the dataset
itself is never held: sources keep file names only.

``workers=0`` decodes in the calling process (with ``threads`` reader threads: Pillow releases
the GIL while decoding and resizing); ``workers=N`` starts N processes.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np

from agc_optax.training.data import augment as augment_lib
from agc_optax.training.data.in_memory import DataError
from agc_optax.training.data.sources import CorruptImageWarning, _require

_MAX_SKIPS = 64  # consecutive undecodable records before giving up: the data is broken, not a file

# The paper's augmentation per NFNet variant (Brock et al. 2021, appendix; DeepMind's configs).
NFNET_AUGMENT = {
    "nfnet_f0": "cutmix_mixup_randaugment_405",
    "nfnet_f1": "cutmix_mixup_randaugment_410",
    "nfnet_f2": "cutmix_mixup_randaugment_410",
    "nfnet_f3": "cutmix_mixup_randaugment_415",
    "nfnet_f4": "cutmix_mixup_randaugment_415",
    "nfnet_f5": "cutmix_mixup_randaugment_415",
    "nfnet_f6": "cutmix_mixup_randaugment_415",
    "nfnet_f7": "cutmix_mixup_randaugment_415",
}


@dataclasses.dataclass(frozen=True)
class AugmentPolicy:
    """What augmentation a run uses, parsed from a DeepMind-style name (:meth:`parse`).

    The random crop and flip are always on for streaming training data; these add to them.
    """

    randaugment: tuple[int, int] | None = None  # (num_layers, magnitude)
    mixup_alpha: float | None = None
    cutmix: bool = False

    @classmethod
    def parse(cls, name: str) -> AugmentPolicy:
        """``"none"`` or ``_``-joined parts: ``mixup`` (alpha 0.2) or ``mixup_<alpha>``,
        ``cutmix``, ``randaugment_<LMM>`` (L layers, magnitude MM, e.g. 405 = 4 x 5; a number
        under 100 is the magnitude with 2 layers, as DeepMind's parser reads it).

        >>> AugmentPolicy.parse("cutmix_mixup_randaugment_405")
        AugmentPolicy(randaugment=(4, 5), mixup_alpha=0.2, cutmix=True)
        >>> AugmentPolicy.parse("mixup_0.4")
        AugmentPolicy(randaugment=None, mixup_alpha=0.4, cutmix=False)
        """
        if name in ("", "none"):
            return cls()
        parts = name.split("_")
        randaugment, mixup_alpha, cutmix = None, None, False
        i = 0
        while i < len(parts):
            part = parts[i]
            nxt = parts[i + 1] if i + 1 < len(parts) else None
            if part == "cutmix":
                cutmix = True
            elif part == "mixup":
                mixup_alpha = 0.2
                if nxt is not None and re.fullmatch(r"\d+(\.\d+)?", nxt):
                    mixup_alpha = float(nxt)
                    i += 1
            elif part == "randaugment" and nxt is not None and nxt.isdigit():
                value = int(nxt)
                layers, magnitude = (value // 100, value % 100) if value > 100 else (2, value)
                randaugment = (layers, magnitude)
                i += 1
            else:
                raise DataError(
                    f"`--augment {name}`: cannot read `{part}`; use `none` or parts joined by `_`: "
                    "cutmix, mixup[_ALPHA], randaugment_LMM (e.g. cutmix_mixup_randaugment_405)"
                )
            i += 1
        if mixup_alpha is not None and mixup_alpha <= 0:
            raise DataError(f"`--augment {name}`: the MixUp alpha must be > 0")
        return cls(randaugment, mixup_alpha, cutmix)

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha is not None or self.cutmix


def _example_rng(seed: int, shard_index: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed, shard_index, position])


class _LoadExample:
    """Reads, decodes and augments one record; a corrupt record is skipped (the next is used).

    A picklable callable (grain sends it to each worker process).
    """

    def __init__(self, source, size, seed, shard_index, train, randaugment, draft):
        self.source, self.size, self.seed, self.shard_index = source, size, seed, shard_index
        self.train, self.randaugment, self.draft = train, randaugment, draft
        self._warned: set[str] = set()

    def _decode(self, record, rng):
        if self.train:
            return augment_lib.train_image(
                record.data, rng, self.size, randaugment=self.randaugment, draft=self.draft
            )
        return augment_lib.eval_image(record.data, self.size, draft=self.draft)

    def _warn(self, record, error):
        if record.name not in self._warned:
            self._warned.add(record.name)
            message = f"skipping `{record.name}`: not a decodable image ({type(error).__name__})"
            # Once per file and process (a worker process prints it on its own stderr).
            warnings.warn(message, CorruptImageWarning, stacklevel=2)

    def load(self, position: int, index: int):
        """``(image, label, skipped)``: in training a bad record is replaced by the next one."""
        rng = _example_rng(self.seed, self.shard_index, position)
        skipped = 0
        while True:
            record = self.source[(index + skipped) % len(self.source)]
            try:
                return self._decode(record, rng), record.label, skipped
            except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, ...
                self._warn(record, e)
                skipped += 1
                if not self.train:
                    return None, record.label, skipped
                if skipped >= min(_MAX_SKIPS, len(self.source)):
                    raise DataError(
                        f"{skipped} records in a row from `{record.name}` on do not decode"
                    ) from None

    def __call__(self, position: int, index):
        image, label, skipped = self.load(position, int(index))
        return {"image": image, "label": np.int32(label), "skipped": np.int32(skipped)}


class _LoadEvalExample(_LoadExample):
    """Eval: no replacement; padding rows and undecodable files get mask 0."""

    def __init__(self, *args, valid: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.valid = valid

    def __call__(self, position: int, index):
        blank = np.zeros((self.size, self.size, 3), np.uint8)
        if position >= self.valid:
            return {"image": blank, "label": np.int32(0), "mask": np.float32(0), "skipped": 0}
        image, label, skipped = self.load(position, int(index))
        ok = image is not None
        return {
            "image": image if ok else blank,
            "label": np.int32(label),
            "mask": np.float32(ok),
            "skipped": np.int32(skipped),
        }


def _batch(examples):
    # Skip grain's generic tree batching: stack the three fields directly.
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def _to_iterator(ds, workers: int, threads: int, prefetch: int):
    grain = _require("grain")
    iter_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    )
    if workers > 0:
        from absl import flags

        # grain reads an absl flag when starting workers; a program without absl.app has not
        # parsed flags, so mark them parsed (their defaults) instead of crashing.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
        )
    return iter(iter_ds)


def _check_workers(workers: int, threads: int) -> None:
    if workers < 0:
        raise DataError(f"`--workers` must be >= 0, got {workers}")
    if threads < 1:
        raise DataError(f"reader threads must be >= 1, got {threads}")


def train_iterator(
    source,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    policy: AugmentPolicy = AugmentPolicy(),
    shard_index: int = 0,
    shard_count: int = 1,
    workers: int = 0,
    threads: int = 2,
    prefetch: int = 2,
    draft: bool = True,
    start_batch: int = 0,
):
    """An endless, resumable iterator of this process's training batches.

    Args:
      source: a random-access source of ``EncodedImage`` (``ImageFolderSource``,
        ``ArrayRecordSource``).
      batch_size: examples per batch on this process.
      image_size: side of the square output images.
      seed: data seed: the shuffle of every epoch and every example's augmentation derive from it.
      policy: RandAugment (applied here); MixUp and CutMix are applied on the device.
      shard_index, shard_count: this process reads records ``shard_index::shard_count``.
      workers: worker processes (0 = decode in this process).
      threads: reader threads per process.
      prefetch: batches buffered ahead (per worker when ``workers > 0``).
      draft: allow reduced-scale JPEG decoding when the crop is large enough.
      start_batch: the first batch to produce. Batch ``b`` is the same however it is reached, so
        starting at ``b`` resumes exactly (as ``set_state`` does, and with any worker count).

    Returns:
      A grain ``DatasetIterator`` of dicts ``{"image": (B, S, S, 3) uint8, "label": (B,) int32,
      "skipped": (B,) int32}`` (``skipped``: undecodable records replaced by the next one). Its
      ``get_state()`` / ``set_state()`` resume it exactly.
    """
    grain = _require("grain")
    _check_workers(workers, threads)
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} is not in [0, {shard_count})")
    indices = np.arange(shard_index, len(source), shard_count)
    if len(indices) < batch_size:
        raise DataError(
            f"`--batch-size`: {batch_size} examples per process exceed the {len(indices)} "
            f"training images of this process's shard of {len(source)}"
        )
    load = _LoadExample(source, image_size, seed, shard_index, True, policy.randaugment, draft)
    ds = grain.MapDataset.source(indices).seed(seed).shuffle().repeat()
    ds = ds.map_with_index(load).batch(batch_size, drop_remainder=True, batch_fn=_batch)
    if start_batch:
        ds = ds[start_batch:]
    return _to_iterator(ds, workers, threads, prefetch)


def epoch_order(num_records: int, seed: int, epoch: int, shard_index=0, shard_count=1):
    """The record indices this process reads in ``epoch``, in order (for tests and inspection)."""
    grain = _require("grain")
    indices = np.arange(shard_index, num_records, shard_count)
    ds = grain.MapDataset.source(indices).seed(seed).shuffle().repeat()
    n = len(indices)
    return np.array([ds[epoch * n + i] for i in range(n)])


def eval_iterator(
    source,
    *,
    batch_size: int,
    image_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    workers: int = 0,
    threads: int = 2,
    prefetch: int = 2,
    draft: bool = True,
):
    """This process's evaluation batches, padded to a fixed shape with a validity mask.

    Process ``p`` takes a contiguous ``1/P`` of the records; every process yields the same number
    of batches (so collective eval steps never wait on a process that ran out), and padding rows
    and undecodable files have mask 0: summing ``mask`` over all processes counts each valid
    record exactly once.

    Yields:
      dicts ``{"image", "label", "mask", "skipped"}``, leading dimension ``batch_size``.
    """
    grain = _require("grain")
    _check_workers(workers, threads)
    parts = np.array_split(np.arange(len(source)), shard_count)
    longest = max(len(p) for p in parts)
    num_batches = -(-longest // batch_size)
    mine = parts[shard_index]
    padded = np.concatenate([mine, np.zeros(num_batches * batch_size - len(mine), np.int64)])
    load = _LoadEvalExample(source, image_size, 0, shard_index, False, None, draft, valid=len(mine))
    ds = grain.MapDataset.source(padded).map_with_index(load)
    ds = ds.batch(batch_size, drop_remainder=False, batch_fn=_batch)
    return _to_iterator(ds, workers, threads, prefetch)
