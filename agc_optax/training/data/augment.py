"""Per-image preprocessing on the host: crops, flip, bicubic resize and RandAugment (Pillow).

These run in the input pipeline's worker processes, one image at a time, because every image gets
its own random crop box and its own RandAugment ops: on the host each op is one call into Pillow's
C code on a uint8 image, while on the device a per-example choice among 16 ops would have to
compute all 16 for every image (``vmap`` of a ``switch``). Batch-level mixing (MixUp, CutMix) and
normalisation run on the device instead (:mod:`agc_optax.training.data.mixing`).

Facts follow Brock et al. 2021 (sec. 5 and appendix) and DeepMind's ``nfnets/dataset.py`` and
``nfnets/autoaugment.py`` (the RandAugment port of Cubuk et al. 2020); the code is our own.

Train (:func:`train_image`): an Inception-style random crop of 8%-100% of the image area with
aspect ratio in [3/4, 4/3] (10 tries, then a center crop), a horizontal flip with probability 1/2,
a bicubic resize to ``image_size``, then RandAugment. Eval (:func:`eval_image`): a center crop
whose side is ``image_size / (image_size + 32)`` of the short side (0.875 at 224, 0.889 at 256,
DeepMind's ``crop_resize`` eval), resized bicubically to ``image_size``.

RandAugment (:func:`rand_augment`): ``num_layers`` times, pick one of the 16 ops of
:data:`RANDAUGMENT_OPS` uniformly and apply it at the fixed magnitude ``M`` (0-30, 10 is
"full"). Magnitude to argument, as DeepMind's port (signs of geometric ops are random):

============  ===========================================  ==========  ===========
op            argument at magnitude M                       M=5         M=15
============  ===========================================  ==========  ===========
Rotate        +-30 * M/10 degrees                           +-15        +-45
ShearX/Y      +-0.3 * M/10                                  +-0.15      +-0.45
TranslateX/Y  +-100 * M/10 pixels                           +-50        +-150
Color,        factor 1.8 * M/10 + 0.1 (1 = unchanged)       1.0         2.8
Contrast,
Brightness,
Sharpness
Posterize     keep int(4 * M/10) bits                       2           6
Solarize      invert pixels >= int(256 * M/10)              128         384 (none)
SolarizeAdd   add int(110 * M/10) to pixels < 128           55          165
Cutout        a gray square of side 2 * int(40 * M/10)      40          120
AutoContrast, Equalize, Invert: no argument
============  ===========================================  ==========  ===========

Empty pixels left by geometric ops, and cutout squares, are gray (128, 128, 128). Contrast blends
towards the mean gray level as Pillow's ``ImageEnhance.Contrast`` does (the TF port used the pixel
count / 256 instead, a known slip we do not reproduce).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np

GRAY = (128, 128, 128)
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
EVAL_PADDING = 32
"""Eval crops keep ``size / (size + EVAL_PADDING)`` of the short side."""

_MAX_LEVEL = 10.0


# --------------------------------------------------------------------------- crops


def random_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    area_range: tuple[float, float] = CROP_AREA,
    aspect_range: tuple[float, float] = CROP_ASPECT,
    attempts: int = CROP_ATTEMPTS,
    fallback_size: int = 224,
) -> tuple[int, int, int, int]:
    """An Inception-style random crop ``(left, top, crop_width, crop_height)`` in pixels.

    Each try draws an area fraction uniformly from ``area_range`` and an aspect ratio (width /
    height) uniformly from ``aspect_range``; the first box that fits is placed uniformly at
    random. If none of ``attempts`` fits (a very elongated image), the eval center crop is used.

    >>> left, top, w, h = random_crop_box(300, 200, np.random.default_rng(0))
    >>> 0.08 <= w * h / (300 * 200) <= 1 and 3 / 4 <= w / h <= 4 / 3 + 0.02
    True
    """
    image_area = width * height
    for _ in range(attempts):
        area = rng.uniform(*area_range) * image_area
        aspect = rng.uniform(*aspect_range)
        crop_w = int(round(math.sqrt(area * aspect)))
        crop_h = int(round(math.sqrt(area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return left, top, crop_w, crop_h
    return center_crop_box(width, height, fallback_size)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The eval crop: a centered square of ``size / (size + 32)`` of the short side.

    >>> center_crop_box(500, 375, 224)
    (86, 24, 328, 328)
    """
    scale = min(height / (size + EVAL_PADDING), width / (size + EVAL_PADDING))
    crop = max(1, int(scale * size))
    return (width - crop + 1) // 2, (height - crop + 1) // 2, crop, crop


