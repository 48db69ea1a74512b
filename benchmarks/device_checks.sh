#!/usr/bin/env bash
# The accelerator checks issue 16 asks of a session that is lent a GPU, as one command of the
# device tool (about 9 minutes; the tool's machine has jax, flax, optax, chex and pytest):
#
#   run(command="bash benchmarks/device_checks.sh", timeout_s=570)
#
# Each step has its own time limit, so a slow one cannot eat the others' time; the logs land
# in $OUT (the tool brings them back) or in /tmp/device_checks elsewhere. Paste the tables into
# benchmarks/RESULTS.md with the card's name, and compare ratios only within one run. Written
# without a GPU at hand (2026-12-06): its first run on one is also its test.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/device_checks}"
mkdir -p "$out"
python=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  "$python" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee "$out/device.txt"

# 1. The Pallas kernels compiled for the device (interpret mode only on CPU so far).
timeout 200 "$python" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 |
  tee "$out/test_kernels.log"
# 2. The Pallas step against XLA, the optax chain and a copy, with and without the guard.
timeout 120 "$python" -m benchmarks --repeats 20 --only pallas_step 2>&1 | tee "$out/pallas_step.md"
# 3. The library train step against the bare step (issue 16's table), F0 and NF-ResNet-50.
timeout 220 "$python" -m benchmarks --repeats 10 --only vs_bare 2>&1 | tee "$out/vs_bare.md"
