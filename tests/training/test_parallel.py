"""Data parallelism gives the same training as one device: jit over 8 devices, pmap, multi-process.

Each configuration runs in its own process because the CPU device count is fixed at JAX start-up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import numpy as np

from tests.multidevice import run_on_cpu_devices

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")
# Reduction order differs between layouts, so float32 results agree to rounding, not bits.
RTOL = 1e-5


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(tmp_path, name: str, *extra: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run(
        [sys.executable, WORKER, str(out), str(tmp_path / name), *extra],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def _max_rel_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    keys = sorted(k for k in a if not k.startswith("__"))
    assert keys == sorted(k for k in b if not k.startswith("__"))
    return max(float(np.max(np.abs(a[k] - b[k])) / (np.max(np.abs(a[k])) + 1e-12)) for k in keys)


def test_one_device_vs_eight_devices_jit_vs_pmap_vs_shard_params(tmp_path):
    one = _run(tmp_path, "one", "--devices", "1")
    eight = _run(tmp_path, "eight", "--devices", "8")
    pmap = _run(tmp_path, "pmap", "--devices", "8", "--parallel", "pmap")
    sharded = _run(tmp_path, "sharded", "--devices", "8", "--shard-params")
    assert int(one["__devices__"]) == 1 and int(eight["__devices__"]) == 8
    assert _max_rel_diff(one, eight) < RTOL
    assert _max_rel_diff(one, pmap) < RTOL
    # Same devices and batches as `eight`: only the order of float32 additions differs (the
    # gradients and AGC's unit norms summed per shard, then across shards).
    assert _max_rel_diff(eight, sharded) < RTOL
    _check_fsdp_layout(sharded)
    # The runs did train: parameters moved away from a fresh initialisation's scale.
    assert all(np.all(np.isfinite(v)) for k, v in one.items() if not k.startswith("__"))


# --shard-params: each state leaf is split along its largest dimension divisible by the 8 devices
# (ties: the last), else kept whole. The tiny model's leaves, worked out by hand from that rule.
_FSDP_SPLIT_AXIS = {
    (3, 3, 3, 8): 3,  # conv1 kernel (HWIO): only the 8 output channels divide
    (8,): 0,
    (3, 3, 8, 16): 3,  # conv2 kernel: 8 and 16 divide, 16 is larger
    (16,): 0,
    (16, 10): 0,  # head kernel: 16 divides, 10 does not
    (10,): None,  # head bias
    (): None,  # step and optimizer counters
}


def _check_fsdp_layout(run: dict[str, np.ndarray]) -> None:
    """The trained state (params, momentum, EMA, counters) is split as the rule says: each of
    the 8 devices holds 1/8 of a split leaf and a whole copy of the others, and the trainer's
    start-up line reports those bytes."""
    import json
    import re

    leaves = json.loads(str(run["__state_leaves__"]))
    num_params = sum(1 for k in run if not k.startswith("__"))
    assert len(leaves) >= 3 * num_params  # params, momentum, EMA (+ counters)
    per_device = np.zeros(8, np.int64)
    for shape, axes, nbytes, total in leaves:
        split_axis = _FSDP_SPLIT_AXIS[tuple(shape)]
        assert axes == ([] if split_axis is None else [split_axis]), shape
        assert nbytes == [total if split_axis is None else total // 8] * 8, shape
        per_device += nbytes
    whole = sum(total for *_, total in leaves)
    assert per_device[0] < whole / 4  # most of the state is split
    reported = re.search(r"state: ([0-9.]+) KiB per device \(split", str(run["__log__"]))
    assert reported and abs(float(reported.group(1)) - per_device[0] / 1024) < 0.006


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(argv_of: Callable[[int], list[str]], timeout: float) -> None:
    """Runs ``python argv_of(i)`` for processes 0 and 1 at once (they meet through
    ``jax.distributed``), kills both on a timeout, and asserts both exited 0."""
    procs = [
        subprocess.Popen(
            [sys.executable, *argv_of(i)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]


def test_two_processes_match_one_process(tmp_path):
    single = _run(tmp_path, "single", "--devices", "4")
    port = _free_port()
    run_dir = tmp_path / "multi"
    out = tmp_path / "multi.npz"
    _run_two_processes(
        lambda i: [
            WORKER,
            str(out),
            str(run_dir),
            "--devices",
            "2",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ],
        timeout=600,
    )
    multi = dict(np.load(out))
    assert int(multi["__devices__"]) == 4
    assert _max_rel_diff(single, multi) < RTOL


def _flat_colour_folder(root) -> tuple[int, int]:
    """``root/{train,val}/<class>/*.png``: 12 train and 7 val images, each one flat colour with
    red = 16 + 20 * (its id within the split) and green = its class (see streaming_worker.py)."""
    from PIL import Image

    greens = (60, 140, 220)
    splits = {"train": [0] * 4 + [1] * 4 + [2] * 4, "val": [0, 0, 0, 1, 1, 2, 2]}
    for split, classes in splits.items():
        for file_id, label in enumerate(classes):
            d = root / split / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            pixels = np.full(
                (12 + file_id, 20 - file_id, 3), (16 + 20 * file_id, greens[label], 128)
            )
            Image.fromarray(pixels.astype(np.uint8)).save(d / f"{file_id}.png")
    return len(splits["train"]), len(splits["val"])


def test_two_processes_stream_disjoint_train_shards_and_exact_eval_totals(tmp_path):
    num_train, num_val = _flat_colour_folder(tmp_path / "data")
    port = _free_port()
    worker = os.path.join(os.path.dirname(WORKER), "streaming_worker.py")
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    _run_two_processes(
        lambda i: [worker, str(outs[i]), str(tmp_path / "data"), f"127.0.0.1:{port}", str(i)],
        timeout=300,
    )
    first, second = (json.loads(out.read_text()) for out in outs)
    # An epoch is 12 // 4 = 3 steps of 2 rows per process: the two shards are disjoint, and
    # together they are every train image once.
    read = [sorted(sum(r["local"], [])) for r in (first, second)]
    assert not set(read[0]) & set(read[1])
    assert sorted(read[0] + read[1]) == list(range(num_train))
    # Each step's global batch is process 0's rows, then process 1's, on both processes.
    expected = [a + b for a, b in zip(first["local"], second["local"], strict=True)]
    assert first["global"] == second["global"] == expected
    # Eval: 7 images as 4 + 3 rows, each process 2 batches of 2, so process 1 pads one row;
    # the totals count each image once and never the padding, on every process.
    assert first["eval_rows"] == second["eval_rows"] == 4
    val_id_sum = num_val * (num_val - 1) / 2
    for r in (first, second):
        assert r["eval"] == {"count": num_val, "correct": num_val, "id_sum": val_id_sum}


def test_split_state_gets_its_gradients_split_alike_between_the_two_programs():
    # --shard-params with the two-program step: the gradients program hands over each
    # gradient split as its parameter is (a replicated hand-over would hold every gradient
    # whole on each device), and the update keeps the state's layout.
    out = run_on_cpu_devices(
        """
        import sys
        import numpy as np, optax
        from flax import nnx
        sys.path.insert(0, "tests/training")
        from tiny_model import TinyNet
        from agc_optax.training import PRESETS, build_optimizer, init_state, split_model
        from agc_optax.training import make_train_step
        from agc_optax.training.parallel import make_placement
        from agc_optax.training.step import compile_train_step

        placement = make_placement("jit", shard_params=True)
        split, params, stats = split_model(TinyNet(10, rngs=nnx.Rngs(0)))
        tx = build_optimizer(PRESETS["smoke"], optax.constant_schedule(0.1))
        state = placement.init(lambda: init_state(params, stats, tx))
        rng = np.random.default_rng(0)
        batch = placement.shard((rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
                                 np.arange(8, dtype=np.int32)))
        votes = placement.shard(np.zeros(8, np.int32))
        step = compile_train_step(placement, make_train_step(split, tx, seed=0))
        gradients, _ = step.compile(state, batch, votes)
        handed = gradients.output_shardings.grads
        for g, p in zip(jax.tree.leaves(handed), jax.tree.leaves(state.params), strict=True):
            assert g.is_equivalent_to(p.sharding, p.ndim), (g, p.sharding)
        layout = [p.sharding for p in jax.tree.leaves(state.params)]
        new, metrics = step(state, batch, votes)  # donates `state`
        for p, sharding in zip(jax.tree.leaves(new.params), layout, strict=True):
            assert p.sharding.is_equivalent_to(sharding, p.ndim)
        split_leaves = sum(not s.is_fully_replicated for s in layout)
        print(split_leaves, float(metrics["loss"]))
        """
    )
    split_leaves, loss = out.split()
    assert int(split_leaves) >= 3 and np.isfinite(float(loss))