def _crop_resize(data: bytes, box_fn: Callable, size: int, draft: bool):
    """Decodes (at a reduced JPEG scale where the crop allows) and resizes the chosen box."""
    from PIL import Image

    from agc_optax.training.data.sources import decode_image

    with Image.open(io.BytesIO(data)) as header:  # reads the header only
        width, height = header.size
    left, top, crop_w, crop_h = box_fn(width, height)
    draft_size = None
    if draft:
        # The largest JPEG reduction that still leaves the crop at least `size` pixels a side.
        factor = min(crop_w / size, crop_h / size)
        if factor >= 2:
            draft_size = (math.ceil(width / factor), math.ceil(height / factor))
    image = decode_image(data, draft_size=draft_size)
    sx, sy = image.size[0] / width, image.size[1] / height
    box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def train_image(
    data: bytes,
    rng: np.random.Generator,
    size: int,
    *,
    randaugment: tuple[int, int] | None = None,
    draft: bool = True,
) -> np.ndarray:
    """Random crop, flip, bicubic resize and (optionally) RandAugment: ``(size, size, 3)`` uint8.

    Args:
      data: encoded image bytes (any format Pillow reads).
      rng: this example's generator (the pipeline derives it from the seed and position).
      size: output side length.
      randaugment: ``(num_layers, magnitude)``, or None for no RandAugment.
      draft: let libjpeg decode at 1/2-1/8 scale when the crop is large enough.
    """
    from PIL import Image

    image = _crop_resize(
        data, lambda w, h: random_crop_box(w, h, rng, fallback_size=size), size, draft
    )
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if randaugment is not None:
        image = rand_augment(image, rng, *randaugment)
    return np.asarray(image, np.uint8)


def eval_image(data: bytes, size: int, *, draft: bool = True) -> np.ndarray:
    """Center crop (:func:`center_crop_box`) resized bicubically: ``(size, size, 3)`` uint8."""
    image = _crop_resize(data, lambda w, h: center_crop_box(w, h, size), size, draft)
    return np.asarray(image, np.uint8)


# --------------------------------------------------------------------------- RandAugment ops
# Each op takes a PIL RGB image and its explicit argument; rand_augment maps magnitudes to them.


def _lut(image, table):
    return image.point(list(table) * 3)


def auto_contrast(image):
    """Stretches each channel so its darkest pixel is 0 and its brightest 255."""
    from PIL import ImageOps

    return ImageOps.autocontrast(image)


def equalize(image):
    """Histogram equalization of each channel (Pillow's ``ImageOps.equalize``)."""
    from PIL import ImageOps

    return ImageOps.equalize(image)


def invert(image):
    """``255 - pixel``."""
    return _lut(image, range(255, -1, -1))


def posterize(image, bits: int):
    """Keeps the ``bits`` most significant bits of every pixel."""
    shift = 8 - max(0, min(8, bits))
    return _lut(image, ((v >> shift) << shift for v in range(256)))


def solarize(image, threshold: int):
    """Inverts pixels at or above ``threshold``."""
    return _lut(image, (v if v < threshold else 255 - v for v in range(256)))


def solarize_add(image, addition: int, threshold: int = 128):
    """Adds ``addition`` (clipped to [0, 255]) to pixels below ``threshold``."""
    return _lut(image, (min(255, max(0, v + addition)) if v < threshold else v for v in range(256)))


def color(image, factor: float):
    """Blends the image with its grayscale version: 0 gray, 1 unchanged, >1 more saturated."""
    from PIL import ImageEnhance

    return ImageEnhance.Color(image).enhance(factor)


def contrast(image, factor: float):
    """Blends the image with a flat image of its mean gray level."""
    from PIL import ImageEnhance

    return ImageEnhance.Contrast(image).enhance(factor)


def brightness(image, factor: float):
    """Blends the image with black."""
    from PIL import ImageEnhance

    return ImageEnhance.Brightness(image).enhance(factor)


def sharpness(image, factor: float):
    """Blends with a 3x3 smoothed copy (kernel 1 1 1 / 1 5 1 / 1 1 1, border pixels kept)."""
    from PIL import ImageEnhance

    return ImageEnhance.Sharpness(image).enhance(factor)


def _affine(image, coefficients):
    # Output pixel (x, y) samples input (a x + b y + c, d x + e y + f), nearest neighbour.
    from PIL import Image

    return image.transform(
        image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.NEAREST, fillcolor=GRAY
    )


