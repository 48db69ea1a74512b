"""Weight formats: DeepMind's Haiku checkpoints, our orbax format, and cached downloads.

DeepMind's parameters are keyed ``<module path>/<param>``, with submodules joined
by ``/~/`` (``NFNet/~/nf_block_3/~/conv1/w``). Each model family states how its
checkpoints name things in a `HaikuNames` table, held by the model class as
``haiku_names``; the loader reads it from the model it fills. Block numbers are
global and parsed as integers (``nf_block`` is 0, ``nf_block_10`` is 10); models
built with stacked (scanned) blocks expose ``block_locations()``, and block paths
are redirected into the stacked leaves; timm's ``stages.<s>.<b>`` keys likewise through
``stage_block_locations()``.

No tensor needs a transpose: Haiku's HWIO conv kernels and (in, out) linear
weights are Flax's layouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

# A Haiku module path (a regex, full match) -> (NNX path template, parameter names Haiku -> NNX).
LayerTable = Mapping[str, tuple[str, Mapping[str, str]]]


class WeightsError(ValueError):
    """Raised when a checkpoint cannot be read or does not fit a model (lists every problem)."""


class HaikuWeightsError(WeightsError):
    """Raised when a Haiku checkpoint and a model disagree (lists every problem at once)."""


class TimmWeightsError(WeightsError):
    """Raised when a timm state dict and a model disagree (lists every problem at once)."""


@dataclasses.dataclass(frozen=True)
class HaikuNames:
    """How a family's Haiku checkpoints name its parameters: a table, no code.

    Attributes:
      top_level: the Haiku top-level module, e.g. ``"NF_ResNet"``.
      layers: the layers outside the blocks: Haiku module path below the top level (a regex,
        full match) -> (NNX path template, parameter names), e.g.
        ``{r"stem_conv(\\d)": (r"stem/conv\\1", {"w": "kernel", ...})}``.
      blocks: Haiku's name of the residual blocks (``nf_block``; ``nf_block_3`` is
        ``blocks/3``). A block's own ``skip_gain`` becomes ``blocks/<i>/skip_gain``.
      block_layers: the same table for the layers inside a block.
    """

    top_level: str
    layers: LayerTable
    blocks: str
    block_layers: LayerTable

    def nnx_path(self, key: str) -> str | None:
        """Returns the NNX leaf path of a flat Haiku key, or None if the table has none.

        Block paths use the global block index: ``"blocks/3/conv1/kernel"``.
        """
        module, sep, param = key.rpartition("/")
        top, *modules = module.split("/~/")
        if not sep or top != self.top_level or not modules:
            return None
        if len(modules) == 1:
            found = _lookup(self.layers, modules[0], param)
            if found is not None:
                return found
        index = _block_index(modules[0], self.blocks)
        if index is None:
            return None
        if len(modules) == 1:
            return f"blocks/{index}/skip_gain" if param == "skip_gain" else None
        inner = _lookup(self.block_layers, "/".join(modules[1:]), param)
        return f"blocks/{index}/{inner}" if inner else None


def _lookup(table: LayerTable, module: str, param: str) -> str | None:
    for pattern, (target, names) in table.items():
        match = re.fullmatch(pattern, module)
        if match and param in names:
            return f"{match.expand(target)}/{names[param]}"
    return None


def _block_index(name: str, prefix: str) -> int | None:
    """Parses Haiku's numbered module names: ``prefix`` -> 0, ``prefix_12`` -> 12."""
    if name == prefix:
        return 0
    match = re.fullmatch(re.escape(prefix) + r"_(\d+)", name)
    return int(match.group(1)) if match else None


def _names_of(model: nnx.Module) -> HaikuNames:
    """The `HaikuNames` table of ``model``'s family.

    Raises:
      TypeError: if the model's class has no table.
    """
    names = getattr(model, "haiku_names", None)
    if not isinstance(names, HaikuNames):
        raise TypeError(
            f"`model`: {type(model).__name__} has no Haiku weight names (`haiku_names`); "
            "DeepMind's checkpoints fit NFNet, NFResNet and NFRegNet"
        )
    return names


