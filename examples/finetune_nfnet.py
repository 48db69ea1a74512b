"""Fine-tune an NFNet on a new task: load weights, replace the classifier, train with AGC.

    python examples/finetune_nfnet.py --weights F0_haiku.npz     # DeepMind's ImageNet weights
    python examples/finetune_nfnet.py                            # offline: random init, small net

Without ``--weights`` the script stays offline and, unless ``--full`` is given, shrinks the network
(one block per stage) so a few steps take seconds on a CPU; the code path is the same.
The new task is scikit-learn's bundled digits, upsampled to RGB 32x32.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import agc_optax
from agc_optax.models import create_model, load_haiku_params


def digits_rgb(size: int = 32):
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    x = x.repeat(size // 8, axis=1).repeat(size // 8, axis=2)[..., None].repeat(3, axis=-1)
    x = (x - x.mean()) / x.std()
    return x, d.target.astype(np.int32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nfnet_f0")
    p.add_argument("--weights", help="DeepMind Haiku .npz (dill pickle) or a flat npz")
    p.add_argument("--full", action="store_true", help="full-size network even without weights")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()

    # 1. The pretrained network, with its 1000-class ImageNet head.
    small = (
        {}
        if (args.weights or args.full)
        else {"depths": (1, 1, 1, 1), "widths": (256, 256, 256, 256)}
    )
    model = create_model(args.model, num_classes=1000, rngs=nnx.Rngs(0, dropout=1), **small)
    if args.weights:
        load_haiku_params(model, args.weights, allow_pickle=args.weights.endswith("haiku.npz"))
        print(f"loaded {args.weights}")
    else:
        print("no --weights: random initialisation (offline demo)")

    # 2. A new, zero-initialised head for 10 classes: the network starts from its features.
    model.head = nnx.Linear(
        model.head.in_features, 10, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(2)
    )

    # 3. The NFNet optimizer. AGC skips `head/kernel`, as in the paper's fine-tuning recipe.
    optimizer = nnx.Optimizer(
        model, agc_optax.sgd_agc(args.lr, clipping=0.01, stats=True), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    x, y = digits_rgb()
    rng = np.random.default_rng(0)
    model.train()
    for step in range(args.steps):
        idx = rng.choice(1500, args.batch_size, replace=False)
        loss, acc = train_step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        if step % 10 == 0 or step == args.steps - 1:
            clip = optax.tree.get(nnx.state(optimizer.opt_state), "clip_fraction")
            print(
                f"step {step}: loss {float(loss):.3f} batch acc {float(acc):.2f} "
                f"clip fraction {float(clip):.2f}"
            )

    model.eval()
    logits = jax.jit(lambda xs: model(xs))(jnp.asarray(x[1500:]))
    accuracy = float(jnp.mean(logits.argmax(-1) == y[1500:]))
    print(f"held-out accuracy after {args.steps} steps: {accuracy:.3f}")


if __name__ == "__main__":
    main()
