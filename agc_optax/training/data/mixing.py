"""Batch-level augmentation on the device: normalisation, MixUp and CutMix with soft labels.

Pure JAX functions of a key and a batch, meant to run inside the jitted train step: batches
travel from the host as uint8 (4x less host-to-device traffic than float32) and are normalised
here; mixing needs only elementwise arithmetic on the whole batch, which is nearly free on an
accelerator and would otherwise cost the host a float copy of every image.

As in DeepMind's NFNet pipeline, with both enabled MixUp mixes the first half of the batch and
CutMix the second. Unlike it, each example is mixed with a partner from the same half (the half in
reverse order), so a step consumes ``batch_size`` images rather than twice as many.

- MixUp (Zhang et al. 2018): ``x = r x_i + (1 - r) x_j``, ``r ~ Beta(alpha, alpha)`` per example
  (``alpha = 0.2`` for NFNets), labels mixed with the same ``r``.
- CutMix (Yun et al. 2019): a box whose side is ``sqrt(1 - u)`` of the image's, ``u`` uniform,
  centered uniformly (and clipped at the border), is pasted from the partner; labels are mixed by
  the exact fraction of pixels that came from each image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def normalize(images, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB, dtype=jnp.float32):
    """``(images - mean) / std`` per channel, from uint8 (or float) ``(..., C)`` images.

    >>> [round(float(v), 3) for v in normalize(jnp.full((1, 1, 1, 3), 255, jnp.uint8)).ravel()]
    [2.249, 2.429, 2.64]
    """
    x = images.astype(jnp.float32)
    return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def one_hot(labels, num_classes: int, smoothing: float = 0.0):
    """Integer labels as (optionally smoothed) probability rows: ``(1 - s) onehot + s / K``."""
    hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return hot * (1.0 - smoothing) + smoothing / num_classes


def mixup(key, images, labels, alpha: float = 0.2):
    """MixUp of each example with its mirror (``images[::-1]``).

    Args:
      key: a PRNG key.
      images: ``(B, H, W, C)`` float images.
      labels: ``(B, K)`` probability rows.
      alpha: the Beta distribution's parameter.

    Returns:
      ``(images, labels)`` mixed, same shapes; label rows still sum to 1.
    """
    ratio = jax.random.beta(key, alpha, alpha, (images.shape[0],), jnp.float32)
    r_img = ratio.reshape((-1,) + (1,) * (images.ndim - 1)).astype(images.dtype)
    mixed = r_img * images + (1 - r_img) * images[::-1]
    mixed_labels = ratio[:, None] * labels + (1 - ratio[:, None]) * labels[::-1]
    return mixed, mixed_labels


def cutmix_masks(key, batch: int, height: int, width: int):
    """``(B, H, W)`` float masks, 1 inside each example's box (pixels taken from the partner)."""
    k_area, k_y, k_x = jax.random.split(key, 3)
    side = jnp.sqrt(1.0 - jax.random.uniform(k_area, (batch,)))
    box_h = (side * height).astype(jnp.int32)
    box_w = (side * width).astype(jnp.int32)
    cy = jax.random.randint(k_y, (batch,), 0, height)
    cx = jax.random.randint(k_x, (batch,), 0, width)
    top, bottom = jnp.clip(cy - box_h // 2, 0, height), jnp.clip(cy + box_h // 2, 0, height)
    left, right = jnp.clip(cx - box_w // 2, 0, width), jnp.clip(cx + box_w // 2, 0, width)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = (
        (rows >= top[:, None, None])
        & (rows < bottom[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < right[:, None, None])
    )
    return inside.astype(jnp.float32)


def cutmix(key, images, labels):
    """CutMix of each example with its mirror (``images[::-1]``); see :func:`cutmix_masks`."""
    b, h, w = images.shape[:3]
    mask = cutmix_masks(key, b, h, w)
    taken = mask.mean(axis=(1, 2))  # fraction of pixels from the partner
    m = mask[..., None].astype(images.dtype)
    mixed = (1 - m) * images + m * images[::-1]
    mixed_labels = (1 - taken[:, None]) * labels + taken[:, None] * labels[::-1]
    return mixed, mixed_labels


def mix_batch(key, images, labels, *, mixup_alpha: float | None, use_cutmix: bool):
    """MixUp and/or CutMix of a batch; with both, MixUp on the first half and CutMix on the second.

    Args:
      key: a PRNG key (fold in the step so every step mixes differently).
      images: ``(B, H, W, C)`` float images (normalised).
      labels: ``(B, K)`` probability rows.
      mixup_alpha: MixUp's Beta parameter, or None for no MixUp.
      use_cutmix: apply CutMix.

    >>> x = jnp.zeros((4, 2, 2, 3)); y = jax.nn.one_hot(jnp.arange(4), 4)
    >>> _, soft = mix_batch(jax.random.key(0), x, y, mixup_alpha=0.2, use_cutmix=True)
    >>> soft.sum(axis=1).round(6).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    k_mix, k_cut = jax.random.split(key)
    if mixup_alpha is not None and use_cutmix:
        half = images.shape[0] // 2
        a_img, a_lab = mixup(k_mix, images[:half], labels[:half], mixup_alpha)
        b_img, b_lab = cutmix(k_cut, images[half:], labels[half:])
        return jnp.concatenate([a_img, b_img]), jnp.concatenate([a_lab, b_lab])
    if mixup_alpha is not None:
        return mixup(k_mix, images, labels, mixup_alpha)
    if use_cutmix:
        return cutmix(k_cut, images, labels)
    return images, labels
