"""Train state, the train and eval steps, and the EMA of the weights.

The NNX model is split once into a static graph definition and plain pytrees: trainable
parameters, batch statistics (ResNet-50's BatchNorm; empty for normalizer-free nets) and the RNG
streams. Parameters travel as pure nested dicts, so optax, AGC (which names leaves by path such as
``head/kernel``), the EMA and orbax all see the same simple tree.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from agc_optax._guard import decay, find_guard, kept
from agc_optax.training.parallel import DATA_AXIS, Placement


class TrainState(NamedTuple):
    """Everything a step changes; checkpointed as one pytree.

    Attributes:
      step: number of completed training steps, int32 scalar: the run's one step counter.
        The data position (:meth:`TrainBatches.position`), the dropout keys and the checkpoint
        number derive from it; the optimizer's own ``count`` advances with it.
      params: trainable parameters, a pure nested dict.
      batch_stats: non-trainable statistics (BatchNorm), a pure nested dict, often empty.
      opt_state: the optax state.
      ema_params: exponential moving average of ``params``, or ``None`` when the run keeps no
        EMA: a second tree equal to ``params`` would cost a copy of every weight each step.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model taken apart for functional use under ``jit``/``pmap``.

    Attributes:
      train_graph: graph definition with dropout/stochastic depth on (``model.train()``).
      eval_graph: graph definition in inference mode (``model.eval()``).
      params_template: the ``nnx.State`` of parameters, used to rebuild states from pure dicts.
      stats_template: the ``nnx.State`` of batch statistics.
      rng_state: the RNG stream variables; re-keyed every step from ``(seed, step)``.
    """

    train_graph: Any
    eval_graph: Any
    params_template: Any
    stats_template: Any
    rng_state: Any

    def merge(self, train: bool, params: Any, batch_stats: Any) -> nnx.Module:
        """A live module holding ``params`` and ``batch_stats`` (pure dicts), for tracing."""
        p = jax.tree.map(lambda x: x, self.params_template)
        nnx.replace_by_pure_dict(p, params)
        s = jax.tree.map(lambda x: x, self.stats_template)
        nnx.replace_by_pure_dict(s, batch_stats)
        graph = self.train_graph if train else self.eval_graph
        # Fresh Variable objects (tree.map rebuilds them) so the module may mutate its RNG
        # counters inside the current trace without touching the shared template.
        return nnx.merge(graph, p, s, jax.tree.map(lambda x: x, self.rng_state))


def split_model(model: nnx.Module) -> tuple[SplitModel, Any, Any]:
    """Splits ``model`` into a :class:`SplitModel` and pure ``(params, batch_stats)`` dicts."""
    model.eval()
    eval_graph, _, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.train()
    train_graph, params, stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    split = SplitModel(train_graph, eval_graph, params, stats, rng_state)
    return split, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """DeepMind's EMA warm-up: ``min(decay, (1 + t) / (10 + t))``, so early averages forget fast."""
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def init_state(
    params: Any, batch_stats: Any, tx: optax.GradientTransformation, *, ema: bool = True
) -> TrainState:
    """The state before step 0; ``ema=False`` keeps no EMA tree (``ema_params`` is ``None``)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
    )


def state_initializer(
    build: Callable[[], nnx.Module], tx: optax.GradientTransformation, *, ema: bool = True
) -> Callable[[], TrainState]:
    """``init() -> TrainState`` that builds the model with ``build`` and splits it.

    Made for ``jax.eval_shape(init)`` (the state's shapes, for restoring a checkpoint) and
    ``jax.jit(init, out_shardings=...)()`` (the state created where it lives): no copy of it ever
    passes through the host. ``build`` fixes its seeds, so every call gives the same weights.
    ``ema`` as in :func:`init_state`.
    """

    def init() -> TrainState:
        _, params, batch_stats = split_model(build())
        return init_state(params, batch_stats, tx, ema=ema)

    return init


def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    # Integer labels, or (MixUp / CutMix) rows of class probabilities.
    if labels.ndim == logits.ndim:
        one_hot = labels.astype(jnp.float32)
    else:
        one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        one_hot = optax.smooth_labels(one_hot, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot)


class Gradients(NamedTuple):
    """What the first half of a train step hands the second: the gradients of the loss
    (averaged over devices under ``pmap``) and what the forward pass measured.

    Attributes:
      grads: the gradients, shaped like ``state.params``.
      batch_stats: the batch statistics after this batch (not yet guarded).
      loss: the mean loss of the batch.
      accuracy: the batch's top-1 accuracy.
    """

    grads: Any
    batch_stats: Any
    loss: jax.Array
    accuracy: jax.Array

    @staticmethod
    def layout(state_layout: TrainState, replicated: Any) -> Gradients:
        """Where each part lives when the state lives as ``state_layout`` (a state of
        shardings): the gradients as the parameters, so that a split state
        (``--shard-params``) gets its gradients split alike, and the scalars replicated."""
        return Gradients(state_layout.params, state_layout.batch_stats, replicated, replicated)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A train step in two halves: ``step(state, batch)`` is
    ``step.update(state, step.gradients(state, batch))``.

    Jitted whole, the two halves are one XLA program. Jitted apart, they are two, which
    XLA compiles faster (separately, or at the same time: :class:`TwoProgramStep`) and runs
    almost as fast (on CPU 0.3-0.5 ms more for a 4 ms step, within 2% for NF-ResNet-50 and
    F0): every update waits for every gradient anyway, because the divergence guard decides
    from all of them (``benchmarks/RESULTS.md``). The two forms fuse differently, so their
    float32 results agree to rounding.

    Attributes:
      gradients: ``(state, batch) -> Gradients``: the forward and backward pass.
      update: ``(state, gradients) -> (state, metrics)``: the optimizer, the guard, the EMA
        and the metrics.
    """

    gradients: Callable[[TrainState, Any], Gradients]
    update: Callable[[TrainState, Gradients], tuple[TrainState, dict[str, jax.Array]]]

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        return self.update(state, self.gradients(state, batch))


class TwoProgramStep:
    """A :class:`TrainStep` run as two compiled programs, compiled at the same time:
    ``update(state, gradients(state, batch), *rest)``.

    The first call lowers the gradients half and compiles it on a second thread while it
    lowers the update (for the shapes and shardings that the gradients half reports,
    ``jax.stages.Lowered.out_info``) and compiles that; later calls find both executables in
    ``jax.jit``'s cache. Two programs compile faster than one that holds both (XLA's passes,
    copy insertion the largest, cost more than linearly in a program's size), and at the same
    time faster still: NF-ResNet-50's train step on 2 CPU cores in 9.0 s instead of 13-14 s,
    F0's in 11.3 s instead of 17-19 s (``benchmarks/RESULTS.md``). The price: the update no
    longer overlaps the end of the backward pass (on CPU 0.3-0.5 ms of the default run's 4 ms
    step; within noise, 0-2%, of NF-ResNet-50's and F0's).

    Example::

      step = make_train_step(split, tx, seed=0, ema=0.9999, skip_nonfinite=True)
      train_step = TwoProgramStep(
          jax.jit(step.gradients), jax.jit(step.update, donate_argnums=0)
      )
      state, metrics = train_step(state, batch)  # compiles both, then runs both

    Args:
      gradients: the first half jitted (``jax.jit(step.gradients)``), its state not donated:
        the update reads it.
      update: the second half jitted, the state donated; a call's arguments after the batch
        go to it (the trainer's stop votes, :func:`with_stop_vote`).
      compile_ahead: compile both halves on the first call, side by side. ``False`` for
        ``jax.pmap`` halves, whose calls do not reuse ahead-of-time compiles: each then
        compiles at its own first call, one after the other.
    """

    def __init__(self, gradients: Any, update: Any, *, compile_ahead: bool = True):
        self.gradients, self.update = gradients, update
        self._pending = compile_ahead

    def compile(self, state: TrainState, batch: Any, *rest: Any) -> tuple[Any, Any]:
        """Both halves compiled for these arguments, side by side: ``(gradients, update)``
        executables (``jax.stages.Compiled``, for their ``cost_analysis()`` and HLO)."""
        first = self.gradients.lower(state, batch)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # XLA compiles the gradients while Python traces and lowers the update.
            compiling = pool.submit(first.compile)
            second = self.update.lower(state, first.out_info, *rest).compile()
            return compiling.result(), second

    def __call__(self, state: TrainState, batch: Any, *rest: Any) -> Any:
        if self._pending:
            self.compile(state, batch, *rest)
            self._pending = False
        return self.update(state, self.gradients(state, batch), *rest)


def make_train_step(
    model: SplitModel,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    label_smoothing: float = 0.0,
    ema: float | None = None,
    dtype: Any = jnp.float32,
    pmap: bool = False,
    skip_nonfinite: bool = False,
    preprocess: Callable[..., tuple[jax.Array, jax.Array]] | None = None,
    log_every: int = 1,
    total_steps: int | None = None,
    update_norm: bool = True,
) -> TrainStep:
    """Builds the (not yet jitted) train step ``(state, (images, labels)) -> (state, metrics)``.

    The step is a :class:`TrainStep`: called, it runs both halves in one function (jit it as
    one program); its ``gradients`` and ``update`` halves can also be compiled as two
    programs, as the trainer does (:class:`TwoProgramStep`).

    Args:
      model: the split model.
      tx: the optimizer; AGC inside it sees the gradients after they are averaged over devices.
      seed: root of the per-step dropout / stochastic-depth keys.
      label_smoothing: label smoothing of the cross-entropy.
      ema: EMA decay, or ``None`` for no EMA: ``state.ema_params`` passes through untouched
        (``None`` from ``init_state(..., ema=False)``, so no tree is copied).
      dtype: compute dtype of the inputs (the model's own ``dtype`` sets its activations).
      pmap: the step runs under ``jax.pmap`` over axis ``data``: average gradients, loss and batch
        statistics with ``lax.pmean`` (once); under ``jit`` XLA inserts that reduction itself.
      skip_nonfinite: the divergence guard. When the loss or a gradient is not finite, the
        step keeps the parameters, batch statistics, optimizer state and EMA as they were (as
        ``optax.apply_if_finite`` does) and only ``step`` advances, so the next step draws the
        next batch. The check uses only values that exist before the update: the loss, and
        AGC's ``max_ratio`` when the optimizer keeps AGC statistics (NaN or Inf exactly when
        a clipped unit's gradient or weights are; no extra pass) or else one reduction over
        the gradients. The select then joins the optimizer's own elementwise pass, so every
        new weight is written once, in place, as without the guard. An update that is not
        finite although the gradients are (an infinite learning rate, an overflow) is applied;
        the weights it makes are not finite, so every later step is skipped (the trainer then
        stops after ``max_bad_steps``, and a checkpoint is never written from such a state).
        The decision is made on the averaged values, so every device and process takes the
        same branch. Off by default: the large-batch sweep (:mod:`agc_optax.experiments`)
        studies divergence as it happens. When the optimizer guards itself
        (``sgd_agc(..., skip_nonfinite=True)`` or ``adamw_agc``'s, which the trainer uses; it
        is handed the loss as ``value``), the step follows its decision
        (:class:`agc_optax.SkipNonfiniteState`, with or without this flag): the optimizer
        already kept the momentum and returned zero updates, so the step only keeps the
        batch statistics and the EMA, and no whole-tree select remains (each would cost a
        copy of its buffers).
      preprocess: ``(key, images, labels) -> (images, targets)`` applied to the batch on the
        device first (streaming data: normalisation of uint8 images, MixUp / CutMix); targets
        may be integer labels or rows of class probabilities.
      log_every: the norms below are computed only on steps whose number (after the step) is a
        multiple of ``log_every`` or equals ``total_steps``, inside a ``lax.cond`` of the one
        compiled step; on other steps they read NaN. Each norm is a pass over a whole tree; its
        operands (the gradients, the old and the new weights) exist anyway, so a step that
        skips the conditional pays nothing for it (see ``benchmarks/RESULTS.md``).
      total_steps: the run's last step, which is always logged.
      update_norm: report ``update_norm``. Of the three norms it is the one that is not free
        on the steps that skip it: it needs the old weights next to the new ones, which the
        update writes in place of the old, so XLA copies every weight on every step (+273 MiB
        and 181 copies per NFNet-F0 step, ``benchmarks/RESULTS.md``). ``grad_norm`` and
        ``param_norm`` read only buffers that exist anyway.

    Returns:
      The step, a :class:`TrainStep`. Metrics: ``loss``, ``accuracy``, ``grad_norm`` (of the
      averaged gradients, before clipping), ``param_norm`` (of the weights after the step),
      ``update_norm`` (with ``update_norm=True``: of the change the step made to them, 0 for
      a skipped step), ``clip_fraction`` when the optimizer keeps AGC statistics, and with
      ``skip_nonfinite`` or an optimizer that guards itself ``skipped`` (1.0 when this step's
      update was dropped, else 0.0).
    """
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"`log_every` must be a positive integer, got {log_every!r}")
    root = jax.random.key(seed)

    def gradients(state: TrainState, batch: tuple[jax.Array, jax.Array]) -> Gradients:
        images, labels = batch
        key = jax.random.fold_in(root, state.step)
        if pmap:  # distinct masks per device, as the jit version draws distinct masks per row
            key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
        if preprocess is not None:  # its own stream, apart from the dropout key
            images, labels = preprocess(jax.random.fold_in(key, 1), images, labels)

        def loss_fn(params):
            module = model.merge(True, params, state.batch_stats)
            # Stacked (scan_blocks) streams hold one key per layer: split the step key to match.
            nnx.reseed(module, dropout=key, policy="match_shape")
            logits = module(images.astype(dtype))
            loss = _cross_entropy(logits, labels, label_smoothing).mean()
            stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
            return loss, (logits, stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        hard_labels = labels if labels.ndim == 1 else jnp.argmax(labels, -1)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == hard_labels)
        if pmap:
            grads, loss, accuracy, batch_stats = jax.lax.pmean(
                (grads, loss, accuracy, batch_stats), DATA_AXIS
            )
        return Gradients(grads, batch_stats, loss, accuracy)

    def update(state: TrainState, measured: Gradients):
        grads, batch_stats, loss, accuracy = measured
        # The loss goes to optimizers that take it (optax's extra-args protocol): a fused
        # optimizer with skip_nonfinite=True checks it along with the gradients.
        extra = {"value": loss} if isinstance(tx, optax.GradientTransformationExtraArgs) else {}
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        guard = find_guard(opt_state)
        finite = None
        if guard is not None:  # the optimizer skipped (zero updates, buffers kept) by itself
            finite = guard.last_finite
        elif skip_nonfinite:
            # Decided from values that exist before the update (the loss, and the gradients'
            # finiteness, free from AGC's statistics when the optimizer keeps them), so the
            # selects below join the optimizer's and the EMA's own elementwise passes.
            finite = jnp.isfinite(loss) & _gradients_finite(grads, opt_state)
            keep_old = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
            params, opt_state = jax.tree.map(
                keep_old, (params, opt_state), (state.params, state.opt_state)
            )
        if finite is not None:
            batch_stats = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), batch_stats, state.batch_stats
            )
        if ema is None:
            ema_params = state.ema_params
        elif state.ema_params is None:
            raise ValueError(
                f"make_train_step(ema={ema}) needs a state with `ema_params`; create it with "
                "init_state(..., ema=True), or pass ema=None"
            )
        else:
            d = ema_decay(state.step, ema)
            ema_params = jax.tree.map(
                lambda e, p: decay(finite, d) * e + kept(finite, (1 - d) * p),
                state.ema_params,
                params,
            )
        metrics = {"loss": loss, "accuracy": accuracy}
        if finite is not None:
            metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        old_params = state.params if update_norm else None
        metrics.update(_norms(state.step, log_every, total_steps, grads, params, old_params))
        clip_fraction = optax.tree.get(opt_state, "clip_fraction", None)
        if clip_fraction is not None:
            metrics["clip_fraction"] = clip_fraction
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state, ema_params)
        return new_state, metrics

    return TrainStep(gradients, update)


