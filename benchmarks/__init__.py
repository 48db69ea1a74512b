"""agc_optax benchmarks: run by hand with `python -m benchmarks` (see RESULTS.md)."""
