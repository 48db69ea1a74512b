"""Model names -> configs; a config's type picks the family class that builds it.

Every family is a frozen config dataclass with named presets and a model class whose constructor
takes ``(num_classes, variant, ..., *, dtype, param_dtype, rngs)``, where ``variant`` is a preset
name or a config. Adding a family is one entry in ``_FAMILIES`` and its names in ``_CONFIGS``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from agc_optax.models import weights as weights_lib
from agc_optax.models._config import check_float_dtype, check_num_classes
from agc_optax.models.nf_regnet import NF_REGNET_VARIANTS, NFRegNet, NFRegNetConfig
from agc_optax.models.nf_resnet import NF_RESNET_VARIANTS, NFResNet, NFResNetConfig
from agc_optax.models.nfnet import NFNET_VARIANTS, NFNet, NFNetConfig
from agc_optax.models.pretrained import ModelDefaults, fetch_pretrained, official_defaults
from agc_optax.models.resnet import RESNET_VARIANTS, ResNet, ResNetConfig
from agc_optax.models.timm_nfnet import TIMM_NFNET_VARIANTS, TimmNFNet, TimmNFNetConfig

# Config type -> the model class it configures.
_FAMILIES: dict[type, type[nnx.Module]] = {
    NFNetConfig: NFNet,
    NFResNetConfig: NFResNet,
    NFRegNetConfig: NFRegNet,
    ResNetConfig: ResNet,
    TimmNFNetConfig: TimmNFNet,
}

_CONFIGS: dict[str, Any] = {
    # nfnet_f0 ... nfnet_f7, nfnet_f0_plus ... nfnet_f7_plus
    **{
        "nfnet_" + name.lower().replace("+", "_plus"): config
        for name, config in NFNET_VARIANTS.items()
    },
    # nf_resnet26 ... nf_resnet200 (not the 288- and 600-layer variants)
    **{
        f"nf_resnet{depth}": NF_RESNET_VARIANTS[f"ResNet{depth}"]
        for depth in (26, 50, 101, 152, 200)
    },
    # nf_regnet_b0 ... nf_regnet_b8
    **{f"nf_regnet_{name.lower()}": config for name, config in NF_REGNET_VARIANTS.items()},
    "resnet50": RESNET_VARIANTS["ResNet50"],
    # timm's names: dm_nfnet_f0 ... dm_nfnet_f6, nfnet_l0, eca_nfnet_l0 ... eca_nfnet_l2
    **TIMM_NFNET_VARIANTS,
}


def default_config(name: str) -> ModelDefaults:
    """The defaults of a registered model (see `ModelDefaults`): resolutions, the test crop and
    filter, mean/std, the reference top-1, and the official weights' URL, checksums and license.

    Names without released weights (NF-ResNets, NF-RegNets, ResNet-50) get the common ImageNet
    defaults: their config's resolution (else 224), the 0.875 center crop, bicubic, ImageNet
    mean/std.

    Raises:
      TypeError, ValueError: for a name that is not registered (as `get_config`).

    Example:
      >>> from agc_optax.models import default_config
      >>> cfg = default_config("nfnet_f0")
      >>> cfg.test_resolution, round(cfg.crop_fraction, 4), cfg.top1, cfg.url
      (256, 0.8889, 83.6, 'https://storage.googleapis.com/dm-nfnets/F0_haiku.npz')
      >>> default_config("eca_nfnet_l0").weights.format
      'timm'
    """
    config = get_config(name)
    official = official_defaults(name)
    if official is not None:
        return official
    train = getattr(config, "train_imsize", 224)
    test = getattr(config, "test_imsize", train)
    return ModelDefaults(name, train, test, crop_fraction=0.875)


def model_info(name: str) -> ModelDefaults:
    """The registered model's defaults (resolutions, test crop, mean/std, reference top-1,
    weights URL and license): `default_config`, under timm's other name for it."""
    return default_config(name)


def list_models() -> list[str]:
    """Returns the registered model names, sorted."""
    return sorted(_CONFIGS)


def model_class(name: str) -> type[nnx.Module]:
    """The family class a registered name builds (what its ``**overrides`` are keywords of).

    Raises:
      TypeError, ValueError: for a name that is not registered (as `get_config`).

    Example:
      >>> from agc_optax.models import model_class
      >>> model_class("nfnet_f0").__name__, model_class("dm_nfnet_f0").__name__
      ('NFNet', 'TimmNFNet')
    """
    return _FAMILIES[type(get_config(name))]


def get_config(name: str) -> Any:
    """Returns the frozen config dataclass registered under ``name``.

    Raises:
      TypeError: when ``name`` is not a string.
      ValueError: for an unknown name, listing the valid ones (close matches first).
    """
    if not isinstance(name, str):
        raise TypeError(
            f"`name`: expected a model name (str) from list_models(), got "
            f"{type(name).__name__} {name!r}"
        )
    if name not in _CONFIGS:
        valid = list_models()
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"`name`: unknown model {name!r}.{hint} Valid names: {', '.join(valid)}")
    return _CONFIGS[name]


