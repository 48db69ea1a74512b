"""Host augmentations (crops, flip, RandAugment ops) and device mixing, against references
computed another way (numpy float64 formulas, pixel geometry, distribution statistics)."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from agc_optax.training.data import augment, mixing

# --------------------------------------------------------------------------- crops


def test_random_crop_statistics_match_the_inception_ranges():
    rng = np.random.default_rng(0)
    w, h = 500, 375
    boxes = np.array([augment.random_crop_box(w, h, rng) for _ in range(20000)])
    left, top, cw, ch = boxes.T
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + cw <= w).all() and (top + ch <= h).all()
    area = cw * ch / (w * h)
    aspect = cw / ch
    # Rounding each side to whole pixels moves area and aspect by at most ~1 pixel's worth.
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    assert area.min() < 0.085 and area.max() > 0.9  # both ends of the range are reached
    assert aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    assert aspect.min() < 0.76 and aspect.max() > 1.32
    # Placement is uniform: crop centres average to the image centre.
    assert abs(np.mean(left + cw / 2) - w / 2) < 3 and abs(np.mean(top + ch / 2) - h / 2) < 3


def test_random_crop_area_is_uniform_where_every_draw_fits():
    # On a square image every box of area <= 0.5 fits (longest side sqrt(0.5 * 4/3) < 1): draws
    # there are never rejected, and retries after a rejection are uniform too, so the accepted
    # areas have a flat density on [0.08, 0.5] (and more mass than 0.42 / 0.92 from the retries).
    rng = np.random.default_rng(1)
    boxes = np.array([augment.random_crop_box(400, 400, rng) for _ in range(20000)])
    area = boxes[:, 2] * boxes[:, 3] / 400**2
    low = np.mean((area >= 0.08) & (area < 0.29))
    high = np.mean((area >= 0.29) & (area < 0.5))
    assert abs(low - high) < 0.015  # each ~0.26, binomial standard deviation ~0.003
    assert low + high > 0.42 / 0.92


def test_crop_falls_back_to_the_center_crop_when_nothing_fits():
    rng = np.random.default_rng(0)
    for _ in range(50):  # a 1000 x 10 strip: no box with aspect <= 4/3 and area >= 8% fits
        assert augment.random_crop_box(1000, 10, rng, fallback_size=64) == (
            augment.center_crop_box(1000, 10, 64)
        )


def test_center_crop_box_keeps_size_over_size_plus_32_of_the_short_side():
    for w, h, size in [(500, 375, 224), (375, 500, 256), (288, 288, 256), (64, 90, 32)]:
        left, top, cw, ch = augment.center_crop_box(w, h, size)
        expected = int(min(w, h) * size / (size + 32))
        assert cw == ch == expected
        assert abs((left + cw / 2) - w / 2) <= 1 and abs((top + ch / 2) - h / 2) <= 1


def _ramp_jpeg(w: int, h: int) -> bytes:
    # Red encodes x, green encodes y: where each output pixel came from is readable.
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    img = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def test_eval_image_covers_exactly_the_center_crop():
    w, h, size = 300, 200, 48
    out = augment.eval_image(_ramp_jpeg(w, h), size).astype(np.float64)
    assert out.shape == (size, size, 3) and out.dtype == np.float64
    left, top, c, _ = augment.center_crop_box(w, h, size)
    # The output's columns span the crop's x range (bicubic: within a pixel at the edges).
    x_lo, x_hi = left * 255 / (w - 1), (left + c - 1) * 255 / (w - 1)
    assert abs(out[:, 0, 0].mean() - x_lo) < 4 and abs(out[:, -1, 0].mean() - x_hi) < 4
    y_lo, y_hi = top * 255 / (h - 1), (top + c - 1) * 255 / (h - 1)
    assert abs(out[0, :, 1].mean() - y_lo) < 5 and abs(out[-1, :, 1].mean() - y_hi) < 5


def test_train_image_flips_half_the_time_and_draft_decoding_matches_full_decoding():
    # Left half dark, right half bright: a flipped crop has its bright side on the left.
    img = np.zeros((240, 320, 3), np.uint8)
    img[:, 160:] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    flipped = 0
    draws = 300
    for i in range(draws):
        out = augment.train_image(data, np.random.default_rng(i), 32).astype(float)
        flipped += out[:, :16].mean() > out[:, 16:].mean() + 1
    # Binomial(300, 1/2) stays within 5 standard deviations (+-43) of 150.
    assert abs(flipped - draws / 2) < 43
    # Draft mode (DCT-scaled decoding when the crop allows) changes pixels only slightly.
    for i in range(5):
        a = augment.train_image(data, np.random.default_rng(i), 32, draft=True).astype(float)
        b = augment.train_image(data, np.random.default_rng(i), 32, draft=False).astype(float)
        assert np.abs(a - b).mean() < 6


# --------------------------------------------------------------------------- RandAugment ops


@pytest.fixture(scope="module")
def small_image():
    rng = np.random.default_rng(3)
    # Enough pixels that equalize's histogram step is non-zero, a mid range that autocontrast
    # stretches.
    return rng.integers(40, 200, (24, 30, 3)).astype(np.uint8)


def _pil(a):
    return Image.fromarray(a)


def _luma(a):
    # ITU-R 601-2 luma, as Pillow's "L" conversion defines it.
    a = a.astype(np.float64)
    return a[..., 0] * 299 / 1000 + a[..., 1] * 587 / 1000 + a[..., 2] * 114 / 1000


def _blend(degenerate, image, factor):
    return np.clip(degenerate + factor * (image.astype(np.float64) - degenerate), 0, 255)


def _affine_reference(a, coefficients):
    """Nearest-neighbour inverse mapping at pixel centres, gray outside, in float64 numpy."""
    ca, cb, cc, cd, ce, cf = coefficients
    h, w, _ = a.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    src_x = np.floor(ca * xs + cb * ys + cc).astype(int)
    src_y = np.floor(cd * xs + ce * ys + cf).astype(int)
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    out = np.full_like(a, 128)
    out[inside] = a[src_y[inside], src_x[inside]]
    return out


def _equalize_reference(a):
    out = np.empty_like(a)
    for c in range(3):
        ch = a[..., c]
        hist = np.bincount(ch.ravel(), minlength=256)
        nonzero = hist[hist > 0]
        step = (nonzero.sum() - nonzero[-1]) // 255
        if step == 0:
            out[..., c] = ch
            continue
        lut = (np.cumsum(hist) + step // 2) // step
        lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
        out[..., c] = lut[ch]
    return out


def _autocontrast_reference(a):
    out = np.empty_like(a)
    for c in range(3):
        ch = a[..., c].astype(np.float64)
        lo, hi = ch.min(), ch.max()
        out[..., c] = np.clip(np.floor((ch - lo) * 255 / (hi - lo)), 0, 255)
    return out


def _sharpness_reference(a, factor):
    af = a.astype(np.float64)
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13
    smooth = af.copy()
    h, w, _ = a.shape
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            smooth[y, x] = np.einsum("ij,ijc->c", kernel, af[y - 1 : y + 2, x - 1 : x + 2])
    return _blend(np.round(smooth), a, factor)


# (op name, function under test, reference, tolerance in levels)
OPS = [
    ("invert", lambda im: augment.invert(im), lambda a: 255 - a, 0),
    ("posterize", lambda im: augment.posterize(im, 3), lambda a: (a >> 5) << 5, 0),
    (
        "solarize",
        lambda im: augment.solarize(im, 100),
        lambda a: np.where(a < 100, a, 255 - a),
        0,
    ),
    (
        "solarize_add",
        lambda im: augment.solarize_add(im, 55),
        lambda a: np.where(a < 128, np.minimum(a.astype(int) + 55, 255), a),
        0,
    ),
    ("auto_contrast", augment.auto_contrast, _autocontrast_reference, 1),
    ("equalize", augment.equalize, _equalize_reference, 0),
    (
        "color",
        lambda im: augment.color(im, 1.9),
        lambda a: _blend(np.round(_luma(a))[..., None], a, 1.9),
        1,
    ),
    (
        "contrast",
        lambda im: augment.contrast(im, 0.4),
        lambda a: _blend(np.floor(_luma(a).round().mean() + 0.5), a, 0.4),
        1,
    ),
    ("brightness", lambda im: augment.brightness(im, 1.6), lambda a: _blend(0.0, a, 1.6), 1),
    ("sharpness", lambda im: augment.sharpness(im, 1.9), lambda a: _sharpness_reference(a, 1.9), 1),
    (
        "translate_x",
        lambda im: augment.translate_x(im, 4),
        lambda a: _affine_reference(a, (1, 0, 4, 0, 1, 0)),
        0,
    ),
    (
        "translate_y",
        lambda im: augment.translate_y(im, -3),
        lambda a: _affine_reference(a, (1, 0, 0, 0, 1, -3)),
        0,
    ),
    (
        "shear_x",
        lambda im: augment.shear_x(im, 0.3),
        lambda a: _affine_reference(a, (1, 0.3, 0, 0, 1, 0)),
        0,
    ),
    (
        "shear_y",
        lambda im: augment.shear_y(im, -0.15),
        lambda a: _affine_reference(a, (1, 0, 0, -0.15, 1, 0)),
        0,
    ),
]


@pytest.mark.parametrize(("name", "op", "reference", "tol"), OPS, ids=[o[0] for o in OPS])
def test_randaugment_op_matches_reference(small_image, name, op, reference, tol):
    out = np.asarray(op(_pil(small_image))).astype(np.float64)
    ref = np.asarray(reference(small_image)).astype(np.float64)
    assert out.shape == small_image.shape
    diff = np.abs(out - ref)
    assert diff.max() <= tol, f"{name}: max difference {diff.max()}"
    if name not in ("invert",):  # the op really changed the image (the test can fail)
        assert np.abs(out - small_image).max() > 0


def test_rotate_matches_a_rotated_coordinate_reference():
    a = np.random.default_rng(5).integers(0, 256, (21, 21, 3)).astype(np.uint8)
    out = np.asarray(augment.rotate(_pil(a), 90.0))
    # 90 degrees counter-clockwise about the centre of a square image is np.rot90.
    np.testing.assert_array_equal(out, np.rot90(a))
    angle = np.deg2rad(15.0)
    c, s = np.cos(angle), np.sin(angle)
    cx = cy = 21 / 2
    # Output (x, y) samples input R^-1 (x - c) + c; PIL's y axis points down.
    coefficients = (c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy)
    ref = _affine_reference(a, coefficients)
    out = np.asarray(augment.rotate(_pil(a), 15.0))
    assert np.mean(np.all(out == ref, axis=-1)) > 0.97  # ties at pixel boundaries may differ


def test_cutout_fills_exactly_the_clipped_square():
    a = np.full((12, 16, 3), 7, np.uint8)
    out = np.asarray(augment.cutout(_pil(a), 3, (14, 1)))
    gray = np.all(out == 128, axis=-1)
    expected = np.zeros((12, 16), bool)
    expected[0:4, 11:16] = True  # rows 1-3..1+3 clipped at 0, columns 14-3..14+3 clipped at 16
    np.testing.assert_array_equal(gray, expected)
    assert (out[~expected] == 7).all()


@pytest.mark.parametrize("magnitude", [5, 15])
def test_randaugment_magnitudes_map_to_deepminds_arguments(small_image, magnitude):
    im = _pil(small_image)
    rng = np.random.default_rng(0)
    m = magnitude / 10
    bits = int(4 * m)  # 2 at M=5, 6 at M=15
    np.testing.assert_array_equal(
        np.asarray(augment.RANDAUGMENT_OPS["Posterize"](im, magnitude, rng)),
        (small_image >> (8 - bits)) << (8 - bits),
    )
    threshold = int(256 * m)  # 128 at M=5; 384 at M=15 leaves every pixel alone
    np.testing.assert_array_equal(
        np.asarray(augment.RANDAUGMENT_OPS["Solarize"](im, magnitude, rng)),
        np.where(small_image < threshold, small_image, 255 - small_image),
    )
    factor = 1.8 * m + 0.1
    np.testing.assert_allclose(
        np.asarray(augment.RANDAUGMENT_OPS["Brightness"](im, magnitude, rng)),
        _blend(0.0, small_image, factor),
        atol=1,
    )
    # Translations move by 100 * M / 10 pixels, in a random direction.
    flat = _pil(np.full((4, 400, 3), 50, np.uint8))
    shifts = set()
    for seed in range(20):
        out = np.asarray(
            augment.RANDAUGMENT_OPS["TranslateX"](flat, magnitude, np.random.default_rng(seed))
        )
        gray = np.all(out[0] == 128, axis=-1)
        shifts.add((int(gray.sum()), bool(gray[0])))  # width and side of the emptied strip
    assert shifts == {(int(100 * m), True), (int(100 * m), False)}
    assert len(augment.RANDAUGMENT_OPS) == 16


def test_rand_augment_draws_ops_uniformly(monkeypatch):
    counts = dict.fromkeys(augment.RANDAUGMENT_OPS, 0)
    for name in augment.RANDAUGMENT_OPS:
        monkeypatch.setitem(
            augment.RANDAUGMENT_OPS,
            name,
            lambda im, m, rng, n=name: counts.__setitem__(n, counts[n] + 1) or im,
        )
    rng = np.random.default_rng(0)
    for _ in range(1000):
        augment.rand_augment(None, rng, 4, 5)
    assert sum(counts.values()) == 4000
    # Each op expects 250 draws; multinomial spread is ~15.
    assert all(170 < c < 330 for c in counts.values()), counts


# --------------------------------------------------------------------------- device mixing


def test_normalize_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3)).astype(np.uint8)
    expected = (x.astype(np.float64) - np.array([0.485, 0.456, 0.406]) * 255) / (
        np.array([0.229, 0.224, 0.225]) * 255
    )
    out = np.asarray(jax.jit(mixing.normalize)(jnp.asarray(x)))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_cutmix_box_area_is_uniform_away_from_the_border():
    masks = np.asarray(
        jax.jit(mixing.cutmix_masks, static_argnums=(1, 2, 3))(jax.random.key(0), 4000, 64, 64)
    )
    area = masks.mean(axis=(1, 2))
    # Side sqrt(1 - u) with u uniform: unclipped area is uniform on [0, 1); clipping at the border
    # only shrinks boxes, so the mean area is below 1/2 and every area is in [0, 1].
    assert 0.0 <= area.min() and area.max() <= 1.0
    assert 0.2 < area.mean() < 0.5


def test_mix_batch_mixup_on_the_first_half_cutmix_on_the_second_with_matching_labels():
    # Example i is the constant image i with one-hot label i, so every output pixel says where
    # it came from. Partners mirror within each half: 3 - i in the first, 11 - i in the second.
    b = 8
    images = jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, 16, 12, 3))
    labels = jax.nn.one_hot(jnp.arange(b), b)
    mix = jax.jit(mixing.mix_batch, static_argnames=("mixup_alpha", "use_cutmix"))
    out, soft = mix(jax.random.key(0), images, labels, mixup_alpha=0.2, use_cutmix=True)
    out, soft = np.asarray(out, np.float64), np.asarray(soft, np.float64)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    assert np.all(soft[:4, 4:] == 0) and np.all(soft[4:, :4] == 0)  # halves never cross
    for i in range(4):  # MixUp: a flat blend r * i + (1 - r) * (3 - i), r = weight of label i
        r = soft[i, i]
        assert np.ptp(out[i]) < 1e-5
        np.testing.assert_allclose(out[i, 0, 0, 0], r * i + (1 - r) * (3 - i), atol=1e-5)
        np.testing.assert_allclose(soft[i, 3 - i] + r, 1.0, atol=1e-6)
    for i in range(4, 8):  # CutMix: label weight = fraction of pixels from the partner
        partner = 11 - i
        assert np.all((out[i] == i) | (out[i] == partner))
        np.testing.assert_allclose(soft[i, partner], np.mean(out[i, ..., 0] == partner), atol=1e-6)
    same, _ = mix(jax.random.key(0), images, labels, mixup_alpha=None, use_cutmix=False)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(images))
