"""`scan_blocks` on NF-ResNet, NF-RegNet and timm's NFNets: the stacked model is the unrolled one.

For each family a tiny model is built unrolled with random weights; its checkpoint (DeepMind's
Haiku names, or timm's state-dict keys and torch layouts, both written out here from the naming
rules) is loaded into a ``scan_blocks=True`` model. Both then give the same logits, gradients,
signal metrics and per-stage features, and AGC sees the same units under the model's own rules.
The generic `BlockStack` is checked on a toy block whose output spells out which layers kept
their branch, against the per-layer stochastic-depth rates.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import agc_optax
from agc_optax.models import (
    CanonicalGradWSConv,
    HaikuWeightsError,
    NFRegNet,
    NFResNet,
    TimmNFNet,
    TimmWeightsError,
    WSConv,
    create_model,
    load_haiku_params,
    load_timm_state_dict,
)
from agc_optax.models.layers import (
    BlockStack,
    StochasticDepth,
    residual_run,
    resolve_scan_blocks,
)
from agc_optax.models.timm_nfnet import TIMM_NFNET_VARIANTS
from agc_optax.models.weights import materialize_abstract_state

from .reference import num_params, reference_file

# Two stages (compiling is the cost here): stage 0 stacks its two identity-shortcut blocks,
# and stage 1's block follows the stack.
DEPTHS = (3, 1)


def _timm_config(name: str) -> object:
    # Narrow groups so that 16-channel stages have whole groups; every other field is timm's.
    return dataclasses.replace(
        TIMM_NFNET_VARIANTS[name], stem_width=16, group_size=8, num_features=32
    )


# family -> (model class, constructor keywords, Haiku names (top level, stem, block) or None).
FAMILIES = {
    "nf_resnet": (
        NFResNet,
        dict(variant="ResNet26", width=1, widths=(16, 32), stem_width=8, use_se=True),
        ("NF_ResNet", "initial_conv", "nf_res_block"),
    ),
    "nf_regnet": (
        NFRegNet,
        dict(variant="B0", width=1.0, widths=(8, 16)),
        ("NF_RegNet", "initial_conv", "nf_block"),
    ),
    "dm_nfnet": (  # squeeze-excite, skip gains, TF-SAME padding, gamma in the activations
        TimmNFNet,
        dict(variant=_timm_config("dm_nfnet_f0"), widths=(16, 32), drop_path_rate=0.3),
        None,
    ),
    "eca_nfnet": (  # ECA, no skip gains, symmetric padding, gamma in the convs
        TimmNFNet,
        dict(variant=_timm_config("eca_nfnet_l0"), widths=(16, 32)),
        None,
    ),
}


def _build(family: str, scan: bool, depths=DEPTHS, **extra) -> nnx.Module:
    cls, kwargs, _ = FAMILIES[family]
    return nnx.eval_shape(
        lambda: cls(
            10,
            depths=depths,
            scan_blocks=scan,
            rngs=nnx.Rngs(params=0, dropout=1),
            **kwargs,
            **extra,
        )
    )


def _convs(model: nnx.Module) -> list[WSConv]:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, WSConv)]


def _param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {
        "/".join(map(str, p)): v.get_value().shape
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _flat(model: nnx.Module) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _random_weights(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Non-zero random weights everywhere (skip gains and zero-initialised gains included), so
    that every branch and every layer shows in the outputs."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "gain":
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:  # biases, skip gains
            value = 0.5 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, state)
    return materialize_abstract_state(model, seed)


# ----------------------------------------------------------------------------- checkpoints


def _haiku_checkpoint(family: str, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """DeepMind's flat Haiku dict of an unrolled model (the naming rule, restated)."""
    top, stem, block_name = FAMILIES[family][2]
    leaf = {"kernel": "w", "gain": "gain", "bias": "bias"}
    out = {}
    for path, value in flat.items():
        parts = path.split("/")
        if parts[0] == "stem":
            key = f"{top}/~/{stem}/{leaf[parts[2]]}"
        elif parts[0] == "final_conv":
            key = f"{top}/~/final_conv/{leaf[parts[1]]}"
        elif parts[0] == "head":
            key = f"{top}/~/linear/{'w' if parts[1] == 'kernel' else 'b'}"
        else:
            block = block_name + (f"_{parts[1]}" if parts[1] != "0" else "")
            if parts[2] == "skip_gain":
                key = f"{top}/~/{block}/skip_gain"
            elif parts[2] == "se":
                fc = {"fc0": "linear", "fc1": "linear_1"}[parts[3]]
                name = "w" if parts[4] == "kernel" else "b"
                key = f"{top}/~/{block}/~/squeeze_excite/~/{fc}/{name}"
            else:
                key = f"{top}/~/{block}/~/{parts[2]}/{leaf[parts[3]]}"
        out[key] = value
    return out


