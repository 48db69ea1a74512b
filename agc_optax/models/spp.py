"""Signal propagation plots (SPPs): per-block activation statistics of a network.

An SPP (Brock, De, Smith 2021, arXiv:2101.08692) tracks three statistics through the residual
blocks of a network, on one batch, usually at initialization:

* the average channel squared mean ``mean_C(mean_NHW(x)^2)`` of each block's output, which reveals
  mean shifts (e.g. from relu without weight standardization);
* the average channel variance ``mean_C(var_NHW(x))`` of each block's output, which shows whether
  the signal stays normalized, grows by ``alpha^2`` per block and resets at stage transitions (an
  NF-ResNet), or explodes (an unnormalized ResNet);
* the average channel variance of each residual branch's output, before it joins the skip path.

Index 0 of the first two is the stem output. Every model of :mod:`agc_optax.models` computes them
in ``forward_outputs(x, return_metrics=True)`` exactly as DeepMind's ``signal_metrics`` does;
this module collects them into arrays and draws the figure.

The paper's unnormalized comparison (a pre-activation ResNet without scaling: plain He-initialized
convs, no ``beta``/``alpha``, no SkipInit, activations without gamma) is
``agc_optax.models.NFResNet(..., scaled=False)``. To see the NF-ResNet's designed variance
schedule at initialization, give it ``skipinit_gain=flax.nnx.initializers.ones``: with the default
zero-initialized skip gains every residual branch is muted at init, so block outputs equal their
shortcuts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agc_optax.models.layers import nf_schedule

_KEYS = ("avg_sq_mean", "avg_var", "res_avg_var")


def signal_propagation(
    model: nnx.Module, x: jax.Array, *, jit: bool = True
) -> dict[str, jax.Array]:
    """Computes the per-block SPP statistics of ``model`` on the batch ``x``.

    The model runs in its current mode (call ``model.eval()`` to disable dropout and stochastic
    depth; BatchNorm models use batch statistics only in ``model.train()`` mode, as in the
    paper's BN-ResNet plots). The model itself is left unchanged: the forward pass runs on a
    clone, so running averages are not updated.

    Args:
      model: any model of :mod:`agc_optax.models` with DeepMind's signal metrics (a
        ``forward_outputs`` method accepting ``return_metrics=True``).
      x: a batch of NHWC images.
      jit: compile the forward pass with ``nnx.jit`` (one compilation per model structure and
        input shape); ``False`` runs it eagerly.

    Returns:
      ``{'avg_sq_mean': (L + 1,), 'avg_var': (L + 1,), 'res_avg_var': (L,)}`` float32 arrays for
      a network of ``L`` residual blocks; index 0 of the first two is the stem output.

    Raises:
      TypeError: if ``model`` has no ``forward_outputs`` method.
      ValueError: if the model returns no signal metrics.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from agc_optax.models import NFResNet
      >>> model = NFResNet(10, "ResNet26", width=1, rngs=nnx.Rngs(0))
      >>> stats = signal_propagation(model, jnp.ones((2, 32, 32, 3)))
      >>> stats["avg_var"].shape, stats["res_avg_var"].shape
      ((9,), (8,))
    """
    if not callable(getattr(model, "forward_outputs", None)):
        raise TypeError(
            f"`model`: {type(model).__name__} has no `forward_outputs` method; pass a model "
            "from agc_optax.models with DeepMind's signal metrics (not TimmNFNet)"
        )
    clone = nnx.clone(model)
    forward = _forward_metrics_jit if jit else _forward_metrics
    outputs = forward(clone, jnp.asarray(x))
    num_points = sum(1 for k in outputs if k.startswith("avg_var_"))
    if num_points == 0:
        raise ValueError(
            f"`model`: {type(model).__name__}.forward_outputs(x, return_metrics=True) returned "
            "no `avg_var_<i>` metrics"
        )
    stats = {}
    for key, count in zip(_KEYS, (num_points, num_points, num_points - 1), strict=True):
        stats[key] = jnp.stack(
            [jnp.asarray(outputs[f"{key}_{i}"], jnp.float32) for i in range(count)]
        )
    return stats


def _forward_metrics(model: nnx.Module, x: jax.Array) -> dict[str, jax.Array]:
    return model.forward_outputs(x, return_metrics=True)


_forward_metrics_jit = nnx.jit(_forward_metrics)


def expected_variance(depths: Sequence[int], alpha: float = 0.2) -> np.ndarray:
    """The block-output variance an NF-ResNet is designed to have at initialization.

    With unit-variance residual branches (and skip gains of one), a block adds ``alpha^2`` to
    the variance of its input; the first block of each stage has a normalized shortcut, so the
    variance restarts from one there.

    Args:
      depths: blocks per stage.
      alpha: the residual-branch scale.

    Returns:
      A float64 array with one entry per block (the stem is not included).

    Example:
      >>> expected_variance((2, 3), alpha=0.5)
      array([1.25, 1.5 , 1.25, 1.5 , 1.75])
    """
    return np.asarray([block.variance for block in nf_schedule(depths, alpha)], np.float64)


def plot_signal_propagation(
    stats: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    log_scale: bool = True,
    title: str | None = None,
) -> str:
    """Writes the three-panel signal propagation plot to ``path`` (PNG).

    Args:
      stats: the output of :func:`signal_propagation`, or a sequence of them to overlay several
        models (e.g. an NF-ResNet against an unscaled ResNet).
      path: the image file to write; its extension picks the format (``.png``).
      labels: one legend label per entry of ``stats``.
      log_scale: use a logarithmic y axis for all three panels, which keeps an exploding model
        and a well-behaved one readable on the same axes.
      title: an optional figure title.

    Returns:
      ``path`` as a string.

    Raises:
      ImportError: if matplotlib is missing (``pip install agc_optax[train]``).
      ValueError: if ``labels`` does not match ``stats`` or an entry lacks a statistic.
    """
    try:
        # Figure without pyplot: no global backend state is touched (safe in notebooks and on
        # headless machines alike).
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plot_signal_propagation needs matplotlib: pip install agc_optax[train]"
        ) from err

    runs = [stats] if isinstance(stats, Mapping) else list(stats)
    if labels is None:
        labels = [f"model {i}" for i in range(len(runs))] if len(runs) > 1 else [""]
    if len(labels) != len(runs):
        raise ValueError(f"`labels`: got {len(labels)} labels for {len(runs)} sets of statistics")
    for i, run in enumerate(runs):
        missing = [key for key in _KEYS if key not in run]
        if missing:
            raise ValueError(
                f"`stats`[{i}] lacks {missing}; pass the output of signal_propagation()"
            )

    titles = (
        "Average channel squared mean",
        "Average channel variance",
        "Residual average channel variance",
    )
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    for run, label in zip(runs, labels, strict=True):
        for ax, key in zip(axes, _KEYS, strict=True):
            values = np.asarray(run[key], np.float64)
            # Index 0 is the stem for the block-output statistics; residual branches start
            # at block 1, so that both kinds line up on the same x axis.
            start = 0 if key != "res_avg_var" else 1
            ax.plot(np.arange(start, start + values.size), values, marker=".", label=label)
    for ax, name in zip(axes, titles, strict=True):
        ax.set_title(name)
        ax.set_xlabel("residual block (0: stem)")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if any(labels):
        axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    return os.fspath(path)
