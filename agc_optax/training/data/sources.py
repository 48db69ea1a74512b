"""Random-access image sources for the streaming pipeline: ImageFolder trees, ArrayRecord shards.

A source holds only file names (or shard handles), never pixels: ``source[i]`` reads one encoded
image from disk and returns an :class:`EncodedImage`. Decoding happens later, in the pipeline's
worker processes (``decode_image``), so that the cost of reading scales with the batch, not with
the dataset.

ImageFolder layout (ImageNet's standard train/val trees, Imagenette, most user datasets)::

    DIR/train/<class>/<anything>.{jpg,jpeg,png}     (extensions case-insensitive)
    DIR/val/<class>/...

Classes are the train split's sub-directories sorted by name; label ``k`` is the ``k``-th of them.
Other files (``.txt``, ``.DS_Store``, ...) are ignored.

ArrayRecord layout, written by ``agc-prepare`` (:func:`write_array_records`)::

    OUT/class_names.json                             ["n01440764", ...]
    OUT/train-00000-of-00004.array_record            one record per image (see :func:`pack_record`)
    OUT/val-00000-of-00001.array_record
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import sys
import warnings
from collections.abc import Sequence

import numpy as np

from agc_optax.training.data.in_memory import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File name endings an ImageFolder source reads (compared case-insensitively)."""

SPLITS = ("train", "val")
CLASS_NAMES_FILE = "class_names.json"
_RECORD_HEADER = struct.Struct("<iH")  # label, length of the relative path in bytes


class CorruptImageWarning(UserWarning):
    """A file could not be decoded as an image; it is skipped and counted."""


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """One record as read from a source: still-encoded bytes, the label, where it came from."""

    data: bytes
    label: int
    name: str  # path relative to the data directory, for warnings


def _require(module: str, extra: str = "data"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"the streaming input pipeline needs `{module}`: pip install 'agc_optax[{extra}]'"
        ) from None