def _timm_state_dict(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's ``state_dict()`` of an unrolled model: timm's keys and torch layouts."""
    torch_conv = {
        "kernel": ("weight", lambda w: w.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
        "gain": ("gain", lambda g: g.reshape(-1, 1, 1, 1)),
        "bias": ("bias", lambda b: b),
    }
    out = {}
    for path, value in flat.items():
        parts = path.split("/")
        if parts[0] == "head":
            key, value = f"head.fc.{'weight' if parts[1] == 'kernel' else 'bias'}", value.T
        elif parts[-1] == "skip_gain":
            key = ".".join(parts[:-1]) + ".skipinit_gain"
        elif "attn_last" in parts and parts[-2] in ("fc0", "fc1"):  # 1x1 convs in timm
            fc = {"fc0": "fc1", "fc1": "fc2"}[parts[-2]]
            module = ".".join(parts[:-2])
            if parts[-1] == "kernel":
                key, value = f"{module}.{fc}.weight", value.T[:, :, None, None]
            else:
                key = f"{module}.{fc}.bias"
        elif parts[-2] == "attn_last":  # ECA's Conv1d(1, 1, k)
            key, value = ".".join(parts[:-1]) + ".conv.weight", value.reshape(1, 1, -1)
        else:
            module = ".".join(parts[:-1])
            if parts[-2] == "downsample":
                module += ".conv"
            name, convert = torch_conv[parts[-1]]
            key, value = f"{module}.{name}", convert(value)
        out[key] = np.array(value)  # a copy in C order (0-d stays 0-d)
    return out


def _is_timm(family: str) -> bool:
    return FAMILIES[family][0] is TimmNFNet


def _checkpoint(family: str, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _timm_state_dict(flat) if _is_timm(family) else _haiku_checkpoint(family, flat)


def _load(family: str, model: nnx.Module, checkpoint: dict[str, np.ndarray]) -> nnx.Module:
    loader = load_timm_state_dict if _is_timm(family) else load_haiku_params
    return loader(model, checkpoint)


def _expected_locations(depths) -> list[list[tuple[int, int | None]]]:
    """Per stage, each block's (position in the stage, layer): the first block alone, then the
    others stacked when there are two or more."""
    stages = []
    for depth in depths:
        rest = depth - 1
        if rest >= 2:
            stages.append([(0, None)] + [(1, layer) for layer in range(rest)])
        else:
            stages.append([(i, None) for i in range(depth)])
    return stages


def _unstack(family: str, scanned_flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The scanned model's leaves under the unrolled model's paths (stacked leaves split)."""
    stages = _expected_locations(DEPTHS)
    out = {}
    for path, value in scanned_flat.items():
        parts = path.split("/")
        if parts[0] not in ("blocks", "stages"):
            out[path] = value
            continue
        if parts[0] == "stages":
            stage, pos, rest = int(parts[1]), int(parts[2]), parts[3:]
            locations = stages[stage]
            prefix = f"stages/{stage}"
        else:  # blocks/<position in the flat list>
            flat_locations = []
            for stage, locations in enumerate(stages):
                offset = sum(max(loc[0] for loc in s) + 1 for s in stages[:stage])
                flat_locations += [(offset + p, layer) for p, layer in locations]
            locations, pos, rest, prefix = flat_locations, int(parts[1]), parts[2:], "blocks"
        for index, (p, layer) in enumerate(locations):
            if p != pos:
                continue
            if layer is None:
                out[f"{prefix}/{index}/" + "/".join(rest)] = value
            else:
                assert rest[0] == "block", path
                out[f"{prefix}/{index}/" + "/".join(rest[1:])] = value[layer]
    return out


@functools.cache
def _pair(family: str) -> tuple[nnx.Module, nnx.Module, dict[str, np.ndarray]]:
    """(unrolled model with random weights, scanned model loaded from its checkpoint, the
    checkpoint)."""
    unrolled = _random_weights(_build(family, scan=False))
    checkpoint = _checkpoint(family, _flat(unrolled))
    # The checkpoint written here loads back into the unrolled model unchanged...
    reloaded = _flat(_load(family, _build(family, scan=False), checkpoint))
    want = _flat(unrolled)
    assert set(reloaded) == set(want)
    for path in want:
        np.testing.assert_array_equal(reloaded[path], want[path], err_msg=path)
    # ...and into the scanned one.
    scanned = _load(family, _build(family, scan=True), checkpoint)
    return unrolled, scanned, checkpoint


# ----------------------------------------------------------------------------- structure, loading


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loading_fills_stacked_leaves_with_the_unrolled_values(family):
    unrolled, scanned, _ = _pair(family)
    assert num_params(scanned) == num_params(unrolled)
    if _is_timm(family):
        assert scanned.stage_block_locations() == _expected_locations(DEPTHS)
        stack = scanned.stages[0][1]
        assert unrolled.stage_block_locations() == [[(i, None) for i in range(d)] for d in DEPTHS]
    else:
        flat_positions = [loc for stage in _expected_locations(DEPTHS) for loc in stage]
        assert [layer for _, layer in scanned.block_locations()] == [
            layer for _, layer in flat_positions
        ]
        stack = scanned.blocks[1]
    assert isinstance(stack, BlockStack) and stack.num_layers == DEPTHS[0] - 1
    scanned_flat = _flat(scanned)
    assert any(p.count("/block/") for p in scanned_flat)
    got, want = _unstack(family, scanned_flat), _flat(unrolled)
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


@pytest.mark.parametrize("family", ["nf_regnet", "eca_nfnet"])
def test_a_missing_layer_is_named(family):
    _, _, checkpoint = _pair(family)
    if _is_timm(family):
        dropped = "stages.0.2.conv2.weight"
        target, error = "stages/0/1/block/conv2/kernel", TimmWeightsError
    else:
        dropped = "NF_RegNet/~/nf_block_2/~/conv1/w"  # block 2: layer 1 of the stage-0 stack
        target, error = "blocks/1/block/conv1/kernel", HaikuWeightsError
    partial = {k: v for k, v in checkpoint.items() if k != dropped}
    with pytest.raises(error, match=r"1 missing") as raised:
        _load(family, _build(family, scan=True), partial)
    assert f"{target} " in str(raised.value) and "stacked layers [1] absent" in str(raised.value)
    # A layer's array of the wrong shape names the layer.
    bad = dict(checkpoint, **{dropped: np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(error, match=r"1 shape mismatches") as raised:
        _load(family, _build(family, scan=True), bad)
    assert "[1]" in str(raised.value) if _is_timm(family) else target in str(raised.value)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_agc_sees_the_unrolled_units(family):
    """With the model's own ``agc_unit_axes``, every unit norm of the scanned model is one of the
    unrolled model's (computed in float64 here, over the axes AGC reduces)."""

    def unit_norms(model):
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        plan = agc_optax.describe(params, model.agc_unit_axes)
        norms = []
        for row, leaf in zip(plan, jax.tree.leaves(params), strict=True):
            leaf = np.asarray(leaf, np.float64)
            reduce = tuple(a for a in range(leaf.ndim) if a not in row.unit_axes)
            norms.append(np.sqrt(np.sum(leaf**2, axis=reduce)).ravel())
        return np.sort(np.concatenate(norms))

    unrolled, scanned, _ = _pair(family)
    assert unrolled.agc_unit_axes is None and scanned.agc_unit_axes
    np.testing.assert_allclose(unit_norms(scanned), unit_norms(unrolled), rtol=1e-12)


# ----------------------------------------------------------------------------- numbers

# Compiling is what these tests spend their time on: LLVM's optimisation level changes how fast
# the code runs, not what it computes (both layouts are compiled alike), and level 0 compiles
# about 40% faster.
_QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def _run(fn, model, *args):
    """``fn(model, *args)``, jitted (the model is not changed)."""
    graphdef, state = nnx.split(model)
    pure = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a), compiler_options=_QUICK_COMPILE)
    return pure(state, *args)


def _outputs(model, x):
    """Logits (and DeepMind's metrics where the family has them) and every stage's features."""
    if hasattr(model, "forward_outputs"):
        outputs = model.forward_outputs(x, return_metrics=True)
    else:
        outputs = {"logits": model(x)}
    return outputs, model.forward_intermediates(x)


def _close(got, want, what):
    want = np.asarray(want)
    atol = 1e-5 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=atol, err_msg=what)