def shear_x(image, level: float):
    """Output ``(x, y)`` takes input ``(x + level * y, y)``."""
    return _affine(image, (1.0, level, 0.0, 0.0, 1.0, 0.0))


def shear_y(image, level: float):
    """Output ``(x, y)`` takes input ``(x, level * x + y)``."""
    return _affine(image, (1.0, 0.0, 0.0, level, 1.0, 0.0))


def translate_x(image, pixels: float):
    """Output ``(x, y)`` takes input ``(x + pixels, y)``: content moves left by ``pixels``."""
    return _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(image, pixels: float):
    """Output ``(x, y)`` takes input ``(x, y + pixels)``: content moves up by ``pixels``."""
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


def rotate(image, degrees: float):
    """Rotates counter-clockwise about the image center, nearest neighbour, gray corners."""
    from PIL import Image

    return image.rotate(degrees, resample=Image.Resampling.NEAREST, fillcolor=GRAY)


def cutout(image, pad: int, center: tuple[int, int]):
    """Fills rows ``[cy - pad, cy + pad)`` and columns ``[cx - pad, cx + pad)`` with gray."""
    cx, cy = center
    pixels = np.array(image)
    pixels[max(0, cy - pad) : max(0, cy + pad), max(0, cx - pad) : max(0, cx + pad)] = GRAY
    from PIL import Image

    return Image.fromarray(pixels)


def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


def _enhance_factor(m: float) -> float:
    return m / _MAX_LEVEL * 1.8 + 0.1


# name -> function (image, magnitude, rng) -> image, in DeepMind's order.
RANDAUGMENT_OPS: dict[str, Callable] = {
    "AutoContrast": lambda im, m, rng: auto_contrast(im),
    "Equalize": lambda im, m, rng: equalize(im),
    "Invert": lambda im, m, rng: invert(im),
    "Rotate": lambda im, m, rng: rotate(im, _signed(m / _MAX_LEVEL * 30.0, rng)),
    "Posterize": lambda im, m, rng: posterize(im, int(m / _MAX_LEVEL * 4)),
    "Solarize": lambda im, m, rng: solarize(im, int(m / _MAX_LEVEL * 256)),
    "Color": lambda im, m, rng: color(im, _enhance_factor(m)),
    "Contrast": lambda im, m, rng: contrast(im, _enhance_factor(m)),
    "Brightness": lambda im, m, rng: brightness(im, _enhance_factor(m)),
    "Sharpness": lambda im, m, rng: sharpness(im, _enhance_factor(m)),
    "ShearX": lambda im, m, rng: shear_x(im, _signed(m / _MAX_LEVEL * 0.3, rng)),
    "ShearY": lambda im, m, rng: shear_y(im, _signed(m / _MAX_LEVEL * 0.3, rng)),
    "TranslateX": lambda im, m, rng: translate_x(im, _signed(m / _MAX_LEVEL * 100.0, rng)),
    "TranslateY": lambda im, m, rng: translate_y(im, _signed(m / _MAX_LEVEL * 100.0, rng)),
    "Cutout": lambda im, m, rng: cutout(
        im,
        int(m / _MAX_LEVEL * 40),
        (int(rng.integers(0, im.size[0])), int(rng.integers(0, im.size[1]))),
    ),
    "SolarizeAdd": lambda im, m, rng: solarize_add(im, int(m / _MAX_LEVEL * 110)),
}
"""The RandAugment op set, each as ``(image, magnitude, rng) -> image``."""


def rand_augment(image, rng: np.random.Generator, num_layers: int, magnitude: float):
    """Applies ``num_layers`` ops drawn uniformly (with replacement) from :data:`RANDAUGMENT_OPS`.

    Args:
      image: a PIL RGB image.
      rng: the example's generator.
      num_layers: ops applied in sequence (4 for NFNets' "405").
      magnitude: shared magnitude M (5 for F0, 10 for F1-F2, 15 for F3-F7).

    >>> from PIL import Image
    >>> out = rand_augment(Image.new("RGB", (8, 8), (10, 200, 30)), np.random.default_rng(0), 4, 5)
    >>> out.size, out.mode
    ((8, 8), 'RGB')
    """
    ops = list(RANDAUGMENT_OPS.values())
    for _ in range(num_layers):
        image = ops[int(rng.integers(0, len(ops)))](image, magnitude, rng)
    return image
