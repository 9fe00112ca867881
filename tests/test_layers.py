"""The folder layering of DESIGN.md, on the import graph of the product packages.

Every import counts, at the top of a module or inside a function: a lazy import that closes a cycle is
still a cycle. The rules: no cycles; ``hashing/`` never imports Flower (flwr-datasets only in
``hashing/silos.py``) nor the packages above it; Opacus only in ``hashing/privacy/``; the core of
``hashing/`` never imports ``hashing/federated/``; ``client/`` and ``server/`` never import each other
nor ``simulations/``."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hashing", "client", "server", "simulations")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            # "from hashing import plots" imports the module hashing.plots
            out |= {f"{target}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        # a module's own packages are initialised before it runs: an import of them is no edge
        ancestors = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        graph[mod] = {m for m in _imports(path, mod) if m in files and m != mod and m not in ancestors}
    return graph, {mod: _imports(path, mod) for mod, path in files.items()}


GRAPH, ALL_IMPORTS = _graph()


def _top(name: str) -> str:
    return name.split(".")[0]


def test_the_graph_covers_every_product_module():
    assert {"hashing.hashers", "hashing.train", "hashing.privacy.dpsgd", "hashing.federated.protocol",
            "client.client_app", "server.federation", "simulations.engine"} <= set(GRAPH)
    assert "hashing.hashers" in GRAPH["hashing.coder"]  # the graph sees real edges


def test_no_import_cycles():
    seen, on_path, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in on_path:
            cycles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for n in sorted(GRAPH[m]):
            visit(n)
        on_path.pop()

    for m in sorted(GRAPH):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("mod", sorted(m for m in ALL_IMPORTS if m.startswith("hashing")))
def test_hashing_layer(mod):
    tops = {_top(m) for m in ALL_IMPORTS[mod]}
    assert not tops & {"flwr", "client", "server", "simulations"}, f"{mod} imports {tops & {'flwr', 'client', 'server', 'simulations'}}"
    if mod != "hashing.silos":
        assert "flwr_datasets" not in tops, f"{mod} imports flwr-datasets (only hashing.silos may, lazily)"
    if not mod.startswith("hashing.privacy"):
        assert "opacus" not in tops, f"{mod} imports opacus (only hashing/privacy/ may)"
    if not mod.startswith("hashing.federated"):
        assert not any(m.startswith("hashing.federated") for m in ALL_IMPORTS[mod]), \
            f"{mod} (the core of hashing/) imports hashing.federated"


@pytest.mark.parametrize("mod", sorted(m for m in ALL_IMPORTS if _top(m) in ("client", "server")))
def test_client_and_server_share_only_hashing(mod):
    other = "server" if _top(mod) == "client" else "client"
    tops = {_top(m) for m in ALL_IMPORTS[mod]}
    assert other not in tops and "simulations" not in tops, f"{mod} imports {tops & {other, 'simulations'}}"
    assert "opacus" not in tops, f"{mod} imports opacus (only hashing/privacy/ may)"


def test_opacus_is_imported_somewhere_it_may_be():
    """The Opacus rule is not vacuous: the DP door does import it."""
    assert "opacus" in {_top(m) for m in ALL_IMPORTS["hashing.privacy.dpsgd"]}


def test_importing_hashing_loads_no_flower():
    code = ("import sys, hashing, hashing.train, hashing.index, hashing.features, hashing.silos, hashing.privacy.dpsgd; "
            "print('flwr' in sys.modules, 'flwr_datasets' in sys.modules, 'opacus' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False", "False"]