# eca_nfnet's numbers are checked against timm's own logits below.
@pytest.mark.parametrize("family", ["dm_nfnet", "nf_regnet", "nf_resnet"])
def test_scanned_outputs_equal_unrolled(family):
    unrolled, scanned, _ = _pair(family)
    unrolled.eval()
    scanned.eval()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    want_out, want_features = _run(_outputs, unrolled, x)
    got_out, got_features = _run(_outputs, scanned, x)
    assert set(got_out) == set(want_out)
    if not _is_timm(family):  # DeepMind's metrics of every block, the stacked ones included
        assert len([k for k in want_out if k.startswith("res_avg_var_")]) == sum(DEPTHS)
    for key in want_out:
        _close(got_out[key], want_out[key], key)
    assert set(got_features) == set(want_features)
    for key in want_features:
        _close(got_features[key], want_features[key], key)
    assert scanned.feature_info == unrolled.feature_info


def test_stacked_gradients_equal_unrolled():
    """Gradients through a stack (skip gains, SE, per-layer beta) equal those of the unrolled
    blocks (stem and head are the same modules in both layouts)."""
    unrolled, scanned, _ = _pair("nf_resnet")
    unrolled.eval()
    scanned.eval()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
    weights = jax.random.normal(jax.random.key(2), (2, 8, 8, 16))

    def grads(blocks):
        def loss(blocks):
            out = x
            for block in blocks:
                out = block(out)[0]
            return jnp.sum(out * weights)

        return nnx.grad(loss)(blocks)

    def flat(state):
        return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}

    # Stage 0's identity-shortcut blocks: two unrolled blocks, one stack.
    want = flat(_run(grads, nnx.List(unrolled.blocks[1:3])))
    got = flat(_run(grads, nnx.List(scanned.blocks[1:2])))
    assert want and len(got) == len(want) / 2  # every leaf once, stacked over two layers
    for path, value in got.items():
        assert path.startswith("0/block/"), path
        for layer in range(2):
            unrolled_path = f"{layer}/" + path.removeprefix("0/block/")
            _close(value[layer], want[unrolled_path], f"gradient of {unrolled_path}")