def decode_image(data: bytes, *, draft_size: tuple[int, int] | None = None):
    """Decodes encoded image bytes into an RGB ``PIL.Image`` (whatever the file's extension says).

    Grayscale, palette, CMYK and alpha images become 3-channel RGB, as ImageNet holds a few
    grayscale and CMYK JPEGs. The format is sniffed from the bytes, so a PNG named ``.JPEG``
    decodes too.

    Args:
      data: the file's bytes.
      draft_size: if given, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
        scaling, much cheaper than decoding full size) as long as the result stays at least this
        ``(width, height)``; the caller reads the decoded size from the returned image.

    Raises:
      OSError or ValueError: the bytes are not a decodable image (callers skip and count it).

    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("L", (5, 3), 7).save(buf, "PNG")
    >>> decode_image(buf.getvalue()).mode, decode_image(buf.getvalue()).size
    ('RGB', (5, 3))
    """
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if draft_size is not None and image.format == "JPEG":
        # draft() keeps the JPEG in its own colour space; the conversion below makes it RGB.
        image.draft(image.mode, draft_size)
    image.load()
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root: str, split: str, class_names: Sequence[str] | None = None):
    """The ``(relative_path, label)`` pairs of ``root/split``, in a fixed order.

    Args:
      root: the dataset directory (holding ``train/`` and ``val/``).
      split: ``"train"`` or ``"val"``.
      class_names: the label order; by default the split's sub-directories sorted by name.

    Returns:
      ``(files, class_names)``: files sorted by class, then by file name.
    """
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
        raise DataError(
            f"`{root}` has no `{split}/` directory; expected {root}/{split}/<class>/<image files>"
        )
    found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if class_names is None:
        class_names = found
    if not class_names:
        raise DataError(f"`{directory}` has no class sub-directories")
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(
            f"`{directory}` has classes not in the train split: {', '.join(unknown[:5])}"
        )
    files = []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(directory, name)
        if not os.path.isdir(class_dir):
            continue  # a class absent from this split (a small validation set)
        for file in sorted(os.listdir(class_dir)):
            if _is_image_name(file) and os.path.isfile(os.path.join(class_dir, file)):
                files.append((f"{split}/{name}/{file}", label))
    if not files:
        raise DataError(f"`{directory}` holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    return files, list(class_names)


class ImageFolderSource:
    """``root/split/<class>/*`` as a random-access source of :class:`EncodedImage`.

    Only the file list is kept in memory (a few hundred bytes per image); ``source[i]`` reads file
    ``i``. Picklable, so grain's worker processes each read their own files.

    Args:
      root: the dataset directory.
      split: ``"train"`` or ``"val"``.
      class_names: label order; by default read from ``root/train``.
    """

    def __init__(self, root: str, split: str, class_names: Sequence[str] | None = None):
        if class_names is None:
            _, class_names = list_image_folder(root, "train")
        files, self.class_names = list_image_folder(root, split, class_names)
        self.root = root
        self.split = split
        self._paths = [f for f, _ in files]
        self._labels = np.array([label for _, label in files], np.int32)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> EncodedImage:
        name = self._paths[index]
        with open(os.path.join(self.root, name), "rb") as f:
            return EncodedImage(f.read(), int(self._labels[index]), name)

    @property
    def labels(self) -> np.ndarray:
        """Every record's label, without reading any image."""
        return self._labels

    def __repr__(self) -> str:  # grain compares sources by repr when restoring an iterator
        return f"ImageFolderSource(root={self.root!r}, split={self.split!r}, n={len(self)})"


def pack_record(image: EncodedImage) -> bytes:
    """One ArrayRecord record: little-endian int32 label, uint16 name length, name, image bytes.

    >>> unpack_record(pack_record(EncodedImage(b"jpeg...", 3, "train/a/1.jpg")))
    EncodedImage(data=b'jpeg...', label=3, name='train/a/1.jpg')
    """
    name = image.name.encode()
    return _RECORD_HEADER.pack(image.label, len(name)) + name + image.data


def unpack_record(record: bytes) -> EncodedImage:
    """Inverse of :func:`pack_record`."""
    label, name_len = _RECORD_HEADER.unpack_from(record)
    start = _RECORD_HEADER.size
    name = record[start : start + name_len].decode()
    return EncodedImage(record[start + name_len :], label, name)


def shard_paths(directory: str, split: str) -> list[str]:
    """The ArrayRecord shards of ``split`` in ``directory``, in shard order."""
    if not os.path.isdir(directory):
        raise DataError(f"`--data-dir` `{directory}` does not exist")
    names = sorted(
        n
        for n in os.listdir(directory)
        if n.startswith(f"{split}-") and n.endswith(".array_record")
    )
    if not names:
        raise DataError(
            f"`{directory}` has no `{split}-*.array_record` shards; write them with "
            f"`agc-prepare --input IMAGEFOLDER --output {directory}`"
        )
    return [os.path.join(directory, n) for n in names]


def read_class_names(directory: str) -> list[str]:
    path = os.path.join(directory, CLASS_NAMES_FILE)
    try:
        with open(path) as f:
            names = json.load(f)
    except FileNotFoundError:
        raise DataError(f"`{path}` is missing; `agc-prepare` writes it beside the shards") from None
    except json.JSONDecodeError as e:
        raise DataError(f"`{path}` is not valid JSON ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"`{path}` must hold a JSON list of class names")
    return names


class ArrayRecordSource:
    """ArrayRecord shards written by ``agc-prepare`` as a random-access source.

    Reading is delegated to grain's ``ArrayRecordDataSource`` (random access across shards, opened
    lazily in each worker process).

    Args:
      directory: the ``--output`` directory of ``agc-prepare``.
      split: ``"train"`` or ``"val"``.
    """

    def __init__(self, directory: str, split: str):
        self.directory = directory
        self.split = split
        self._paths = shard_paths(directory, split)
        self.class_names = read_class_names(directory)
        grain = _require("grain")
        self._source = grain.sources.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> EncodedImage:
        return unpack_record(self._source[index])

    def __repr__(self) -> str:
        return f"ArrayRecordSource(directory={self.directory!r}, split={self.split!r})"


def open_source(kind: str, data_dir: str, split: str, class_names=None):
    """``"imagefolder"`` or ``"arrayrecord"`` source of ``split`` in ``data_dir``."""
    if not data_dir:
        raise DataError(f"`--dataset {kind}` needs `--data-dir`")
    if not os.path.isdir(data_dir):
        raise DataError(f"`--data-dir` `{data_dir}` does not exist")
    if kind == "imagefolder":
        return ImageFolderSource(data_dir, split, class_names)
    if kind == "arrayrecord":
        return ArrayRecordSource(data_dir, split)
    raise DataError(f"unknown streaming dataset `{kind}`; valid: imagefolder, arrayrecord")


def _check_decodes(data: bytes) -> None:
    # A draft-size decode checks the whole entropy-coded stream at a fraction of the cost.
    decode_image(data, draft_size=(64, 64))


def write_array_records(
    input_dir: str,
    output_dir: str,
    *,
    records_per_shard: int = 1024,
    progress: bool = True,
) -> dict[str, int]:
    """Writes an ImageFolder tree as ArrayRecord shards plus ``class_names.json``.

    Records keep the original encoded bytes (no re-encoding, so nothing is lost), in the order of
    :func:`list_image_folder`; shards are written with group size 1 for random access. The
    output depends only on the input files: preparing twice gives identical shards. Files that do
    not decode are skipped with a :class:`CorruptImageWarning` and counted.

    Args:
      input_dir: the ImageFolder directory (``train/`` required, ``val/`` if present).
      output_dir: created if missing; existing shards of the same split are replaced.
      records_per_shard: records in each shard (the last one may hold fewer).
      progress: show a progress bar (tqdm, when installed) on stderr.

    Returns:
      Counts: ``{"train": n, "val": n, "skipped": n}``.
    """
    if records_per_shard < 1:
        raise DataError(f"`--records-per-shard` must be >= 1, got {records_per_shard}")
    if not os.path.isdir(input_dir):
        raise DataError(f"`--input` `{input_dir}` does not exist")
    writer_module = _require("array_record.python.array_record_module")
    _, class_names = list_image_folder(input_dir, "train")
    os.makedirs(output_dir, exist_ok=True)
    counts = {"skipped": 0}
    for split in SPLITS:
        if split != "train" and not os.path.isdir(os.path.join(input_dir, split)):
            continue
        files, _ = list_image_folder(input_dir, split, class_names)
        for old in os.listdir(output_dir):
            if old.startswith(f"{split}-") and old.endswith(".array_record"):
                os.remove(os.path.join(output_dir, old))
        records = _read_valid(input_dir, files, split, counts, progress)
        num_shards = max(1, -(-len(records) // records_per_shard))
        for shard in range(num_shards):
            path = os.path.join(output_dir, f"{split}-{shard:05d}-of-{num_shards:05d}.array_record")
            writer = writer_module.ArrayRecordWriter(path, "group_size:1")
            for record in records[shard * records_per_shard : (shard + 1) * records_per_shard]:
                writer.write(record)
            writer.close()
        counts[split] = len(records)
    with open(os.path.join(output_dir, CLASS_NAMES_FILE), "w") as f:
        json.dump(class_names, f, indent=0)
    return counts


def _read_valid(input_dir, files, split, counts, progress) -> list[bytes]:
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(files), desc=split, unit="img", file=sys.stderr)
        except ImportError:
            pass
    records = []
    for name, label in files:
        with open(os.path.join(input_dir, name), "rb") as f:
            data = f.read()
        try:
            _check_decodes(data)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for bad files
            counts["skipped"] += 1
            warnings.warn(
                f"skipping `{name}`: not a decodable image ({type(e).__name__}: {e})",
                CorruptImageWarning,
                stacklevel=3,
            )
        else:
            records.append(pack_record(EncodedImage(data, label, name)))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return records
