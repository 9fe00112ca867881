"""Silo sampling at scale (``fraction-train``, ``fraction-evaluate``): 40 silos of scikit-learn's digits answer
through the real ClientApp in this process (``tests/inprocess.py``). The samples are drawn from the run's
seed by silo name, so two runs whose nodes have other ids (as every Flower run's do) train the same silos
and end on the same model; the silos outside the evaluation sample train without scoring the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from client import site
from hashing.config import Config
from hashing.errors import ConfigError
from hashing.federated import protocol as P
from hashing.silos import make_silos
from server.federation import Federation, sample_silos
from server.link import unpack_content
from simulations.report import render_report

from .inprocess import Grid

N = 40
BASE = dict(data="digits", n_images=0, partitioner="iid", num_silos=N, seed=0, bits=16, size=32, views=2,
            batch_size=32, num_server_rounds=3, min_train_nodes=2, supervised=False, client_threads=1,
            round_timeout=60, fraction_train=0.1, fraction_evaluate=0.2, query_frac=0.2)


@pytest.fixture(scope="module")
def cfg(cache_dir, digits):
    c = Config(**BASE, cache_dir=str(cache_dir))
    for s in make_silos(digits, c):
        site.silo_features(c, s)
    return c


def _run(cfg, tmp_path, name: str, first_id: int, step: int):
    """A whole federation whose nodes have ids first_id, first_id + step, ... (partition i on the i-th)."""
    nodes = {first_id + step * i: {"partition-id": i, "num-partitions": N} for i in range(N)}
    grid = Grid(nodes)
    fed = Federation(grid, cfg.replace(out_dir=str(tmp_path / name)))
    fed.run()
    silo = {n: f"silo-{c['partition-id']}" for n, c in nodes.items()}
    return fed, grid, silo


def test_sampled_silos_are_the_seeds_not_the_node_ids_and_the_report_says_so(cfg, tmp_path):
    a, grid, silo = _run(cfg, tmp_path, "a", 1001, 1)
    b, _, _ = _run(cfg, tmp_path, "b", 900_000, -7)  # other ids, in another order
    # fraction-train 0.1 of 40 silos: 4 train each round, the same silos in both runs, not the same every round
    assert [r["clients_sent"] for r in a.history] == [4, 4, 4] and all(r["clients_connected"] == N for r in a.history)
    trained = [sorted(r["trained"]) for r in a.history]
    assert trained == [sorted(r["trained"]) for r in b.history] and len({tuple(t) for t in trained}) > 1
    for name in ("params", "buffers"):
        x, y = getattr(a.model, name), getattr(b.model, name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    # fraction-evaluate 0.2: 8 silos scored each round's model (the final scores: every silo)
    for r in a.history[:-1]:
        assert r["evaluated"] == len(r["map"]) == 8 and r["evaluated_of"] == N
        assert r["mean_map"] == pytest.approx(np.mean(list(r["map"].values())))
    assert a.history[-1]["evaluated"] == len(a.history[-1]["map"]) == N
    assert [sorted(r["map"]) for r in a.history] == [sorted(r["map"]) for r in b.history]
    # the silos that trained outside the evaluation sample sent no score (they did not compute one)
    for node, kind, content in grid.received:
        if kind == P.MSG_TRAIN:
            unpack_content(content)
    train = [(silo[node], content) for node, kind, content in grid.received if kind == P.MSG_TRAIN]
    scored = {s for r in a.history[:-1] for s in r["map"]}
    assert any(P.MAP not in c[P.METRICS] for s, c in train)
    assert all(s in scored for s, c in train if P.MAP in c[P.METRICS])
    # the report's rounds table says how many of how many
    text = render_report({"rounds": a.history, "final": {}})
    assert "| silos scored |" in text and "8 of 40" in text and "4 of 40 sampled: 4 ok" in text


def test_the_sample_is_the_seeds_and_whole_when_k_reaches_the_silos():
    names = {i: f"silo-{i}" for i in range(10)}
    one = sample_silos(names, 3, 0, 1, "train")
    assert len(one) == 3 and one == sample_silos(dict(reversed(names.items())), 3, 0, 1, "train")
    assert one != sample_silos(names, 3, 0, 1, "evaluate") or one != sample_silos(names, 3, 0, 2, "train")
    assert sample_silos(names, 10, 0, 1, "train") == sample_silos(names, 99, 5, 3, "x") == sorted(
        names, key=lambda n: names[n])
    with pytest.raises(ConfigError, match="fraction-evaluate"):
        Config(fraction_evaluate=0.0).check()