def _read_source(params: Any, allow_pickle: bool) -> dict[str, np.ndarray]:
    """Flattens any accepted input format to ``{"module/param": ndarray}``."""
    if isinstance(params, str | os.PathLike):
        path = Path(params)
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK"):  # A real npz (zip) archive.
            return read_npz(path, "params")
        if not allow_pickle:
            raise ValueError(
                f"`params`: {str(path)!r} is not an npz archive; DeepMind's released "
                "`*_haiku.npz` files are dill pickles. Pass `allow_pickle=True` if you "
                "trust the file (unpickling can run arbitrary code)."
            )
        try:
            import dill
        except ImportError:
            raise ImportError(
                f"`params`: {str(path)!r} is a dill pickle (DeepMind's `*_haiku.npz` format), "
                "and reading it needs `dill`, which the `weights` extra installs: "
                'pip install "agc_optax[weights]"'
            ) from None
        try:
            with open(path, "rb") as f:
                params = dill.load(f)
        except Exception as error:  # Unpickling fails in many ways; all mean the same here.
            raise HaikuWeightsError(
                f"`params`: {str(path)!r} is neither an npz archive nor a readable pickle "
                f"({type(error).__name__}: {error}); the file is corrupt, truncated or not a "
                "checkpoint"
            ) from error
    if isinstance(params, np.lib.npyio.NpzFile):
        return {k: np.asarray(params[k]) for k in params.files}
    if not isinstance(params, Mapping):
        raise TypeError(
            "`params`: expected a nested {module: {param: array}} dict, a flat "
            f"{{'module/param': array}} dict, an npz path or NpzFile; got {type(params).__name__}"
        )
    flat: dict[str, np.ndarray] = {}
    for module, value in params.items():
        if isinstance(value, Mapping):
            for name, array in value.items():
                flat[f"{module}/{name}"] = np.asarray(array)
        else:
            flat[str(module)] = np.asarray(value)
    return flat


