"""Search across silos by code only: the merge equals one brute-force search over the union of every
silo's codes (hypothesis, with the many ties of short codes), a silo's own top-k breaks ties by content id
as the merge does, the search message survives Flower's records and refuses what is malformed, a real
site's ClientApp answers from its own index (sharing labels only when its node config says so), and
the cross-silo mAP matches scikit-learn's average precision."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from hashing import retrieval
from hashing.catalogue import fmt_id
from hashing.codes import hamming
from hashing.errors import ConfigError, FedhashError
from hashing.federated import protocol as P
from hashing.federated.search import SiloHits, answer_line, brute_force, merge, read_answer
from hashing.index import SiloIndex
from hashing.metrics import map_of_ranked

from .conftest import train_digits, write_png


def _silos(rng, sizes, nbytes):
    out = {}
    for i, n in enumerate(sizes):
        ids = rng.choice(2**40, size=n, replace=False).astype(np.int64)
        out[f"silo-{i}"] = (ids, rng.integers(0, 256, (n, nbytes), dtype=np.uint8))
    return out


def _reference(silos, query, k):
    """Every (distance, silo, id) of the union, sorted: the top-k as a list of triples per query."""
    rows = []
    for q in query:
        cand = []
        for name, (ids, codes) in silos.items():
            d = hamming(q[None], codes)[0] if len(ids) else []
            cand += [(int(x), name, int(i)) for x, i in zip(d, ids)]
        rows.append(sorted(cand)[:k])
    return rows


def _triples(m):
    return [[(h["distance"], h["silo"], int(h["id"], 16)) for h in m.hits(q)] for q in range(m.ids.shape[0])]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       k=st.integers(1, 60), nbytes=st.sampled_from([1, 2]))
def test_merge_of_silo_replies_equals_brute_force_over_the_union(seed, sizes, k, nbytes):
    rng = np.random.default_rng(seed)
    silos = _silos(rng, sizes, nbytes)
    query = rng.integers(0, 256, (3, nbytes), dtype=np.uint8)
    got = brute_force(silos, query, k)  # per-silo top-k (ties by id), then the merge
    assert _triples(got) == _reference(silos, query, k)
    # the merge of a FAISS index per silo, asked with ties by content id, is the same
    replies = []
    for name, (ids, codes) in silos.items():
        idx = SiloIndex(nbytes * 8, "v1")
        idx.add(codes, ids, model_version="v1")
        D, I = idx.search(query, k, model_version="v1", ties="id")
        replies.append(SiloHits(name, I, D))
    assert _triples(merge(replies, k)) == _reference(silos, query, k)


def test_silo_index_ties_by_id_keeps_the_first_k_of_all_equal_codes():
    rng = np.random.default_rng(0)
    codes = np.repeat(rng.integers(0, 256, (4, 1), dtype=np.uint8), 500, axis=0)  # 4 codes, 500 copies each
    ids = rng.permutation(2000).astype(np.int64) + 10
    idx = SiloIndex(8, "v1")
    idx.add(codes, ids, model_version="v1")
    D, I = idx.search(codes[:1], 700, model_version="v1", ties="id")
    ref_d, ref_i = retrieval.brute_force(codes, ids, codes[:1], 700)  # ties by id
    assert np.array_equal(D, ref_d) and np.array_equal(I, ref_i)
    D, I = idx.search(codes[:1], 3000, model_version="v1", ties="id")  # more than the index holds: padded
    assert (I[0, 2000:] == -1).all() and np.array_equal(I[0, :2000], retrieval.brute_force(codes, ids, codes[:1], 2000)[1][0])
    with pytest.raises(ConfigError, match="ties"):
        idx.search(codes[:1], 3, model_version="v1", ties="random")


def test_merge_keeps_shared_labels_with_their_hits_and_refuses_one_silo_twice():
    a = SiloHits("b-site", np.array([[5, 6]]), np.array([[1, 3]], np.int32), [["cat", "dog"]])
    b = SiloHits("a-site", np.array([[7, -1]]), np.array([[3, P_PAD]], np.int32))
    m = merge([a, b], 4)
    assert [(h["silo"], h["distance"], h.get("labels")) for h in m.hits(0)] == \
        [("b-site", 1, ["cat"]), ("a-site", 3, None), ("b-site", 3, ["dog"])]
    with pytest.raises(ValueError, match="same silo"):
        merge([a, a], 2)


P_PAD = np.iinfo(np.int32).max


def test_search_message_through_flower_records_and_its_refusals():
    codes = np.arange(24, dtype=np.uint8).reshape(3, 8)
    rec = ArrayRecord({P.SEARCH_CODES: Array(codes)})
    cfg = ConfigRecord(P.search_config(20, "abc"))
    req = P.read_search_request({k: a.numpy() for k, a in rec.items()}, cfg)
    assert np.array_equal(req.codes, codes) and req.k == 20 and req.model_version == "abc" and req.fedconfig == ""
    for codes_, k, v, what in [(codes.astype(np.int64), 5, "abc", "packed codes"), (codes, 0, "abc", "k is 0"),
                               (codes, 5, "", "no model version"), (codes, 2.5, "abc", "whole number"),
                               (np.zeros((P.MAX_SEARCH_QUERIES + 1, 8), np.uint8), 5, "abc", "split the batch")]:
        with pytest.raises(ValueError, match=what):
            P.check_search(codes_, k, v)
    with pytest.raises(ValueError, match="same fedhash"):
        P.read_search_request({}, cfg)
    hits, shared = P.search_reply(np.array([[1, 2]]), np.array([[0, 4]]), [["x", "y;z"]])
    ids, dist, labels = P.read_search_reply(hits, ConfigRecord(shared), 1, 2)
    assert ids.dtype == np.int64 and dist.dtype == np.int32 and labels == [["x", "y;z"]]
    with pytest.raises(ValueError, match="expected int64"):
        P.read_search_reply(hits, None, 2, 2)
    # a search run's config: codes as base64, refused when garbled
    job = P.search_job(codes, 7, "abc")
    got, rest = P.split_search_job(job | {"bits": 64})
    assert np.array_equal(got.request.codes, codes) and got.request.k == 7 and got.repeat == 1 and rest == {"bits": 64}
    with pytest.raises(ValueError, match="repeat"):
        P.split_search_job(job | {P.JOB_REPEAT: 0})
    with pytest.raises(ValueError, match="not base64"):
        P.split_search_job(job | {P.JOB_CODES: "***"})
    with pytest.raises(ValueError, match="whole 64-bit codes"):
        P.split_search_job(job | {P.JOB_CODES: "AAAA"})


def test_answer_line_round_trips_through_a_log():
    ans = {"model_version": "v", "queries": [[{"rank": 1, "silo": "a", "id": fmt_id(3), "distance": 2}]] * 50}
    log = f"INFO : starting\n{answer_line(ans)}\nINFO : done\n"
    assert read_answer(log) == ans and len(answer_line(ans).splitlines()) == 1
    assert read_answer("nothing here\n") is None


def test_map_of_ranked_is_sklearns_average_precision_over_a_complete_ranking():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    rel = rng.random((20, 50)) < 0.3
    rel[0] = False
    scores = -np.arange(50, dtype=float)  # ranked order: the first is the best
    ref = np.mean([average_precision_score(r, scores) if r.any() else 0.0 for r in rel])
    assert map_of_ranked(rel) == pytest.approx(ref, abs=1e-12)


# --------------------------------------------------------------------------- a real site's ClientApp


@pytest.fixture(scope="module")
def site_index(tmp_path_factory, cache_dir):
    """A site's index as a federation leaves it: <out-dir>/silos/<silo>, built from digits images."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("site")
    run = train_digits(root / "runs", cache_dir, bits=16, epochs=1)
    digits = load_digits()
    data = root / "data"
    for i in range(60):
        cls = data / f"digit-{digits.target[i]}"
        cls.mkdir(parents=True, exist_ok=True)
        img = (digits.images[i] * 255 / 16).astype(np.uint8)
        write_png(cls / f"{i}.png", np.stack([img] * 3, -1))
    out = root / "out"
    idx, _ = retrieval.build(out / "silos" / "hospital-a", run, str(data), cache_dir=cache_dir)
    idx.close()
    return out, data, run


