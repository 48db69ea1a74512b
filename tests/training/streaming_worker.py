"""One of two processes reading a streamed ImageFolder as the trainer does; writes what it read.

Usage: python streaming_worker.py OUT.json DATA_DIR HOST:PORT PROCESS_ID

Joins a two-process JAX run (``jax.distributed``, one CPU device each), then, like the trainer:
reads one epoch of this process's train batches (global batch 4) and places each as one global
array, and sums the validation split's masks and matches across the processes. Every image is
one flat colour whose red channel encodes the file (``16 + 20 * id``) and whose green channel
encodes the class, so the record and its label can be read back from the pixels after the
crop, flip and resize.
"""

from __future__ import annotations

import json
import os
import sys

out_path, data_dir, coordinator, process_id = sys.argv[1:5]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from agc_optax.training import data as data_lib  # noqa: E402
from agc_optax.training import parallel  # noqa: E402

parallel.initialize_distributed(coordinator, 2, int(process_id))
CLASS_GREEN = jnp.array([60.0, 140.0, 220.0])


def record_ids(images):  # the file id of every row, from its mean red value
    return jnp.round((images[..., 0].astype(jnp.float32).mean((1, 2)) - 16.0) / 20.0)


def colour_class(images):  # the class a perfect reader of the green channel would say
    green = images[..., 1].astype(jnp.float32).mean((1, 2))
    return jnp.argmin(jnp.abs(green[:, None] - CLASS_GREEN), -1)


dataset = data_lib.StreamingDataset("imagefolder", data_dir, image_size=8, workers=0)
index, count = jax.process_index(), jax.process_count()
placement = parallel.make_placement("jit")
global_ids = placement.compile(record_ids)  # results replicated: every process sees them all
batches = dataset.train_batches(4, seed=0, process_index=index, process_count=count)
local, global_view = [], []
for step in range(batches.steps_per_epoch):
    images, labels = batches.batch(step)
    assert np.array_equal(labels, np.asarray(colour_class(images))), "label travelled apart"
    local.append(np.asarray(record_ids(images)).astype(int).tolist())
    global_view.append(np.asarray(global_ids(placement.shard(images))).astype(int).tolist())
batches.close()


def eval_sums(images, labels, mask):
    return {
        "count": jnp.sum(mask),
        "correct": jnp.sum(mask * (colour_class(images) == labels)),
        "id_sum": jnp.sum(mask * record_ids(images)),
    }


eval_step = placement.compile(eval_sums)
totals = {"count": 0.0, "correct": 0.0, "id_sum": 0.0}
rows = 0
for batch in dataset.eval_batches(4, process_index=index, process_count=count):
    rows += len(batch[0])
    for k, v in placement.to_host(eval_step(*placement.shard(batch))).items():
        totals[k] += float(v)
with open(out_path, "w") as f:
    json.dump({"local": local, "global": global_view, "eval": totals, "eval_rows": rows}, f)
