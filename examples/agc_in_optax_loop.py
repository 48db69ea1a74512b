"""Adding AGC to an existing optax + ``nnx.Optimizer`` training loop: one line in the chain.

AGC needs the parameters in ``update`` (the clip threshold is relative to each unit's weight
norm); ``nnx.Optimizer`` passes them. The classifier is left unclipped, as in the NFNet recipe.

    python examples/agc_in_optax_loop.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import agc_optax


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 128, rngs=rngs)
        self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.hidden(x)))


def main() -> None:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    model = MLP(nnx.Rngs(0))
    tx = optax.chain(
        # The one new line: clip each output unit's gradient to 1% of its weight norm.
        agc_optax.adaptive_grad_clip(0.01, exclude=r"head/kernel", stats=True),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, xb, yb):
        def loss_fn(model):
            logits = model(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    for epoch in range(20):
        order = rng.permutation(len(x_train))
        for i in range(0, len(order) - 63, 64):
            idx = order[i : i + 64]
            loss = train_step(
                model, optimizer, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
            )
        if epoch % 5 == 4:
            clip = optax.tree.get(nnx.state(optimizer.opt_state), "clip_fraction")
            print(f"epoch {epoch + 1}: loss {float(loss):.3f}, AGC clip fraction {float(clip):.2f}")
    accuracy = jnp.mean(jnp.argmax(model(jnp.asarray(x_test)), -1) == y_test)
    print(f"test accuracy: {float(accuracy):.3f}")


if __name__ == "__main__":
    main()
