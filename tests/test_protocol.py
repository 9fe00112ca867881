"""The message protocol (hashing/federated/protocol.py): one definition that both sides use. What it packs
fits Flower's records, what it unpacks reads Flower's records, and neither the ClientApp nor the
ServerApp spells a key of its own."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from hashing.config import Config
from hashing.federated import protocol as P

ROOT = Path(__file__).resolve().parents[1]


def test_message_types_and_the_clientapp_actions():
    assert P.MSG_TRAIN == "train" and P.MSG_EVALUATE == "evaluate"  # Flower's own message types
    assert [P.query_action(t) for t in (P.MSG_STATS, P.MSG_MOMENTS, P.MSG_INDEX)] == ["stats", "moments", "index"]
    with pytest.raises(ValueError):
        P.query_action(P.MSG_TRAIN)


def test_round_config_through_a_flower_record():
    cfg = Config(bits=32)
    rec = ConfigRecord(P.round_config(cfg.to_json(), 3, evaluate=True, model_version="abc",
                                      privacy={"unit": "none", "epsilon": 1.5}))
    rec[P.PROXIMAL_MU] = 0.1  # what Flower's FedProx adds
    got = P.read_round_config(rec)
    assert Config.from_json(got.fedconfig) == cfg and got.server_round == 3 and got.evaluate
    assert got.model_version == "abc" and got.privacy == {"unit": "none", "epsilon": 1.5} and got.proximal_mu == 0.1
    bare = P.read_round_config(ConfigRecord(P.round_config(cfg.to_json(), 0)))
    assert not bare.evaluate and bare.proximal_mu == 0.0 and bare.privacy is None
    with pytest.raises(ValueError, match="same fedhash"):
        P.read_round_config(ConfigRecord({"server-round": 1}))


def test_globals_carry_buffers_and_prototypes_apart():
    buffers = {"net.3.running_mean": torch.zeros(4), "net.3.running_var": torch.ones(4)}
    state = P.globals_state(buffers, torch.full((2, 4), 0.5))
    rec = ArrayRecord(state)
    b, protos = P.split_globals(rec.to_torch_state_dict())
    assert list(b) == list(buffers) and protos.shape == (2, 4)
    assert P.split_globals(ArrayRecord(P.globals_state(buffers, None)).to_torch_state_dict())[1] is None


def test_reports_through_flower_records():
    m = P.train_metrics(num_examples=10, loss=0.5, bit_balance=0.9, seconds=1.0, bytes_down=4, bytes_up=2,
                        evaluation=(0.7, 0.8))
    r = P.read_train_metrics(MetricRecord(m))
    assert (r.num_examples, r.loss, r.bytes_up, r.evaluation) == (10, 0.5, 2, (0.7, 0.8))
    assert P.read_train_metrics(MetricRecord(P.train_metrics(num_examples=1, loss=0, bit_balance=0, seconds=0,
                                                             bytes_down=0, bytes_up=0))).evaluation is None
    hist = [(1.2, 1.0, 1), (1.2, 0.05, 20)]
    m |= P.releases(hist, 7.9)
    assert P.read_releases(MetricRecord(m)) == [[1.2, 1.0, 1], [1.2, 0.05, 20]]
    assert P.read_releases(MetricRecord({P.NUM_EXAMPLES: 1})) is None
    ev = MetricRecord(P.evaluation(0.6, 0.5, num_examples=3, n_db=30))
    assert P.read_evaluation(ev) == (0.6, 0.5) and ev[P.N_DB] == 30
    silo = ConfigRecord(P.silo_info("silo-1", "ab" * 8, "none", index="/x/index.faiss"))
    assert P.read_silo(silo, 5)[P.SILO_INDEX] == "/x/index.faiss" and P.read_silo(None, 5) == {P.SILO_NAME: "node-5"}


# the protocol's keys that can mean nothing else: every metric and config key (they hold a "-") and message
# type (a "."), and the two array records (plain words such as "config" or "train" also name files and phases)
_KEYS = {v for k in dir(P) if k.isupper() and isinstance(v := getattr(P, k), str)
         and ("-" in v or "." in v or v in (P.ARRAYS, P.GLOBALS))}


def _strings(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


@pytest.mark.parametrize("path", sorted((ROOT / "client").glob("*.py")) + sorted((ROOT / "server").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_client_and_server_spell_no_protocol_key(path):
    assert len(_KEYS) > 15 and {"num-examples", "query.stats", "arrays"} <= _KEYS  # the check is not vacuous
    spelled = _strings(path) & _KEYS
    assert not spelled, f"{path.name} spells protocol keys {sorted(spelled)}: use hashing.federated.protocol"


def test_the_moments_record_is_what_the_dp_release_returns():
    from hashing.privacy.release import release_moments

    got = release_moments(np.eye(3)[:2] + 0.1, 0.0, np.random.default_rng(0))
    assert set(got) == {"count", "sum", "outer"}
    rec = ArrayRecord({k: torch.from_numpy(v) for k, v in got.items()})
    assert set(rec.to_torch_state_dict()) == set(got)


def test_packed_records_are_lossless_and_malformed_ones_refused():
    from collections import OrderedDict

    from flwr.app import Array, ArrayRecord, RecordDict

    from client.mods import pack_content as client_pack, unpack_content as client_unpack
    from hashing.hashers import create_hasher
    from server.link import pack_content as server_pack, unpack_content as server_unpack

    params, buffers = create_hasher("probe", feature_dim=24, bits=16).state()
    state = OrderedDict(list(params.items()) + list(buffers.items()))  # float32 weights, an int64 counter
    rec = ArrayRecord(state)
    content = RecordDict({P.ARRAYS: rec, P.QUERIES: ArrayRecord({P.SEARCH_CODES: Array(np.zeros((2, 2), np.uint8))})})
    for pack, unpack in ((server_pack, client_unpack), (client_pack, server_unpack)):
        c = RecordDict({k: v for k, v in content.items()})
        pack(c)
        assert list(c[P.ARRAYS].keys()) == [P.PACKED] and list(c[P.QUERIES].keys()) == [P.SEARCH_CODES]
        unpack(c)
        back = c[P.ARRAYS].to_torch_state_dict()
        assert list(back) == list(state)
        for k, v in state.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and bool((back[k] == v).all()), k
    blob = P.pack_arrays({"a": np.arange(4, dtype=np.float32)})
    for bad in (blob[:-1], np.concatenate([blob, blob[:1]]), blob.astype(np.int16), blob[:5]):
        with pytest.raises(ValueError, match="packed record"):
            P.unpack_arrays(bad)