def create_model(
    name: str,
    num_classes: int | None = 1000,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
    pretrained: bool | str | os.PathLike = False,
    weights_sha256: str | None = None,
    trust_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    **overrides: Any,
) -> nnx.Module:
    """Builds a registered model, optionally with weights.

    Args:
      name: a name from `list_models`, e.g. ``"nfnet_f0"``.
      num_classes: size of the classifier (``head``). ``0`` builds the model without a
        classifier, as timm does: it has no ``head`` and returns its pooled features
        ``(batch, num_features)`` in place of logits (a backbone for feature extraction).
        With ``pretrained``, ``None`` keeps the checkpoint's classifier, and any other size
        than the checkpoint's replaces it after loading (`reset_classifier`, initialised from
        ``rngs``) for fine-tuning.
      dtype: computation dtype (parameters stay in ``param_dtype``): float16, bfloat16,
        float32 or float64, or ``None`` to follow the inputs and parameters.
      param_dtype: parameter dtype: float16, bfloat16, float32 or float64.
      rngs: an ``nnx.Rngs`` with ``params`` (and ``dropout`` for training) streams.
      pretrained: ``True`` downloads the official weights of ``name`` (see
        `default_config` and `fetch_pretrained`; needs network); a path loads a local file:
        DeepMind's Haiku ``.npz`` (flat npz, or the released dill pickles with
        ``allow_pickle``) for ``nfnet_*``/``nf_*`` names, a timm ``.safetensors`` / ``.npz`` /
        ``.pth`` for timm's names, or a directory written by `save_params`.
      weights_sha256: with ``pretrained=True``, the file's expected SHA-256 (the table has
        none verified; see `agc_optax.models.pretrained`).
      trust_download: with ``pretrained=True``, accept a download no SHA-256 can verify.
      cache_dir: where downloads are kept (default ``~/.cache/agc_optax``).
      allow_pickle: read a local pickled Haiku file (unpickling can run arbitrary code). A
        download verified by its checksum (or trusted) is read without asking.
      **overrides: constructor keywords of the family class (for example
        ``stochdepth_rate=0.25``, ``depths=(1, 1, 1, 1)`` or ``scan_blocks=True``). Every
        family takes ``depths=`` and ``widths=``; timm's names also ``num_features=`` (the
        final conv's width, which timm does not derive from ``widths``).

    Returns:
      The model, in training mode (call ``model.eval()`` for inference).

    Raises:
      TypeError: for a ``name`` that is not a string, a ``num_classes`` that is not an int, or a
        ``dtype`` / ``param_dtype`` that is not a dtype (each message names the argument).
      ValueError: for an unknown name (listing the valid ones), a negative ``num_classes``, or a
        non-float dtype (int32, the float8 formats).
      WeightsError: when the weights do not fit the model (every problem listed), or
        `PretrainedWeightsError` when a download is unknown, unverifiable or corrupt.

    Example:
      >>> from flax import nnx
      >>> from agc_optax.models import create_model
      >>> model = nnx.eval_shape(lambda: create_model("nfnet_f0", rngs=nnx.Rngs(0)))
      >>> model.head.kernel.shape
      (3072, 1000)
    """
    config = get_config(name)
    if num_classes is not None or not pretrained:
        num_classes = check_num_classes(num_classes)
    check_float_dtype(dtype, "dtype", allow_none=True)
    check_float_dtype(param_dtype, "param_dtype")
    family = model_class(name)

    def build(classes: int, abstract: bool = False) -> nnx.Module:
        def make(streams: nnx.Rngs) -> nnx.Module:
            return family(
                classes, config, dtype=dtype, param_dtype=param_dtype, rngs=streams, **overrides
            )

        # Shapes only when a checkpoint fills every parameter: no random init to throw away.
        return nnx.eval_shape(lambda: make(nnx.Rngs(0))) if abstract else make(rngs)

    if pretrained is False or pretrained is None:
        return build(num_classes)
    if pretrained is True:
        path = fetch_pretrained(
            name, cache_dir=cache_dir, sha256=weights_sha256, trust_download=trust_download
        )
        allow_pickle = True  # verified by its checksum, or explicitly trusted
    elif isinstance(pretrained, str | os.PathLike):
        path = Path(pretrained)
        if not path.exists():
            raise FileNotFoundError(f"`pretrained`: no such file or directory {str(path)!r}")
    else:
        raise TypeError(
            f"`pretrained`: expected True/False or a file path, got {type(pretrained).__name__}"
        )
    model = _load(build, family, path, num_classes, allow_pickle)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes, rngs=rngs)
    return model


def _load(build, model_class, path: Path, num_classes, allow_pickle: bool) -> nnx.Module:
    """Builds the model with the checkpoint's classifier size and fills it from ``path``."""
    if path.is_dir():  # our own format (save_params)
        head = weights_lib.saved_param_shapes(path).get("head/kernel")
        model = build(0 if head is None else int(head[-1]))
        return weights_lib.load_params(model, path)
    if isinstance(getattr(model_class, "timm_names", None), weights_lib.TimmNames):
        state_dict = weights_lib.read_state_dict(path)
        head = state_dict.get("head.fc.weight")
        model = build(0 if head is None else int(head.shape[0]), abstract=True)
        weights_lib.load_timm_state_dict(model, state_dict)
        return model
    if isinstance(getattr(model_class, "haiku_names", None), weights_lib.HaikuNames):
        params = weights_lib.read_haiku_file(path, allow_pickle=allow_pickle)
        names = model_class.haiku_names
        heads = [p for p, (target, _) in names.layers.items() if target == "head"]
        head = next(
            (params[k] for h in heads if (k := f"{names.top_level}/~/{h}/w") in params), None
        )
        model = build(0 if head is None else int(head.shape[-1]), abstract=True)
        weights_lib.load_haiku_params(model, params)
        return model
    raise TypeError(f"`pretrained`: {model_class.__name__} has no checkpoint format to load from")