@functools.cache
def _canonical_pair(family: str) -> tuple[nnx.Module, nnx.Module]:
    """A one-block-per-stage model with random weights, and the same weights in the model built
    with ``canonical_conv_grads=True``."""
    plain = _random_weights(_build(family, scan=False, depths=(1, 1)))
    abstract = _build(family, scan=False, depths=(1, 1), canonical_conv_grads=True)
    return plain, nnx.merge(nnx.graphdef(abstract), nnx.state(plain))


# NF-RegNet has grouped convs, strided ones among them; NF-ResNet a strided 7x7 stem and strided
# projections. (timm's NFNets pass too, at 5-6 s each.)
@pytest.mark.parametrize("family", ["nf_regnet", "nf_resnet"])
def test_canonical_conv_grads_give_the_default_gradients(family):
    """Every conv (strided stem and transitions, grouped convs) becomes a `CanonicalGradWSConv`;
    the parameters are the same leaves, and the gradients of parameters and input are the
    default model's."""
    unrolled, canonical = _canonical_pair(family)
    convs = _convs(canonical)
    assert canonical.canonical_conv_grads and not unrolled.canonical_conv_grads
    assert {type(c) for c in convs} == {CanonicalGradWSConv}
    assert {type(c) for c in _convs(unrolled)} == {WSConv}
    assert any(c.strides != (1, 1) for c in convs)
    assert _param_shapes(canonical) == _param_shapes(unrolled)
    unrolled.eval()
    canonical.eval()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    target = jax.random.normal(jax.random.key(2), (2, 10))

    def grads(model, x):
        return nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x) * target)), argnums=(0, 1))(model, x)

    (want, want_dx), (got, got_dx) = _run(grads, unrolled, x), _run(grads, canonical, x)
    _close(got_dx, want_dx, "input gradient")
    want, got = nnx.to_flat_state(want), dict(nnx.to_flat_state(got))
    assert len(got) == len(want)
    for path, value in want:
        _close(got[path].get_value(), value.get_value(), "/".join(map(str, path)))


