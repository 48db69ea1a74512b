"""Runs a short training in a fresh process with a chosen device count; saves the final params.

Usage: python parallel_worker.py OUT.npz RUN_DIR --devices N [--parallel pmap] [--steps S]
       [--shard-params] [--coordinator HOST:PORT --num-processes P --process-id I]
The device count must be fixed before JAX starts, hence a separate process per configuration.
A run stopped by a signal prints the CLI's line and exits as the CLI does (128 + signal).
With --shard-params the npz also holds ``__state_leaves__`` (JSON: shape, split axes, bytes
on each device, total bytes of every leaf of the trained state, as the trainer holds it at the
end) and ``__log__`` (the trainer's lines).
"""

from __future__ import annotations

import argparse
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("run_dir")
p.add_argument("--devices", type=int, default=1)
p.add_argument("--parallel", default="jit")
p.add_argument("--steps", type=int, default=8)
p.add_argument("--coordinator")
p.add_argument("--num-processes", type=int, default=1)
p.add_argument("--process-id", type=int, default=0)
p.add_argument("--shard-params", action="store_true")
args = p.parse_args()

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tiny_model import tiny_model  # noqa: E402

from agc_optax.training import PRESETS, train  # noqa: E402
from agc_optax.training.parallel import ShardedPlacement  # noqa: E402
from agc_optax.training.trainer import Preempted  # noqa: E402

state_leaves = []  # filled by a spy on the host copy the trainer makes of its final state
original_to_host = ShardedPlacement.to_host


def spying_to_host(self, tree):
    if hasattr(tree, "opt_state"):  # the TrainState, not a dict of metrics
        state_leaves.extend(
            [
                list(x.shape),
                [i for i, name in enumerate(x.sharding.spec) if name == "data"],
                [s.data.nbytes for s in x.addressable_shards],
                x.nbytes,
            ]
            for x in jax.tree.leaves(tree)
        )
    return original_to_host(self, tree)


ShardedPlacement.to_host = spying_to_host
log_lines = []

config = PRESETS["smoke"].replace(
    run_dir=args.run_dir,
    steps=args.steps,
    batch_size=32,
    parallel=args.parallel,
    eval_every=args.steps,
    checkpoint_every=args.steps,
    clipping=0.05,  # some units clip, some do not: both branches of AGC are exercised
    progress=False,
    coordinator=args.coordinator,
    num_processes=args.num_processes,
    process_id=args.process_id,
    shard_params=args.shard_params,
)
try:
    result = train(config, model_fn=tiny_model, log=log_lines.append)
except Preempted as e:
    print(f"agc-train: {e}", file=sys.stderr)
    sys.exit(128 + e.signal_number)
if jax.process_index() == 0:
    flat = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(result.params)[0]
    }
    flat["__devices__"] = np.asarray(jax.device_count())
    flat["__state_leaves__"] = np.asarray(json.dumps(state_leaves))
    flat["__log__"] = np.asarray("\n".join(log_lines))
    np.savez(args.out, **flat)
