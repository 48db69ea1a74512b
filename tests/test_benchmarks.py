"""Smoke test: every benchmark still runs end to end at tiny sizes (numbers are not checked)."""

import pytest

from benchmarks import run

TITLES = {
    "agc_transform": "AGC transform",
    "fused_step": "Fused optimizer step",
    "pallas_step": "skipped",  # no GPU here: the benchmark must say so and not fail
    "agc_share": "AGC's share",
    "nf_vs_bn": "BatchNorm ResNet-50",
    "vs_bare": "vs the bare step",
    "compile_time": "compile time",
    "kernel_sharing": "Kernel sharing",
    "persistent_cache": "persistent compilation cache",
    "scan_blocks": "scan_blocks vs unrolled",
    "pointwise_conv_grads": "Gradient of one 1x1 conv",
    "input_pipeline": "Input pipeline",
}


def test_every_benchmark_has_a_smoke_test():
    assert set(TITLES) == set(run.BENCHMARKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TITLES))
def test_benchmark_runs_small(name, capsys):
    run.main(["--small", "--repeats", "1", "--only", name])
    out = capsys.readouterr().out
    assert TITLES[name] in out
    assert "nan" not in out.lower()