def test_forward_mode_through_canonical_convs_is_a_clear_error():
    canonical = _canonical_pair("nf_regnet")[1]
    canonical.eval()
    graph, params, rest = nnx.split(canonical, nnx.Param, ...)
    x = jnp.ones((1, 32, 32, 3))

    def logits(params):
        return nnx.merge(graph, params, rest)(x)

    with pytest.raises(TypeError, match=r"supports reverse-mode differentiation only .* build the "
                       r"model with canonical_conv_grads=False and scan_blocks=False"):  # fmt: skip
        jax.jvp(logits, (params,), (params,))  # Eager; under jit, JAX's message (test_scan_blocks).


def test_block_stack_draws_each_layers_rate_from_reseeded_streams():
    """A toy block whose branch is ``beta`` times ones: with ``beta = 2**layer`` the stack's
    output spells in binary which layers kept their branch, per example. The streams are
    reseeded as the train step does (one key per layer, split from the step's key)."""

    class Toy(nnx.Module):
        def __init__(self, *, beta, stochdepth_rate, rngs):
            self.stoch_depth = StochasticDepth(stochdepth_rate, rngs=rngs)

        def __call__(self, x, *, beta, stochdepth_rate):
            branch = jnp.ones_like(x) * beta
            return x + self.stoch_depth(branch, rate=stochdepth_rate), jnp.var(branch)

    rates = [0.0, 0.25, 0.75]
    betas = [1.0, 2.0, 4.0]
    (stack,) = residual_run(Toy, betas, rates, scan=True, rngs=nnx.Rngs(dropout=0))
    assert isinstance(stack, BlockStack)
    assert stack.layer_inputs["stochdepth_rate"] == (0.0, 0.25, 0.75)
    assert stack.block.stoch_depth.rngs.key.shape == (3,)  # One stream per layer.

    @nnx.jit
    def run(stack, key):
        nnx.reseed(stack, dropout=key, policy="match_shape")
        return stack(jnp.zeros((4000, 1)))

    out, res_avg_var, metrics = run(stack, jax.random.key(1))
    assert metrics == {}  # Not asked for.
    np.testing.assert_array_equal(np.asarray(res_avg_var), np.zeros(3))
    code = np.asarray(out[:, 0]).astype(int)
    kept = np.stack([(code >> layer) & 1 for layer in range(3)], axis=1)
    # Keep probability 1 - rate per layer (4000 draws: standard error <= 0.008).
    np.testing.assert_allclose(kept.mean(0), [1.0, 0.75, 0.25], atol=0.04)
    # Independent layers: each layer draws its own key.
    assert abs(np.corrcoef(kept[:, 1], kept[:, 2])[0, 1]) < 0.1
    # The same key draws the same masks; another key others.
    np.testing.assert_array_equal(np.asarray(run(stack, jax.random.key(1))[0]), np.asarray(out))
    assert not np.array_equal(np.asarray(run(stack, jax.random.key(2))[0]), np.asarray(out))
    # Unrolled, the same run is three blocks (a zero rate gets no module in the families).
    assert len(residual_run(Toy, betas, rates, scan=False, rngs=nnx.Rngs(dropout=0))) == 3


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "name, extra",
    [
        ("nf_resnet50", dict(widths=(16, 32, 32, 32), width=1)),
        ("nf_regnet_b0", dict(widths=(8, 16, 16, 24), width=1.0)),
        ("eca_nfnet_l0", dict(widths=(256, 256, 256, 256), num_features=64)),
        ("dm_nfnet_f1", dict(widths=(256, 256, 256, 256), num_features=64)),
    ],
)
def test_create_model_takes_scan_blocks(name, extra):
    """Stage 1's two identity blocks stack; stage 0's single one stays a plain block."""
    extra = dict(extra, depths=(2, 3, 1, 1))
    model = nnx.eval_shape(
        lambda: create_model(name, 10, scan_blocks=True, rngs=nnx.Rngs(0), **extra)
    )
    plain = nnx.eval_shape(lambda: create_model(name, 10, rngs=nnx.Rngs(0), **extra))
    assert model.scan_blocks and model.agc_unit_axes and plain.agc_unit_axes is None
    assert num_params(model) == num_params(plain)
    stages = [[(0, None), (1, None)], [(0, None), (1, 0), (1, 1)], [(0, None)], [(0, None)]]
    if isinstance(model, TimmNFNet):
        assert model.stage_block_locations() == stages
    else:
        assert model.block_locations() == [
            (0, None), (1, None), (2, None), (3, 0), (3, 1), (4, None), (5, None)
        ]  # fmt: skip
    assert any("/block/" in path for path in _flat(model))
    with pytest.raises(ValueError, match='`scan_blocks`: expected True, False or "auto", got \'y'):
        create_model(name, 10, scan_blocks="yes", rngs=nnx.Rngs(0), **extra)
    auto = nnx.eval_shape(
        lambda: create_model(name, 10, scan_blocks="auto", rngs=nnx.Rngs(0), **extra)
    )
    assert auto.scan_blocks is resolve_scan_blocks("auto")  # one rule, per backend
    # Every conv takes canonical gradients; the parameters stay the plain model's leaves.
    canonical = nnx.eval_shape(
        lambda: create_model(name, 10, canonical_conv_grads=True, rngs=nnx.Rngs(0), **extra)
    )
    assert canonical.canonical_conv_grads and not plain.canonical_conv_grads
    assert {type(c) for c in _convs(canonical)} == {CanonicalGradWSConv}
    assert {type(c) for c in _convs(plain)} == {WSConv}
    assert _param_shapes(canonical) == _param_shapes(plain)
    assert canonical.agc_unit_axes is None


