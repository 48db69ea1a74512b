"""Each registered model's defaults as data, and the one table of official weight files.

`default_config(name)` returns a frozen `ModelDefaults`: the resolutions, the test-time crop and
normalisation the weights were evaluated with, the ImageNet top-1 they should reach, and, for names
with released weights, a `WeightsFile` (URL, checksums, license, where the facts come from).
``create_model(name, pretrained=True)`` downloads that file through `fetch_pretrained`.

Sources of the numbers (facts, not code):

* ``nfnet_f0`` ... ``nfnet_f6``: DeepMind's ``deepmind-research/nfnets/README.md`` (the table of
  pre-trained weights: top-1 83.6, 84.7, 85.1, 85.7, 85.9, 86.0, 86.5 for F6+SAM, and the
  ``storage.googleapis.com/dm-nfnets/F{0-6}_haiku.npz`` links). Their evaluation is DeepMind's
  ``crop_resize``: a centered square of ``size / (size + 32)`` of the short side, bicubic.
  The repository is Apache-2.0; the README states no separate license for the weights.
* ``dm_nfnet_f0`` ... ``dm_nfnet_f6``, ``nfnet_l0``, ``eca_nfnet_l0`` ... ``eca_nfnet_l2``: timm's
  ``default_cfgs`` in ``timm/models/nfnet.py`` (resolutions, ``crop_pct``, ``crop_mode``, bicubic,
  ImageNet mean/std, the Hugging Face hub ids ``timm/<name>.<tag>``); the hub's model cards give
  the Apache-2.0 license. The ``dm_*`` files are DeepMind's weights converted by timm, so their
  reference top-1 is DeepMind's (timm measures its own preprocessing, within a few tenths).
  The ECA-NFNets' top-1 are timm's published results (82.59 @ 288, 84.06 @ 320, 84.71 @ 384);
  we found no number for ``nfnet_l0`` we could cite, so its ``top1`` is ``None``.

Checksums, honestly: this package was written without network access, so **no SHA-256 in this
table was computed by us from the files**; every ``sha256`` is ``None``. The ``md5`` of DeepMind's
files are the ones a third-party port (ethanluoyc/jam, ``models/nfnet/checkpoints.py``) publishes,
unverified by us. The Hugging Face URLs follow the hub's ``resolve/main/model.safetensors`` layout
of timm's repositories, also not fetched by us. Hence `fetch_pretrained` refuses to download a
file whose SHA-256 it cannot check unless you give one (``sha256=``, e.g. from a copy you trust)
or opt out explicitly (``trust_download=True``: the first download's digest is then recorded next
to the cached file and later loads are checked against it). A known md5 is checked in every case.
Fill a ``sha256`` here once you have computed it from the official file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from agc_optax.models import weights as weights_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""ImageNet's per-channel RGB mean on the 0-1 scale (multiply by 255 for uint8 pixels)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet's per-channel RGB standard deviation on the 0-1 scale."""

