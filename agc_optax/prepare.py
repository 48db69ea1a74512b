"""Command line: write an ImageFolder tree as ArrayRecord shards (``python -m agc_optax.prepare``).

ArrayRecord shards give fast random access on network file systems, where opening 1.28 million
small files is the bottleneck. The shards hold the original encoded bytes (nothing is re-encoded)
and the labels, with ``class_names.json`` beside them; train with ``--dataset arrayrecord
--data-dir OUT``. Preparing the same input twice gives identical shards.

Example::

    agc-prepare --input ~/data/imagenet --output ~/data/imagenet_ar
"""

from __future__ import annotations

import argparse
import sys
import warnings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="agc-prepare",
        description="Write an ImageFolder tree (DIR/train/<class>/*, DIR/val/<class>/*) as "
        "ArrayRecord shards for `agc-train --dataset arrayrecord`.",
    )
    p.add_argument("--input", required=True, help="the ImageFolder directory")
    p.add_argument("--output", required=True, help="directory for the shards (created)")
    p.add_argument(
        "--records-per-shard", type=int, default=1024, help="images per shard (default 1024)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``agc-prepare``; returns the exit status."""
    args = _parser().parse_args(argv)
    from agc_optax.training.data import CorruptImageWarning, DataError, write_array_records

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"agc-prepare: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", CorruptImageWarning)
        warnings.showwarning = show
        try:
            counts = write_array_records(
                args.input,
                args.output,
                records_per_shard=args.records_per_shard,
                progress=not args.no_progress,
            )
        except DataError as e:
            print(f"agc-prepare: error: {e}", file=sys.stderr)
            return 2
    written = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "skipped")
    print(f"agc-prepare: wrote {written} images to {args.output}; skipped {counts['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
