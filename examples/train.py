"""Train an NF-ResNet with AGC: the same as ``python -m agc_optax.train`` (``agc-train``).

python examples/train.py                      # the default run: digits, offline, on a CPU
python examples/train.py --preset smoke       # 20 steps of a tiny network: checks an install
python examples/train.py --help               # every flag
"""

import sys

from agc_optax.train import main

if __name__ == "__main__":
    sys.exit(main())
