"""The notebooks execute top to bottom in small mode, write their figures and print their results.

Each notebook runs in a fresh kernel started with this interpreter (``sys.executable``), through a
kernelspec written to a temporary Jupyter path, so the test uses whatever virtualenv runs pytest
(``.venv`` locally, ``.venv-ci`` in CI). ``AGC_NOTEBOOK_SMALL=1`` shrinks every notebook to a smoke
run, and ``AGC_NOTEBOOK_FIGURES`` sends its figures to a temporary directory, so the committed
full-size figures in ``notebooks/figures`` are never overwritten.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")
KERNEL = "agc-optax-tests"

# notebook -> (figures it writes, strings its outputs must contain)
EXPECTED = {
    "01_agc_quickstart.ipynb": (
        ["01_clip_fraction.png"],
        ["embed/embedding", "clipped units", "test accuracy", "a unit exceeds"],
    ),
    "02_signal_propagation.ipynb": (
        ["02_spp_three_models.png", "02_spp_alpha.png"],
        ["Unscaled ResNet", "designed final variance", "WS conv(gamma * relu(h))"],
    ),
    "03_large_batch_agc.ipynb": (
        ["03_accuracy_vs_batch.png", "03_loss_curves.png"],
        ["test accuracy", "no clipping", "AGC 0.01", "sweep:"],
    ),
}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for this interpreter, on a private Jupyter path."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "agc_optax tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(root)


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(str(out["data"].get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_in_small_mode(name, kernel_env, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    monkeypatch.setenv("JUPYTER_PATH", kernel_env)
    monkeypatch.setenv("AGC_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("AGC_NOTEBOOK_FIGURES", str(figures))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures

    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    errors = [
        out
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    want_figures, want_text = EXPECTED[name]
    for figure in want_figures:
        path = figures / figure
        assert path.is_file() and path.stat().st_size > 1000, f"{name} did not write {figure}"
    text = _outputs_text(nb)
    for needle in want_text:
        assert needle in text, f"{name}: output lacks {needle!r}"
    images = [
        out
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{name} displayed no figure"


def test_committed_notebooks_are_executed_and_figures_small():
    """The committed notebooks carry their full-size outputs; their figures stay small."""
    for name, (figures, _) in EXPECTED.items():
        nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), f"{name} has unexecuted cells"
        assert not any(
            out.get("output_type") == "error" for c in code for out in c.get("outputs", [])
        ), f"{name} was committed with an error"
        for figure in figures:
            path = os.path.join(NOTEBOOKS, "figures", figure)
            assert os.path.isfile(path), f"missing committed figure {figure}"
            assert os.path.getsize(path) < 200_000, f"{figure} is over 200 KB"
