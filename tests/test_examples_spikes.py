"""Smoke test of examples/spikes.py: a short run of every method writes the figure and the table."""

import importlib.util
import pathlib
import sys

import numpy as np

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "spikes.py"


def _load():
    spec = importlib.util.spec_from_file_location("spikes_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_run_writes_figure_and_table(tmp_path, capsys):
    spikes = _load()
    results = spikes.main(["--steps", "90", "--seeds", "0", "--out", str(tmp_path)])
    assert (tmp_path / "spikes.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert out.startswith("| method | recovery @30 | recovery @50-52 | recovery @72 |")
    assert set(results) == {"none", "global norm 1.0", "AGC 0.05", "AdaGC", "ZClip"}
    for res in results.values():
        assert res["loss"].shape == (2, 1, 91) and np.all(np.isfinite(res["loss"]))
    # Unclipped, a x100 spike shows in the loss; the clean run of "none" never clips.
    none = results["none"]
    assert none["loss"][1, 0, 30:40].max() > 2 * none["loss"][1, 0, 29]
    assert not none["clipped"].any()


def test_recovery_definition():
    spikes = _load()
    loss = np.array([5.0, 4.0, 3.0, 9.0, 6.0, 3.05, 2.9, 8.0, 8.0, 8.0])
    # Spike at update 3: pre-spike loss L_2 = 3.0; L_5 = 3.05 <= 1.02 * 3.0 two updates later.
    # Spike at update 7: pre-spike L_6 = 2.9; never back by the end.
    assert spikes.recovery(loss, [(3, 3), (7, 7)]) == [2, -1]