def read_haiku_file(
    path: str | os.PathLike, *, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
    """Reads a Haiku checkpoint file (an npz, or with ``allow_pickle`` one of DeepMind's dill
    pickles) into ``{"module/param": ndarray}``, as `load_haiku_params` does."""
    return _read_source(os.fspath(path), allow_pickle)


def read_npz(
    path: str | os.PathLike, argument: str, error: type[WeightsError] = HaikuWeightsError
) -> dict[str, np.ndarray]:
    """Reads every array of an ``.npz`` file; a damaged archive raises naming the file.

    Raises:
      WeightsError: (``error``) when the archive cannot be read (a truncated download, a
        corrupt zip, pickled object arrays), naming ``argument``, the file and numpy's reason.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k]) for k in npz.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as e:
        raise error(
            f"`{argument}`: {str(path)!r} cannot be read as an npz archive "
            f"({type(e).__name__}: {e}); the file is corrupt or truncated (download it "
            "again) or holds pickled objects rather than arrays"
        ) from e


def check_values(
    arrays: Mapping[str, np.ndarray], *, allow_dtype_cast: bool, allow_nonfinite: bool
) -> list[str]:
    """Lists the arrays a loader refuses by default, one line per key.

    Refused: a dtype that is not float32 or float64 (integers, booleans, float16, bfloat16, the
    float8 formats: loading them casts silently to the model's dtype, which usually means the
    wrong file) unless ``allow_dtype_cast``; NaN or Inf entries unless ``allow_nonfinite``.
    """
    problems = []
    for key in sorted(arrays):
        array = arrays[key]
        dtype = np.dtype(array.dtype)
        if dtype not in (np.float32, np.float64) and not allow_dtype_cast:
            problems.append(
                f"{key}: dtype {dtype.name}, expected float32 or float64 "
                "(pass allow_dtype_cast=True to cast it to the model's dtype)"
            )
        elif not allow_nonfinite and dtype.kind not in "biu":  # Integers are always finite.
            # bfloat16 and the float8 formats (ml_dtypes, kind "V") are checked as float32.
            values = array if dtype.kind in "fc" else array.astype(np.float32)
            bad = int(array.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                problems.append(
                    f"{key}: {bad} of {array.size} values are NaN or Inf "
                    "(pass allow_nonfinite=True to load them anyway)"
                )
    return problems


def format_report(headline: str, sections: list[tuple[str, list[str]]], limit: int = 20) -> str:
    """One error message: a headline, then each non-empty section's first ``limit`` items."""
    lines = [headline]
    for title, items in sections:
        if not items:
            continue
        lines.append(f"{title}:")
        lines.extend(f"  {item}" for item in items[:limit])
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more")
    return "\n".join(lines)


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def _resolve(model: nnx.Module, path: str) -> tuple[str, int | None]:
    """Redirects ``blocks/<global index>/...`` into stacked leaves when the model has them."""
    locate = getattr(model, "block_locations", None)
    match = re.fullmatch(r"blocks/(\d+)/(.+)", path)
    if locate is None or match is None:
        return path, None
    locations = locate()
    index = int(match.group(1))
    if index >= len(locations):
        return path, None  # Reported as unexpected: the model has fewer blocks.
    pos, layer = locations[index]
    if layer is None:
        return f"blocks/{pos}/{match.group(2)}", None
    return f"blocks/{pos}/block/{match.group(2)}", layer


def _resolve_stage_block(model: nnx.Module, path: str) -> tuple[str, int | None]:
    """Redirects ``stages/<stage>/<block>/...`` (timm's numbering) into stacked leaves when the
    model has them (``stage_block_locations()``, one list of ``(position, layer)`` per stage)."""
    locate = getattr(model, "stage_block_locations", None)
    match = re.fullmatch(r"stages/(\d+)/(\d+)/(.+)", path)
    if locate is None or match is None:
        return path, None
    stages = locate()
    stage, block = int(match.group(1)), int(match.group(2))
    if stage >= len(stages) or block >= len(stages[stage]):
        return path, None  # Reported as unexpected: the model has fewer blocks.
    pos, layer = stages[stage][block]
    if layer is None:
        return f"stages/{stage}/{pos}/{match.group(3)}", None
    return f"stages/{stage}/{pos}/block/{match.group(3)}", layer


def _missing_leaves(
    targets: Mapping[str, Any], filled: Mapping[str, Mapping[int | None, Any]], reported: set[str]
) -> list[str]:
    """The model leaves a checkpoint left unfilled; a stacked leaf (filled per layer, keys
    ``0 .. L - 1``) names the layers it lacks. Leaves in ``reported`` (mis-shaped) are left
    out."""
    missing = []
    for target, var in targets.items():
        shape = _leaf_shape(var)
        got = filled.get(target, {})
        if None in got or target in reported:
            continue
        stacked = [d for d in got if d is not None]
        if got and len(stacked) == shape[0]:
            continue
        if got:
            absent = sorted(set(range(shape[0])) - set(stacked))
            missing.append(f"{target} {shape} (stacked layers {absent} absent)")
        else:
            missing.append(f"{target} {shape}")
    return missing


def _set_filled(targets: Mapping[str, Any], filled: Mapping[str, Mapping[int | None, Any]]) -> None:
    """Writes each filled leaf, stacking per-layer arrays along a new leading axis."""
    for target, layers in filled.items():
        var = targets[target]
        if None in layers:
            value = layers[None]
        else:
            value = np.stack([layers[i] for i in range(len(layers))])
        var.set_value(jax.numpy.asarray(value, dtype=var.get_value().dtype))


def materialize_abstract_state(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Gives concrete values to the non-parameter leaves of an ``nnx.eval_shape`` model.

    A model built under ``nnx.eval_shape`` keeps abstract RNG streams (the
    dropout / stochastic-depth keys and counters) after its parameters are
    loaded; this fills keys from ``seed`` (one independent key per stream) and
    every other abstract leaf with zeros, so the model can run and train.

    Returns:
      ``model``, for chaining.
    """
    state = nnx.state(model)
    base = jax.random.key(seed)
    changed = False
    for i, (_, var) in enumerate(nnx.to_flat_state(state)):
        value = var.get_value()
        if not isinstance(value, jax.ShapeDtypeStruct) or isinstance(var, nnx.Param):
            continue
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            size = int(np.prod(value.shape))
            keys = jax.random.split(jax.random.fold_in(base, i), size).reshape(value.shape)
            var.set_value(keys)
        else:
            var.set_value(jax.numpy.zeros(value.shape, value.dtype))
        changed = True
    if changed:
        nnx.update(model, state)
    return model


def load_haiku_params(
    model: nnx.Module,
    params: Any,
    *,
    allow_pickle: bool = False,
    allow_dtype_cast: bool = False,
    allow_nonfinite: bool = False,
    seed: int = 0,
) -> nnx.Module:
    """Fills an NNX model with DeepMind's Haiku parameters, in place.

    Every source key must map to a model leaf and every ``nnx.Param`` leaf must be
    filled, with equal shapes; otherwise one `HaikuWeightsError` lists every
    missing, unexpected and mismatched key with both names and shapes (the first 20
    of each kind, then a count). Arrays that are not float32/float64 or hold NaN/Inf
    are refused the same way unless you opt in. The model may come from
    ``nnx.eval_shape`` (nothing is allocated twice).

    Args:
      model: a model whose class has `HaikuNames` (``haiku_names``): an `NFNet`,
        `NFResNet` or `NFRegNet`.
      params: a nested ``{module: {param: array}}`` dict (Haiku's format), a flat
        ``{"module/param": array}`` dict, an npz path or ``np.load`` result, or the
        path of one of DeepMind's dill-pickled ``*_haiku.npz`` files.
      allow_pickle: allow reading a pickled file (needs the ``dill`` package).
      allow_dtype_cast: load integer, boolean, float16 or bfloat16 arrays, cast to the
        model's parameter dtype (refused by default: a checkpoint of trained weights is
        float32, so another dtype usually means the wrong file).
      allow_nonfinite: load arrays holding NaN or Inf (refused by default: such weights
        make every output NaN).
      seed: seeds the RNG streams (dropout, stochastic depth) of a model built with
        ``nnx.eval_shape``, which are otherwise abstract; see
        `materialize_abstract_state`. Concrete streams are left alone.

    Returns:
      ``model``, for chaining.

    Raises:
      HaikuWeightsError: listing all problems at once, or naming a file that cannot be
        read (a corrupt or truncated npz) and why.
      TypeError: for an unsupported ``params`` type, or a model without Haiku names.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from agc_optax.models import NFNet, load_haiku_params
      >>> model = nnx.eval_shape(lambda: NFNet(10, widths=[256] * 4, depths=[1] * 4,
      ...                                      rngs=nnx.Rngs(0)))
      >>> load_haiku_params(model, {"NFNet/~/linear": {"w": np.zeros((512, 10))}})
      Traceback (most recent call last):
      ...
      agc_optax.models.weights.HaikuWeightsError: ...
    """
    names = _names_of(model)
    source = _read_source(params, allow_pickle)
    state = nnx.state(model, nnx.Param)
    targets = {_path_str(path): var for path, var in nnx.to_flat_state(state)}
    filled: dict[str, dict[int | None, np.ndarray]] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    reported: set[str] = set()  # Mismatched targets are not listed again as missing.
    for key in sorted(source):
        array = source[key]
        mapped = names.nnx_path(key)
        if mapped is None:
            unexpected.append(f"{key} {array.shape} (no NNX name for this key)")
            continue
        target, layer = _resolve(model, mapped)
        if target not in targets:
            unexpected.append(f"{key} {array.shape} -> {target} (not in the model)")
            continue
        shape = _leaf_shape(targets[target])
        if layer is not None:
            shape = shape[1:]
            if layer >= _leaf_shape(targets[target])[0]:
                unexpected.append(f"{key} -> {target}[{layer}] (not in the model)")
                continue
        if tuple(array.shape) != shape:
            mismatched.append(f"{key} {tuple(array.shape)} vs {target} {shape}")
            reported.add(target)
            continue
        filled.setdefault(target, {})[layer] = array
    missing = _missing_leaves(targets, filled, reported)
    refused = check_values(
        source, allow_dtype_cast=allow_dtype_cast, allow_nonfinite=allow_nonfinite
    )
    if missing or unexpected or mismatched or refused:
        headline = (
            "load_haiku_params: the checkpoint does not match the model "
            f"({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape mismatches, {len(refused)} refused values)"
        )
        sections = [
            ("missing model leaves", missing),
            ("unexpected checkpoint keys", unexpected),
            ("shape mismatches (checkpoint vs model)", mismatched),
            ("refused values", refused),
        ]
        raise HaikuWeightsError(format_report(headline, sections))

    _set_filled(targets, filled)
    nnx.update(model, state)
    return materialize_abstract_state(model, seed)


# ----------------------------------------------------------------------------- timm

# How a torch tensor becomes an NNX leaf: layout -> (convert the torch array, the torch shape
# a given NNX shape needs).
_TORCH_LAYOUTS: dict[Any, tuple[Any, Any]] = {
    None: (lambda a: a, lambda s: s),
    # Conv weight (out, in/groups, kh, kw) -> HWIO, same group order as lax.
    "oihw": (lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1])),
    # timm's ScaledStdConv2d gain (out, 1, 1, 1) -> (out,).
    "gain": (lambda a: a.reshape(-1), lambda s: (s[0], 1, 1, 1)),
    # A 1x1 Conv2d used as a dense layer (SE's fc1/fc2): (out, in, 1, 1) -> (in, out).
    "conv_as_linear": (lambda a: a[:, :, 0, 0].T, lambda s: (s[1], s[0], 1, 1)),
    # nn.Linear (out, in) -> (in, out).
    "linear": (lambda a: a.T, lambda s: (s[1], s[0])),
    # ECA's Conv1d(1, 1, k) weight (1, 1, k) -> (k,).
    "eca": (lambda a: a.reshape(-1), lambda s: (1, 1, s[0])),
}


@dataclasses.dataclass(frozen=True)
class TimmNames:
    """How timm's ``state_dict()`` keys and torch layouts map to a family's NNX leaves.

    Attributes:
      layers: timm module path (a regex, full match, dots escaped) -> (NNX path template,
        ``{timm parameter: (NNX parameter, layout)}``). Layouts: ``"oihw"`` (conv weights ->
        HWIO), ``"gain"`` ((O, 1, 1, 1) -> (O,)), ``"conv_as_linear"`` ((out, in, 1, 1) ->
        (in, out)), ``"linear"`` ((out, in) -> (in, out)), ``"eca"`` ((1, 1, k) -> (k,)) and
        ``None`` (as is).
    """

    layers: Mapping[str, tuple[str, Mapping[str, tuple[str, str | None]]]]

    def __post_init__(self) -> None:
        for _, names in self.layers.values():
            for _, layout in names.values():
                if layout not in _TORCH_LAYOUTS:
                    raise ValueError(f"TimmNames: unknown layout {layout!r}")

    def lookup(self, key: str) -> tuple[str, str | None] | None:
        """``(NNX path, layout)`` of a timm key such as ``"stages.1.0.conv2.weight"``, or None.

        Example:
          >>> from agc_optax.models.timm_nfnet import TIMM_NAMES
          >>> TIMM_NAMES.lookup("stages.1.0.attn_last.fc1.weight")
          ('stages/1/0/attn_last/fc0/kernel', 'conv_as_linear')
        """
        module, _, param = key.rpartition(".")
        for pattern, (target, names) in self.layers.items():
            match = re.fullmatch(pattern, module)
            if match and param in names:
                name, layout = names[param]
                return f"{match.expand(target)}/{name}", layout
        return None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a timm checkpoint file into ``{key: ndarray}`` (torch layouts, timm's keys).

    ``.safetensors`` (the format of timm's hub files) needs the ``safetensors`` package
    (``pip install 'agc_optax[weights]'``), not torch; ``.npz`` needs nothing; ``.pth`` /
    ``.pt`` / ``.bin`` need torch (read with ``weights_only=True``; a ``{"state_dict": ...}``
    or ``{"model": ...}`` wrapper is unwrapped).

    Raises:
      TimmWeightsError: naming the file when it cannot be read, or has another suffix.
      ImportError: naming the package to install.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"`state_dict`: no such file {str(path)!r}")
    if suffix == ".npz":
        return read_npz(path, "state_dict", TimmWeightsError)
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError(
                "Reading .safetensors needs `safetensors`: pip install 'agc_optax[weights]'"
            ) from e
        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises its own SafetensorError and others.
            raise TimmWeightsError(
                f"`state_dict`: {str(path)!r} cannot be read as safetensors "
                f"({type(e).__name__}: {e}); the file is corrupt or truncated"
            ) from e
    if suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"Reading {suffix} checkpoints needs torch; or convert the file to .safetensors "
                "or .npz where torch is installed"
            ) from e
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
        # bfloat16 has no NumPy dtype: read it as float32 (the dtype check reports the cast).
        return {
            k: (v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy())
            for k, v in loaded.items()
        }
    raise TimmWeightsError(
        f"`state_dict`: {str(path)!r} has an unknown suffix {suffix!r}; expected .safetensors, "
        ".npz or (with torch) .pth"
    )


def load_timm_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, Any] | str | os.PathLike,
    *,
    allow_dtype_cast: bool = False,
    allow_nonfinite: bool = False,
    seed: int = 0,
) -> nnx.Module:
    """Fills an NNX model with a timm checkpoint, in place, converting torch layouts.

    Every key must map to a model leaf and every ``nnx.Param`` leaf must be filled, with
    matching shapes; otherwise one `TimmWeightsError` lists every missing, unexpected and
    mis-shaped key with both names and shapes (the first 20 of each kind, then a count).
    Arrays that are not float32/float64 or hold NaN/Inf are refused the same way unless you
    opt in. The model may come from ``nnx.eval_shape``.

    Args:
      model: a model whose class has `TimmNames` (``timm_names``), e.g. `TimmNFNet`.
      state_dict: ``{key: array}`` with timm's ``state_dict()`` keys and torch layouts (NumPy
        arrays, or anything ``np.asarray`` takes), or the path of a ``.safetensors``,
        ``.npz`` or (with torch) ``.pth`` file; see `read_state_dict`.
      allow_dtype_cast: load integer, float16 or bfloat16 arrays, cast to the model's dtype.
      allow_nonfinite: load arrays holding NaN or Inf.
      seed: seeds the RNG streams of a model built with ``nnx.eval_shape``; see
        `materialize_abstract_state`.

    Returns:
      ``model``, for chaining.

    Raises:
      TimmWeightsError: listing all problems at once, or naming an unreadable file.
      TypeError: for a model without timm names or an unsupported ``state_dict``.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from agc_optax.models import TimmNFNet, load_timm_state_dict
      >>> model = nnx.eval_shape(lambda: TimmNFNet(10, widths=[256] * 4, depths=[1] * 4,
      ...                                          rngs=nnx.Rngs(0)))
      >>> load_timm_state_dict(model, {"head.fc.weight": np.zeros((10, 7), np.float32)})
      Traceback (most recent call last):
      ...
      agc_optax.models.weights.TimmWeightsError: load_timm_state_dict: ... 1 shape mismatches...
    """
    names = getattr(model, "timm_names", None)
    if not isinstance(names, TimmNames):
        raise TypeError(
            f"`model`: {type(model).__name__} has no timm weight names (`timm_names`); "
            "timm's NFNet checkpoints fit TimmNFNet"
        )
    if isinstance(state_dict, str | os.PathLike):
        source = read_state_dict(state_dict)
    elif isinstance(state_dict, Mapping):
        source = {str(k): np.asarray(v) for k, v in state_dict.items()}
    else:
        raise TypeError(
            "`state_dict`: expected a {key: array} mapping or a .safetensors/.npz/.pth path, "
            f"got {type(state_dict).__name__}"
        )
    state = nnx.state(model, nnx.Param)
    targets = {_path_str(path): var for path, var in nnx.to_flat_state(state)}
    filled: dict[str, dict[int | None, np.ndarray]] = {}  # Per layer of a stacked leaf.
    unexpected: list[str] = []
    mismatched: list[str] = []
    reported: set[str] = set()  # Mis-shaped targets are not listed again as missing.
    for key in sorted(source):
        array = source[key]
        found = names.lookup(key)
        if found is None:
            unexpected.append(f"{key} {array.shape} (no NNX name for this key)")
            continue
        target, layout = found
        target, layer = _resolve_stage_block(model, target)
        if target not in targets:
            unexpected.append(f"{key} {array.shape} -> {target} (not in the model)")
            continue
        convert, torch_shape = _TORCH_LAYOUTS[layout]
        shape = _leaf_shape(targets[target])
        where = target
        if layer is not None:  # One layer of a stacked leaf.
            where = f"{target}[{layer}]"
            if layer >= shape[0]:
                unexpected.append(f"{key} -> {where} (not in the model)")
                continue
            shape = shape[1:]
        want = tuple(torch_shape(shape))
        if tuple(array.shape) != want:
            mismatched.append(
                f"{key} {tuple(array.shape)} vs {where} {shape} (expects {want} in timm)"
            )
            reported.add(target)
            continue
        filled.setdefault(target, {})[layer] = convert(array)
    missing = _missing_leaves(targets, filled, reported)
    refused = check_values(
        source, allow_dtype_cast=allow_dtype_cast, allow_nonfinite=allow_nonfinite
    )
    if missing or unexpected or mismatched or refused:
        where = f" {str(state_dict)!r}" if isinstance(state_dict, str | os.PathLike) else ""
        headline = (
            f"load_timm_state_dict: the state dict{where} does not match the model "
            f"{type(model).__name__} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape mismatches, {len(refused)} refused values)"
        )
        sections = [
            ("missing model leaves", missing),
            ("unexpected state-dict keys", unexpected),
            ("shape mismatches (timm vs model)", mismatched),
            ("refused values", refused),
        ]
        raise TimmWeightsError(format_report(headline, sections))
    _set_filled(targets, filled)
    nnx.update(model, state)
    return materialize_abstract_state(model, seed)


def _pure_params(model: nnx.Module) -> tuple[nnx.State, dict[str, Any]]:
    state = nnx.state(model, nnx.Param)
    return state, {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def save_params(model: nnx.Module, path: str | os.PathLike) -> None:
    """Saves the model's ``nnx.Param`` leaves with orbax (``agc_optax[train]``).

    Args:
      model: any NNX model.
      path: a directory that must not exist yet.
    """
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError("save_params needs orbax: pip install 'agc_optax[train]'") from e
    _, flat = _pure_params(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(path).absolute(), flat)
    checkpointer.wait_until_finished()


def saved_param_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{leaf path: shape}`` of a `save_params` directory, read from its metadata only."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError("reading saved params needs orbax: pip install 'agc_optax[train]'") from e
    metadata = ocp.StandardCheckpointer().metadata(Path(path).absolute())
    tree = getattr(metadata, "item_metadata", metadata)
    return {k: tuple(getattr(v, "shape", ())) for k, v in dict(tree).items()}


def load_params(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Restores parameters written by `save_params` into ``model``, in place.

    Raises:
      HaikuWeightsError: when the checkpoint's leaf paths or shapes differ from
        the model's (all differences listed).
    """
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError("load_params needs orbax: pip install 'agc_optax[train]'") from e
    state, flat = _pure_params(model)
    checkpointer = ocp.StandardCheckpointer()
    path = Path(path).absolute()
    saved = saved_param_shapes(path)
    want = {k: tuple(v.shape) for k, v in flat.items()}
    problems = [f"  missing in checkpoint: {k} {s}" for k, s in want.items() if k not in saved]
    problems += [f"  unexpected in checkpoint: {k} {s}" for k, s in saved.items() if k not in want]
    problems += [
        f"  shape mismatch: {k} checkpoint {saved[k]} vs model {s}"
        for k, s in want.items()
        if k in saved and saved[k] != s
    ]
    if problems:
        raise HaikuWeightsError(
            f"load_params: {str(path)!r} does not match the model:\n" + "\n".join(problems)
        )
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
    restored = checkpointer.restore(path, abstract)
    for p, var in nnx.to_flat_state(state):
        var.set_value(restored[_path_str(p)])
    nnx.update(model, state)
    return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_cached(url: str, path: Path, sha256: str | None = None) -> Path:
    """Downloads ``url`` to ``path`` once and verifies it on every call.

    The first download records its SHA-256 next to the file (``<name>.sha256``);
    later calls re-hash the cached file against ``sha256`` if given, else against
    that record, so a truncated or altered cache is detected. A failed check
    deletes nothing and raises.

    Raises:
      ValueError: when a checksum does not match.
    """
    path = Path(path)
    record = path.with_name(path.name + ".sha256")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        with urllib.request.urlopen(url) as response, open(partial, "wb") as f:  # noqa: S310
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
        got = _sha256(partial)
        if sha256 is not None and got != sha256:
            raise ValueError(
                f"download of {url}: sha256 {got} does not match the expected {sha256}; "
                f"the partial file is kept at {partial}"
            )
        partial.replace(path)
        record.write_text(got + "\n")
        return path
    expected = sha256 or (record.read_text().strip() if record.exists() else None)
    got = _sha256(path)
    if expected is not None and got != expected:
        raise ValueError(
            f"cached file {str(path)!r}: sha256 {got} does not match {expected}; "
            "delete it to download again"
        )
    if not record.exists():
        record.write_text(got + "\n")
    return path