CROP_MODES = ("center", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


class PretrainedWeightsError(ValueError):
    """Raised when official weights cannot be fetched or verified (names the way out)."""


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """One official weight file.

    Attributes:
      url: where it is downloaded from.
      filename: its name in the cache directory.
      format: ``"haiku"`` (DeepMind's dill-pickled Haiku tree) or ``"timm"`` (a timm state dict).
      sha256: the expected SHA-256, or ``None`` when nobody computed it for this table.
      md5: a published MD5 (checked when present; weaker than SHA-256, see the module doc).
      license: the license the weights are released under.
      source: where the URL, license and numbers come from.
    """

    url: str
    filename: str
    format: str
    sha256: str | None
    md5: str | None
    license: str
    source: str


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """A model's defaults, as timm's ``pretrained_cfg``.

    Attributes:
      name: the registry name.
      train_resolution: the training image side in pixels.
      test_resolution: the evaluation image side in pixels.
      crop_fraction: at test time the center crop keeps this fraction of the image (of the short
        side for ``"center"``, of each side for ``"squash"``) before resizing to
        ``test_resolution``; timm's ``crop_pct``.
      crop_mode: ``"center"`` (a centered square) or ``"squash"`` (a centered box of the image's
        aspect ratio, resized to a square: timm's ``crop_mode='squash'``).
      interpolation: the resize filter, ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
      mean: per-channel RGB mean on the 0-1 scale.
      std: per-channel RGB standard deviation on the 0-1 scale.
      num_classes: classes of the released weights' classifier.
      top1: the ImageNet validation top-1 (percent) the released weights should reach at
        ``test_resolution``, or ``None`` when there are none or no citable number.
      weights: the official file, or ``None`` when no weights were released for this name.
    """

    name: str
    train_resolution: int
    test_resolution: int
    crop_fraction: float
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000
    top1: float | None = None
    weights: WeightsFile | None = None

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"ModelDefaults `crop_mode`: expected one of {CROP_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"ModelDefaults `interpolation`: expected one of {INTERPOLATIONS}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError("ModelDefaults `crop_fraction`: expected a fraction in (0, 1]")

    @property
    def license(self) -> str | None:
        """The weights' license, or ``None`` without released weights."""
        return self.weights.license if self.weights else None

    @property
    def url(self) -> str | None:
        """The weights' download URL, or ``None`` without released weights."""
        return self.weights.url if self.weights else None


_DM_SOURCE = "https://github.com/google-deepmind/deepmind-research/tree/master/nfnets"
_DM_LICENSE = "Apache-2.0 (the deepmind-research repository's license)"
# MD5 of F0..F6_haiku.npz as published by ethanluoyc/jam (not verified by us).
_DM_MD5 = (
    "0a41039da1cb43adf47f1b7d86ddfe0f",
    "c9126bbfaf855f9ddb7ff3b902558781",
    "7a018d8d1498020e2f5a8719a1e7f53f",
    "d8e1e78d26db659c486150dbaccbe78a",
    "f5974a7e3388aa81b91a9f1403e759a4",
    "8639e925de951030651ac775b9f915c3",
    "b16cca40ac1ecec2bd5e3273866da0c1",
)
# DeepMind's README: top-1 of F0..F6 (F6 trained with SAM).
_DM_TOP1 = (83.6, 84.7, 85.1, 85.7, 85.9, 86.0, 86.5)
# (train, test) resolutions of F0..F7 (the paper's table; timm's default_cfgs agree).
_F_SIZES = ((192, 256), (224, 320), (256, 352), (320, 416), (384, 512), (416, 544), (448, 576),
            (480, 608))  # fmt: skip
# timm's crop_pct of dm_nfnet_f0..f6 (crop_mode 'squash').
_DM_TIMM_CROP = (0.9, 0.91, 0.92, 0.94, 0.951, 0.954, 0.956)
_TIMM_LICENSE = "Apache-2.0 (timm's Hugging Face model cards)"


def _timm_file(tag: str) -> WeightsFile:
    return WeightsFile(
        url=f"https://huggingface.co/timm/{tag}/resolve/main/model.safetensors",
        filename=f"{tag}.safetensors",
        format="timm",
        sha256=None,
        md5=None,
        license=_TIMM_LICENSE,
        source=f"https://huggingface.co/timm/{tag}",
    )


def _table() -> dict[str, ModelDefaults]:
    table: dict[str, ModelDefaults] = {}
    for i, (train, test) in enumerate(_F_SIZES):
        released = i < len(_DM_TOP1)
        for plus in ("", "_plus"):
            name = f"nfnet_f{i}{plus}"
            official = released and not plus
            table[name] = ModelDefaults(
                name,
                train,
                test,
                crop_fraction=test / (test + 32),  # DeepMind's eval crop_resize
                top1=_DM_TOP1[i] if official else None,
                weights=WeightsFile(
                    url=f"https://storage.googleapis.com/dm-nfnets/F{i}_haiku.npz",
                    filename=f"F{i}_haiku.npz",
                    format="haiku",
                    sha256=None,
                    md5=_DM_MD5[i],
                    license=_DM_LICENSE,
                    source=_DM_SOURCE,
                )
                if official
                else None,
            )
        if released:
            table[f"dm_nfnet_f{i}"] = ModelDefaults(
                f"dm_nfnet_f{i}",
                train,
                test,
                crop_fraction=_DM_TIMM_CROP[i],
                crop_mode="squash",
                top1=_DM_TOP1[i],
                weights=_timm_file(f"dm_nfnet_f{i}.dm_in1k"),
            )
    # timm's own NFNets: evaluated uncropped (test_crop_pct 1.0) at the test resolution.
    for name, tag, train, test, top1 in (
        ("nfnet_l0", "nfnet_l0.ra2_in1k", 224, 288, None),
        ("eca_nfnet_l0", "eca_nfnet_l0.ra2_in1k", 224, 288, 82.59),
        ("eca_nfnet_l1", "eca_nfnet_l1.ra2_in1k", 256, 320, 84.06),
        ("eca_nfnet_l2", "eca_nfnet_l2.ra3_in1k", 320, 384, 84.71),
    ):
        table[name] = ModelDefaults(
            name, train, test, crop_fraction=1.0, top1=top1, weights=_timm_file(tag)
        )
    return table


_DEFAULTS = _table()


def official_defaults(name: str) -> ModelDefaults | None:
    """The table's entry for ``name`` (``None`` if it has none); `default_config` covers every
    registered name."""
    return _DEFAULTS.get(name)


def _default_cache() -> Path:
    return Path(os.environ.get("AGC_OPTAX_CACHE", Path.home() / ".cache" / "agc_optax"))


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_pretrained(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    trust_download: bool = False,
) -> Path:
    """Downloads (once) the official weights of ``name`` and verifies them (needs network).

    Args:
      name: a registered name with released weights (``default_config(name).weights``).
      cache_dir: where files are kept (default ``$AGC_OPTAX_CACHE`` or ``~/.cache/agc_optax``).
      sha256: the file's expected SHA-256, overriding the table's.
      trust_download: accept a file whose SHA-256 neither the table nor ``sha256`` gives; its
        first download's digest is recorded and later loads are checked against that.

    Returns:
      The cached file's path.

    Raises:
      PretrainedWeightsError: for a name without released weights, when no SHA-256 is known and
        ``trust_download`` is false (before any download), or when a checksum does not match.
    """
    defaults = _DEFAULTS.get(name)
    file = defaults.weights if defaults else None
    if file is None:
        raise PretrainedWeightsError(
            f"`pretrained`: no official weights are released for {name!r}; names with weights: "
            f"{', '.join(n for n, d in _DEFAULTS.items() if d.weights)}. Pass a file path instead"
        )
    expected = sha256 or file.sha256
    if expected is None and not trust_download:
        raise PretrainedWeightsError(
            f"`pretrained`: the table in agc_optax.models.pretrained has no verified SHA-256 for "
            f"{name!r} ({file.url}), so the download cannot be checked. Pass the digest "
            f"(`weights_sha256=` / `--sha256`) or accept the file as served "
            f"(`trust_download=True` / `--trust-download`)"
        )
    path = Path(cache_dir) if cache_dir else _default_cache()
    try:
        fetched = weights_lib.fetch_cached(file.url, path / file.filename, expected)
    except ValueError as e:
        raise PretrainedWeightsError(f"`pretrained` {name!r}: {e}") from e
    if file.md5 is not None and (got := _md5(fetched)) != file.md5:
        raise PretrainedWeightsError(
            f"`pretrained` {name!r}: {str(fetched)!r} has md5 {got}, the published one is "
            f"{file.md5}; delete the file to download it again"
        )
    return fetched
