"""The benchmark suite's one entry point: ``python -m benchmarks [--small] [--only NAME ...]``.

Prints one markdown table per benchmark, each measured side by side in one run (interleaved
repetitions, warm-up excluded), plus XLA's bytes accessed where it applies. Paste the output into
``benchmarks/RESULTS.md`` with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime

from benchmarks import (
    agc_transform,
    common,
    compile_time,
    fused_step,
    input_pipeline,
    pallas_step,
    scan_blocks,
    train_step,
)

BENCHMARKS = {
    "agc_transform": agc_transform.run,
    "fused_step": fused_step.run,
    "pallas_step": pallas_step.run,  # GPU/TPU only; prints a skip line on CPU
    "agc_share": train_step.run_agc_share,
    "nf_vs_bn": train_step.run_nf_vs_bn,
    "vs_bare": train_step.run_vs_bare,
    "compile_time": compile_time.run,
    "kernel_sharing": compile_time.run_kernel_sharing,
    "persistent_cache": compile_time.run_persistent_cache,
    "scan_blocks": scan_blocks.run,  # F0/F3/F6 train steps: tens of minutes on 2 cores
    "pointwise_conv_grads": scan_blocks.run_pointwise_conv_grads,
    "input_pipeline": input_pipeline.run,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes: a smoke test, not data")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per contender")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args(argv)
    print(f"# agc_optax benchmarks, {datetime.date.today()}, {common.machine()}\n")
    for name in args.only or BENCHMARKS:
        kwargs = {"small": args.small}
        if args.repeats is not None:
            kwargs["repeats"] = args.repeats
        print(BENCHMARKS[name](**kwargs), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