def _search_msg(codes, k, version):
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:  # Message objects outside a Flower run (as tests/test_client_dp.py)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    content = RecordDict({P.QUERIES: ArrayRecord({P.SEARCH_CODES: Array(np.asarray(codes, np.uint8))}),
                          P.CONFIG: ConfigRecord(P.search_config(k, version))})
    return Message(content=content, dst_node_id=7, message_type=P.MSG_SEARCH)


def _ctx(node_config):
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_real_site_answers_from_its_own_index_and_shares_labels_only_when_its_node_config_says(site_index):
    from client import client_app, site

    out, data, _ = site_index
    folder = out / "silos" / "hospital-a"
    with retrieval.open_index(folder) as idx:
        version = idx.model_version
        ids, codes = idx.cat.codes(version)
    node = {"data": str(data), "silo": "hospital-a", "out-dir": str(out)}
    query = codes[:4]
    reply = client_app.search(_search_msg(query, 9, version), _ctx(node))
    got_ids, got_d, labels = P.read_search_reply(reply.content[P.HITS], reply.content.config_records.get(P.SHARED), 4, 9)
    ref_d, ref_i = retrieval.brute_force(codes, ids, query, 9)  # ties by content id
    assert np.array_equal(got_d, ref_d) and np.array_equal(got_ids, ref_i)
    assert labels is None and P.SHARED not in reply.content.config_records  # default: ids and distances only
    assert dict(reply.content[P.SILO]) == {P.SILO_NAME: "hospital-a"}
    assert reply.content[P.METRICS][P.N_DB] == len(ids)

    reply = client_app.search(_search_msg(query, 9, version), _ctx(node | {"search-share": "labels"}))
    _, _, labels = P.read_search_reply(reply.content[P.HITS], reply.content[P.SHARED], 4, 9)
    with retrieval.open_index(folder) as idx:
        assert labels[0][0] == ";".join(idx.item(int(got_ids[0, 0])).labels) and labels[0][0].startswith("digit-")

    # what a site refuses, each in one line naming the fix
    with pytest.raises(FedhashError, match="upgrade the silo's index"):
        client_app.search(_search_msg(query, 9, "0" * 16), _ctx(node))
    with pytest.raises(ConfigError, match="names no out-dir"):
        client_app.search(_search_msg(query, 9, version), _ctx({"data": str(data), "silo": "hospital-a"}))
    with pytest.raises(ConfigError, match="can share: labels"):
        client_app.search(_search_msg(query, 9, version), _ctx(node | {"search-share": "paths"}))
    with pytest.raises(FedhashError, match="holds no index"):
        client_app.search(_search_msg(query, 9, version), _ctx(node | {"silo": "hospital-z"}))
    bad = _search_msg(query, 9, version)
    del bad.content.config_records[P.CONFIG]
    with pytest.raises(FedhashError, match="same fedhash"):
        client_app.search(bad, _ctx(node))
    # the index folder comes from the node config, never from the message
    assert site.search_folder(node, P.SearchRequest(query, 9, version, json.dumps({"out_dir": "/elsewhere"})))[1] == folder


def test_cli_names_one_place_to_search(site_index, capsys):
    from simulations.cli import main

    out, data, run = site_index
    png = next(Path(data).rglob("*.png"))
    assert main(["search", "--image", str(png)]) == 2
    assert "name one place to search" in capsys.readouterr().err
    assert main(["search", "--federation", "x", "--image", str(png)]) == 2
    assert "--federation needs --model" in capsys.readouterr().err
    assert main(["search", "--index", str(out / "silos" / "hospital-a"), "--model", str(run), "--image", str(png)]) == 2
    assert "for --federation and --run" in capsys.readouterr().err
