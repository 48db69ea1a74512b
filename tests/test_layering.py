"""The package's layers: no import cycle, each layer imports only what is below it, Pallas only
when selected, and examples, benchmarks and notebooks use only the public API."""

from __future__ import annotations

import ast
import importlib
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "agc_optax"

#: Public modules and the names users may import from them (``__all__``, read at test time).
PUBLIC_MODULES = (
    "agc_optax",
    "agc_optax.models",
    "agc_optax.training",
    "agc_optax.training.data",
    "agc_optax.kernels",
    "agc_optax.experiments",
)
#: Command-line modules: their ``main`` is the entry point users run.
CLI_MODULES = ("agc_optax.train", "agc_optax.prepare", "agc_optax.evaluate")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Every agc_optax module ``tree`` imports, at module level or inside functions."""
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("agc_optax"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if not base.startswith("agc_optax"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out - {name}


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: _imported_modules(
            ast.parse(path.read_text()), name, path.name == "__init__.py", known
        )
        & known
        for name, path in modules.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "agc_optax.optimizers" in graph and "agc_optax.kernels" in graph["agc_optax.optimizers"]
    assert _find_cycle(graph) is None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        # The clipping core knows nothing of models or training.
        ("agc_optax.optimizers", ("agc_optax.models", "agc_optax.training")),
        ("agc_optax.adagc", ("agc_optax.models", "agc_optax.training")),
        ("agc_optax.zclip", ("agc_optax.models", "agc_optax.training")),
        # Kernels know nothing of the optimizers that select them.
        ("agc_optax.kernels._sgd_agc_pallas", ("agc_optax.optimizers", "agc_optax.clipping")),
        # Models know nothing of optax transforms or training.
        ("agc_optax.models", ("agc_optax.training", "agc_optax.optimizers", "agc_optax.kernels")),
    ],
)
def test_layers_import_only_what_is_below(layer, forbidden):
    reached = _reachable(_import_graph(), layer)
    bad = sorted(m for m in reached if m.startswith(forbidden))
    assert not bad, f"{layer} reaches {bad}"


def test_models_do_not_import_optax():
    for name, path in _modules().items():
        if name.startswith("agc_optax.models"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                assert not any(n.split(".")[0] == "optax" for n in names), name


def test_pallas_is_imported_only_when_selected():
    code = (
        "import sys\n"
        "import agc_optax, agc_optax.models\n"
        "assert 'jax.experimental.pallas' not in sys.modules, 'imported at import time'\n"
        "import jax.numpy as jnp\n"
        "p = {'k': jnp.ones((4, 4))}\n"
        "tx = agc_optax.sgd_agc(0.1)\n"
        "tx.update(p, tx.init(p), p)\n"
        "assert 'jax.experimental.pallas' not in sys.modules, 'imported by the XLA path'\n"
        "tx = agc_optax.sgd_agc(0.1, implementation='pallas')\n"
        "tx.update(p, tx.init(p), p)\n"
        "assert 'jax.experimental.pallas' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------- the public API


def _user_code() -> dict[str, str]:
    """The Python source of examples, benchmarks and notebooks' code cells, by file name."""
    sources = {}
    for folder in ("examples", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            sources[str(path.relative_to(ROOT))] = path.read_text()
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        code = [
            "".join(c["source"]) for c in cells if c["cell_type"] == "code"
        ]  # magics would not parse; the notebooks have none
        sources[str(path.relative_to(ROOT))] = "\n".join(code)
    return sources


def _public_names() -> dict[str, set[str]]:
    names = {m: set(importlib.import_module(m).__all__) for m in PUBLIC_MODULES}
    names.update({m: {"main"} for m in CLI_MODULES})
    # A public module is itself importable from its parent.
    for m in (*PUBLIC_MODULES, *CLI_MODULES):
        parent, _, child = m.rpartition(".")
        if parent in names:
            names[parent].add(child)
    return names


def _private_uses(source: str, public: dict[str, set[str]]) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("agc_optax"):
            if node.module not in public:
                bad.append(f"from {node.module} import ...")
                continue
            bad += [
                f"from {node.module} import {a.name}"
                for a in node.names
                if a.name not in public[node.module]
            ]
        elif isinstance(node, ast.Import):
            bad += [
                f"import {a.name}"
                for a in node.names
                if a.name.startswith("agc_optax") and a.name not in public
            ]
        elif isinstance(node, ast.Attribute):
            # agc_optax.<x>.<y>...: each step must be public.
            chain = []
            inner = node
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if not (isinstance(inner, ast.Name) and inner.id == "agc_optax"):
                continue
            module = "agc_optax"
            for attr in reversed(chain):
                if attr not in public.get(module, set()) and not attr.startswith("__"):
                    bad.append(f"{module}.{attr}")
                    break
                module = f"{module}.{attr}"
                if module not in public:
                    break
    return bad


def test_private_use_detector():
    public = {"agc_optax": {"sgd_agc", "models"}, "agc_optax.models": {"create_model"}}
    source = (
        "import agc_optax\n"
        "from agc_optax.models import create_model, nfnet\n"
        "from agc_optax._plan import build_plan\n"
        "agc_optax.sgd_agc(0.1)\n"
        "agc_optax.clipping.clip_leaves\n"
        "agc_optax.models.nf_resnet.block_schedule\n"
    )
    assert sorted(set(_private_uses(source, public))) == [
        "agc_optax.clipping",
        "agc_optax.models.nf_resnet",
        "from agc_optax._plan import ...",
        "from agc_optax.models import nfnet",
    ]


def test_examples_benchmarks_notebooks_use_only_the_public_api():
    public = _public_names()
    found = {name: _private_uses(src, public) for name, src in _user_code().items()}
    assert any(name.endswith(".ipynb") for name in found) and "examples/train.py" in found
    assert not {name: bad for name, bad in found.items() if bad}
