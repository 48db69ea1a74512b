"""Smoke test: every benchmark still runs end to end at tiny sizes (numbers are not checked)."""

import pytest

from benchmarks import run


@pytest.mark.slow
def test_every_benchmark_runs_small(capsys):
    run.main(["--small", "--repeats", "1"])
    out = capsys.readouterr().out
    for title in (
        "AGC transform",
        "Fused optimizer step",
        "AGC's share",
        "BatchNorm ResNet-50",
        "compile time",
    ):
        assert title in out
    assert "nan" not in out.lower()
