"""Fine-tune an NFNet on a new task: pretrained weights, a new classifier, AGC with a smaller clip.

    python examples/finetune_nfnet.py --pretrained --trust-download     # official weights
    python examples/finetune_nfnet.py --weights F0_haiku.npz --allow-pickle  # a local file
    python examples/finetune_nfnet.py --model eca_nfnet_l0 --weights eca_nfnet_l0.safetensors
    python examples/finetune_nfnet.py                                   # offline: random init

Without weights the script stays offline and, unless ``--full`` is given, shrinks the network
(one block per stage) so a few steps run quickly on a CPU; the code path is the same. The new
task is scikit-learn's bundled digits, upsampled to RGB 32x32.

What it shows: ``create_model(name, pretrained=...)`` keeps the checkpoint's classifier
(``num_classes=None``); ``reset_classifier`` swaps in a new one for 10 classes;
``forward_features`` / ``forward_head(pre_logits=True)`` give the backbone's features (here to
initialise the new head from class means: a linear probe in closed form); then the whole network
trains with ``sgd_agc`` or ``adamw_agc``, clipping at a smaller threshold than from scratch
(0.01), because pretrained weights need only small updates relative to their norms.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import agc_optax
from agc_optax.models import create_model


def digits_rgb(size: int = 32):
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    x = x.repeat(size // 8, axis=1).repeat(size // 8, axis=2)[..., None].repeat(3, axis=-1)
    x = (x - x.mean()) / x.std()
    return x, d.target.astype(np.int32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nfnet_f0")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="download official weights")
    weights.add_argument("--weights", help="a local file: Haiku .npz, timm .safetensors/.npz")
    p.add_argument("--trust-download", action="store_true", help="see agc-eval --help")
    p.add_argument("--allow-pickle", action="store_true", help="read DeepMind's pickled npz")
    p.add_argument("--full", action="store_true", help="full-size network even without weights")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--clipping", type=float, default=0.005, help="AGC threshold (fine-tune)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="default 0.02 (sgd) or 1e-4 (adamw)")
    args = p.parse_args()

    # 1. The pretrained network with the checkpoint's own classifier (num_classes=None).
    pretrained = True if args.pretrained else (args.weights or False)
    small = {} if (pretrained or args.full) else {"depths": (1, 1, 1, 1), "widths": (256,) * 4}
    try:
        model = create_model(
            args.model,
            None if pretrained else 1000,
            rngs=nnx.Rngs(0, dropout=1),
            pretrained=pretrained,
            trust_download=args.trust_download,
            allow_pickle=args.allow_pickle,
            **small,
        )
    except (ImportError, OSError, ValueError, TypeError) as e:  # e.g. dill missing, bad file
        p.error(str(e).splitlines()[0])
    if pretrained:
        print(f"loaded {args.weights or 'the official weights'}")
    else:
        print("no weights: random initialisation (offline demo)")

    # 2. A new classifier for 10 classes (create_model(..., 10, pretrained=...) does the same).
    model.reset_classifier(10, rngs=nnx.Rngs(2))
    x, y = digits_rgb()
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]

    # 3. Backbone features: forward_features is the final feature map, forward_head with
    # pre_logits=True pools it. Class means of the normalised features set the new head.
    model.eval()
    features = nnx.jit(lambda m, v: m.forward_head(m.forward_features(v), pre_logits=True))
    chunks = [features(model, train_x[i : i + 250]) for i in range(0, 1500, 250)]
    pooled = np.concatenate([np.asarray(c) for c in chunks])
    feature_map = nnx.eval_shape(lambda m, v: m.forward_features(v), model, x[:1]).shape
    print(f"features: {model.num_features} per image (feature map {tuple(feature_map)})")
    scale = np.linalg.norm(pooled, axis=1).mean()
    means = np.stack([pooled[train_y == c].mean(0) for c in range(10)]) / scale
    model.head.kernel.set_value(jnp.asarray(means.T))
    model.head.bias.set_value(jnp.zeros(10))

    # 4. The NFNet optimizer with a fine-tuning clip. AGC skips the classifier (``head``), as in
    # the paper; the rest of the network is clipped at --clipping.
    if args.optimizer == "sgd":
        tx = agc_optax.sgd_agc(args.lr or 0.02, clipping=args.clipping, stats=True)
    else:
        tx = agc_optax.adamw_agc(args.lr or 1e-4, clipping=args.clipping, stats=True)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(0)
    model.train()
    for step in range(args.steps):
        idx = rng.choice(1500, args.batch_size, replace=False)
        loss, acc = train_step(model, optimizer, jnp.asarray(train_x[idx]), train_y[idx])
        if step % 10 == 0 or step == args.steps - 1:
            clip = optax.tree.get(nnx.state(optimizer.opt_state), "clip_fraction")
            print(
                f"step {step}: loss {float(loss):.3f} batch acc {float(acc):.2f} "
                f"clip fraction {float(clip):.2f}"
            )

    model.eval()
    logits = jax.jit(lambda xs: model(xs))(jnp.asarray(test_x))
    accuracy = float(jnp.mean(logits.argmax(-1) == test_y))
    print(f"held-out accuracy after {args.steps} steps: {accuracy:.3f}")


if __name__ == "__main__":
    main()