def _state_and_metrics(state_layout: Any, replicated: Any) -> tuple[Any, Any]:
    # A step's results: the new state where the old one lives, the metrics replicated.
    return state_layout, replicated


def compile_train_step(
    placement: Placement, step: TrainStep, *, programs: int = 2
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The trainer's compiled step ``(state, batch, votes) -> (state, metrics)`` for
    ``placement``: ``step`` with the stop vote (:func:`with_stop_vote`), the state donated,
    the new state laid out like the old.

    ``programs``: 2 compiles the gradients and the update as two programs, side by side
    (:class:`TwoProgramStep`); 1 compiles the whole step as one.
    """
    if programs not in (1, 2):
        raise ValueError(f"`programs` must be 1 or 2, got {programs!r}")
    if programs == 1:
        return placement.compile(
            with_stop_vote(step, pmap=placement.pmap),
            donate_argnums=0,
            output_layout=_state_and_metrics,
        )
    return TwoProgramStep(
        placement.compile(step.gradients, output_layout=Gradients.layout),
        placement.compile(
            with_stop_vote(step.update, pmap=placement.pmap),
            donate_argnums=0,
            output_layout=_state_and_metrics,
        ),
        compile_ahead=not placement.pmap,
    )


#: Leaves up to this size are joined into one vector before :func:`_sum_of_squares` reduces it.
_JOIN_BELOW = 1 << 16


def _sum_of_squares(tree: Any) -> jax.Array:
    """The sum of squares of every entry of ``tree``, in float32.

    Small leaves (gains, biases: most of a network's leaves, a small share of its weights) are
    joined and reduced once, and large ones reduced one by one: a reduction per leaf is a
    fusion per leaf, which made the logging norms 14% of NFNet-F0's train step program, while
    joining every leaf would write a copy of the whole tree on each logging step.
    """
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
    small = [jnp.ravel(x) for x in leaves if x.size < _JOIN_BELOW]
    parts = [jnp.sum(jnp.square(x)) for x in leaves if x.size >= _JOIN_BELOW]
    if small:
        parts.append(jnp.sum(jnp.square(jnp.concatenate(small))))
    return sum(parts, jnp.zeros((), jnp.float32))


def _gradients_finite(grads: Any, opt_state: Any) -> jax.Array:
    """Whether every gradient entry is finite, from AGC's statistics when the optimizer keeps
    them (``max_ratio``, the largest ``||G_i|| / max(||W_i||, eps)`` over the clipped units, is
    NaN or Inf exactly when some unit's gradient or weights are; the units' norms are computed
    anyway, so this costs no pass over the tree), else from one reduction over the gradients.

    Leaves AGC leaves alone (the classifier kernel) are not in ``max_ratio``; their gradients
    are finite whenever the loss and the features are, and a non-finite feature makes the loss
    non-finite.
    """
    statistic = optax.tree.get(opt_state, "max_ratio", None)
    if statistic is None:  # NaN as soon as one leaf holds a NaN or an Inf
        leaves = jax.tree.leaves(grads)
        statistic = sum(jnp.where(jnp.all(jnp.isfinite(g)), 0.0, jnp.nan) for g in leaves)
    # The square root (NaN and Inf stay so) makes XLA compute the reduction over every leaf
    # once: it fuses cheap producers into each consumer, and the chain of maximums behind the
    # flag, copied into every leaf's update, made the F0 step's program 3x larger and its
    # compile 2.4x slower (benchmarks/RESULTS.md). A root is "expensive" to XLA's fusion
    # heuristics, so it is computed once and read as a scalar.
    return jnp.isfinite(jnp.sqrt(statistic))


_NORM_NAMES = ("grad_norm", "param_norm", "update_norm")


def _norms(
    step: jax.Array,
    log_every: int,
    total_steps: int | None,
    grads: Any,
    new_params: Any,
    old_params: Any | None,
) -> dict[str, jax.Array]:
    """``grad_norm``, ``param_norm`` (of ``new_params``) and, unless ``old_params`` is ``None``,
    ``update_norm`` (of the applied change ``new_params - old_params``): every step, or
    (``log_every > 1``) on logging steps only, NaN on the others."""
    names = _NORM_NAMES if old_params is not None else _NORM_NAMES[:2]

    def norms() -> dict[str, jax.Array]:
        values = [grads, new_params]
        if old_params is not None:
            values.append(
                jax.tree.map(
                    lambda n, o: n.astype(jnp.float32) - o.astype(jnp.float32),
                    new_params,
                    old_params,
                )
            )
        return {k: jnp.sqrt(_sum_of_squares(t)) for k, t in zip(names, values, strict=True)}

    if log_every == 1:
        return norms()
    done = step + 1
    should_log = done % log_every == 0
    if total_steps is not None:
        should_log |= done == total_steps
    nan = jnp.full((), jnp.nan, jnp.float32)
    return jax.lax.cond(should_log, norms, lambda: dict.fromkeys(names, nan))


def make_eval_step(
    model: SplitModel,
    *,
    dtype: Any = jnp.float32,
    pmap: bool = False,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[..., dict[str, jax.Array]]:
    """Builds ``(params, batch_stats, images, labels, mask) -> sums`` in inference mode.

    Returns sums (``correct``, ``correct_top5``, ``loss``, ``count``) rather than means, so
    padded final batches and many batches combine exactly. ``preprocess`` maps the images on
    the device first (streaming data: normalisation of uint8 images).
    """

    def eval_fn(params, batch_stats, images, labels, mask):
        if preprocess is not None:
            images = preprocess(images)
        module = model.merge(False, params, batch_stats)
        logits = module(images.astype(dtype))
        loss = _cross_entropy(logits, labels, 0.0)
        # The label is in the top 5 when fewer than 5 logits beat it (ties count for it).
        label_logit = jnp.take_along_axis(logits, labels[:, None], -1)
        in_top5 = jnp.sum(logits > label_logit, -1) < 5
        sums = {
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "correct_top5": jnp.sum(in_top5 * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }
        if pmap:
            sums = jax.lax.psum(sums, DATA_AXIS)
        return sums

    return eval_fn


def evaluate(
    sums_of: Callable[..., dict[str, Any]], batches: Iterable[tuple[Any, ...]]
) -> dict[str, float]:
    """Accuracy, top-5 accuracy (when the step reports it) and mean loss over ``batches`` of
    ``(images, labels, mask)``; ``count`` is the exact number of examples (mask sum).

    ``sums_of(images, labels, mask)`` returns an eval step's sums (:func:`make_eval_step`).
    """
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in batches:
        for k, v in sums_of(*batch).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = totals["count"]
    out = {"accuracy": totals["correct"] / n, "loss": totals["loss"] / n}
    if "correct_top5" in totals:
        out["top5_accuracy"] = totals["correct_top5"] / n
    out["count"] = n
    return out


def with_stop_vote(
    step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]], *, pmap: bool = False
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``step_fn`` with a third argument: each device's stop vote, agreed on inside the step.

    ``votes`` is an int32 array with one entry per device (under ``pmap`` one per device
    call), laid out like the batch; the wrapped step adds ``metrics["stop"]``, the largest vote
    over all devices and processes. The trainer votes the number of a signal that asked this
    process to stop (0 for none): because the vote travels with a step that every process runs
    anyway, all of them read the same decision for the same step and none waits on another
    (a signal reaching one host cannot deadlock the rest), at the cost of one scalar reduction
    per step.
    """

    def voting_step(state: TrainState, batch: Any, votes: jax.Array):
        state, metrics = step_fn(state, batch)
        stop = jnp.max(votes)
        if pmap:
            stop = jax.lax.pmax(stop, DATA_AXIS)
        return state, {**metrics, "stop": stop}

    return voting_step
