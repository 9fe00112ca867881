"""The README's library example runs as printed (on a small slice: digits at 32 px instead of
Fashion-MNIST at 64), and a newcomer finds the main ideas in one hop from its map."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_library_example_runs(tmp_path, monkeypatch, cache_dir):
    (code,) = re.findall(r"## `hashing/` as a library.*?```python\n(.*?)```", README, flags=re.S)
    small = (code.replace('load_dataset("fashion-mnist")', 'load_dataset("digits")')
             .replace("n_train=10000", "n_train=600").replace("size=64", "size=32"))
    assert small != code and small.count("size=32") == 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDHASH_CACHE", str(cache_dir))
    env: dict = {}
    exec(compile(small, "README.md", "exec"), env)
    assert env["ids"].shape == (len(env["sp"].query), 10) and (env["ids"] >= 0).all()
    assert env["record"]["model_version"] == env["version"]
    assert (tmp_path / "silo.faiss").is_file() and (tmp_path / "head.pt").is_file()


def test_the_map_names_every_product_module_and_leads_to_the_main_ideas():
    listed = set(re.findall(r"^\| `((?:hashing|client|server|simulations)/[\w/]+\.py)` \|", README, flags=re.M))
    modules = {str(p.relative_to(ROOT)) for pkg in ("hashing", "client", "server", "simulations")
               for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py"}
    assert listed == modules, f"not in the map: {sorted(modules - listed)}; gone: {sorted(listed - modules)}"
    for idea, module in (("the CroVCA loss", "hashing/loss.py"), ("one federated round", "server/federation.py"),
                         ("searchable index on disk", "hashing/retrieval.py"), ("the DP objective", "hashing/privacy/objective.py")):
        assert re.search(rf"^\| `{re.escape(module)}` \| .*\*\*{idea}\*\*", README, flags=re.M | re.I), idea
