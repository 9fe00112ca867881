"""The folder layering of DESIGN.md: hashing/ is a library of its own and never imports Flower."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_hashing_never_imports_flower_or_upper_layers():
    for f in sorted((ROOT / "hashing").glob("*.py")):
        # Opacus only in hashing/dp.py (the DP objective, DP-SGD and its accountant; no Flower there)
        banned = {"flwr", "flwr_datasets", "client", "server", "simulations"} | ({"opacus"} if f.name != "dp.py" else set())
        bad = _imports(f) & banned
        assert not bad, f"{f.name} imports {bad}"


def test_importing_hashing_loads_no_flower():
    code = "import sys, hashing, hashing.train, hashing.index, hashing.features; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
