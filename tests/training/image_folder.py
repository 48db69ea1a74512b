"""Generated ImageFolder trees for the streaming-pipeline tests (never real data, never a download).

Each class's images are a flat colour (plus a little noise) chosen by the class, so a test can
check from the pixels alone that an image travelled with its own label.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image

CLASS_COLOURS = {"ant": (220, 40, 40), "bee": (40, 200, 60), "cat": (50, 60, 230)}


def colour_of(label: int) -> np.ndarray:
    return np.array(list(CLASS_COLOURS.values())[label], np.float64)


def _image(rng, label: int, size: tuple[int, int]) -> Image.Image:
    w, h = size
    base = colour_of(label)
    noise = rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_image_folder(
    root: pathlib.Path,
    per_class: int = 4,
    val_per_class: int = 2,
    seed: int = 0,
    odd_files: bool = True,
) -> dict:
    """Writes ``root/{train,val}/<class>/*``; with ``odd_files`` the train split also holds a
    grayscale JPEG, a CMYK JPEG, a PNG named ``.JPEG``, an upper-case ``.PNG``, one corrupt
    ``.jpg`` and a ``notes.txt``.

    Returns:
      ``{"train": n_decodable, "val": n, "corrupt": "train/<class>/<name>"}``.
    """
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0, "corrupt": None}
    for split, n in (("train", per_class), ("val", val_per_class)):
        for label, name in enumerate(CLASS_COLOURS):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (int(rng.integers(24, 90)), int(rng.integers(24, 90)))
                _image(rng, label, size).save(d / f"img{i}.jpg", quality=95)
                counts[split] += 1
    if odd_files:
        ant, bee, cat = (root / "train" / n for n in CLASS_COLOURS)
        gray = _image(rng, 0, (40, 30)).convert("L")
        gray.save(ant / "gray.jpeg", quality=95)
        cmyk = _image(rng, 1, (50, 36)).convert("CMYK")
        cmyk.save(bee / "cmyk.jpg", quality=95)
        buf = io.BytesIO()
        _image(rng, 2, (33, 45)).save(buf, "PNG")
        (cat / "really_png.JPEG").write_bytes(buf.getvalue())
        _image(rng, 2, (30, 30)).save(cat / "upper.PNG")
        (cat / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" + bytes(200))
        (ant / "notes.txt").write_text("not an image")
        counts["train"] += 4
        counts["corrupt"] = "train/cat/broken.jpg"
    return counts