def test_timms_reference_file_loads_into_a_scanned_model():
    """timm's reference ``eca_nfnet_l0`` (depths (3, 1, 1, 1): stage 0 stacks two blocks)
    through ``create_model(pretrained=path, scan_blocks=True)``: timm's logits."""
    path = reference_file("timm/eca_nfnet_l0_state_dict.npz")
    kw = dict(depths=(3, 1, 1, 1), widths=(256, 512, 512, 512), num_features=768)
    model = create_model("eca_nfnet_l0", None, pretrained=path, scan_blocks=True, **kw,
                         rngs=nnx.Rngs(0))  # fmt: skip
    assert model.stage_block_locations()[0] == [(0, None), (1, 0), (1, 1)]
    state_dict = dict(np.load(path))
    np.testing.assert_array_equal(
        _flat(model)["stages/0/1/block/conv2/kernel"][1],
        state_dict["stages.0.2.conv2.weight"].transpose(2, 3, 1, 0),
    )
    model.eval()
    x = np.load(reference_file("timm/input_nchw.npy")).transpose(0, 2, 3, 1)
    want = np.load(reference_file("timm/eca_nfnet_l0_logits.npy"))
    got = np.asarray(_run(lambda m, v: m(v), model, x))
    np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, float(np.abs(want).max())))
