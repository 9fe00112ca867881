"""A real site obeys only its own node config: a malicious server's messages, sent through the whole
ClientApp (its mods included) as a SuperNode hands them over, cannot make a site write elsewhere, load
other weights, read other data, skip its privacy floor, or learn a site path from an error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hashing import retrieval
from hashing.backbones import backbone_identity
from hashing.config import Config
from hashing.errors import TrainingError
from hashing.federated import protocol as P

if TaskIdentity._run_id is None:  # Message objects outside a Flower run
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

SMALL = dict(bits=16, size=32, views=2, batch_size=32, local_epochs=1, num_server_rounds=2, client_threads=1)


def _pngs(root: Path, digits, classes=(0, 1, 2), per_class: int = 20) -> Path:
    from PIL import Image

    for c in classes:
        (root / f"digit-{c}").mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(digits.labels == c)[:per_class]:
            img = np.asarray(digits.images[i], dtype=np.float32)
            Image.fromarray((255 * img / max(img.max(), 1)).astype(np.uint8).squeeze()).save(
                root / f"digit-{c}" / f"{i}.png")
    return root


@pytest.fixture
def bench(tmp_path, digits, monkeypatch):
    """A site (its data, out-dir, cache) and, apart, the folders a malicious server names."""
    monkeypatch.setenv("FEDHASH_CACHE", str(tmp_path / "home-cache"))
    data = _pngs(tmp_path / "site" / "images", digits)
    node = {"data": str(data), "silo": "hospital-a", "out-dir": str(tmp_path / "site" / "out"),
            "cache-dir": str(tmp_path / "site" / "cache")}
    evil = tmp_path / "evil"
    _pngs(evil / "data", digits, classes=(5, 6), per_class=7)  # another data folder the server names
    (evil / "weights.pth").parent.mkdir(parents=True, exist_ok=True)
    (evil / "weights.pth").write_bytes(b"not a state dict")  # loading it would fail
    bad = Config(**SMALL, out_dir=str(evil / "out"), cache_dir=str(evil / "cache"), weights=str(evil / "weights.pth"),
                 data=str(evil / "data"), inject_failures="hospital-a@1")
    return node, bad, evil, tmp_path


def _ctx(node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _content(server_cfg: Config, site_cfg: Config, server_round: int, **flags) -> RecordDict:
    """What the server sends: its config, and a global model built as the site's own would be."""
    from server.global_model import GlobalModel

    wid, dim = backbone_identity(site_cfg.backbone, None, site_cfg.cache_dir)
    return GlobalModel(site_cfg, wid, dim).content(server_cfg, server_round, **flags), GlobalModel(site_cfg, wid, dim)


def _send(content: RecordDict, message_type: str, node) -> Message:
    """The ClientApp's reply, or, when it raises, the error reply Flower's runtime (and fedhash-supernode's)
    builds from the exception: ``<class>:<'text'>``."""
    from flwr.app import Error

    from client import client_app

    msg = Message(content=content, message_type=message_type, dst_node_id=7)
    try:
        return client_app.app(msg, _ctx(node))
    except Exception as ex:  # noqa: BLE001
        return Message(Error(code=0, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_malicious_server_cannot_move_a_sites_files_weights_or_data(bench, caplog):
    node, bad, evil, tmp = bench
    before = _files(evil)
    site_cfg = Config(**SMALL, cache_dir=node["cache-dir"])
    content, gm = _content(bad, site_cfg, 1)
    stats = _send(content, P.MSG_STATS, node)
    assert not stats.has_error(), stats.error
    content, _ = _content(bad, site_cfg, 1)
    train = _send(content, "train", node)
    assert not train.has_error(), train.error  # the server's inject-failures is a test switch: ignored
    n_site = sum(1 for _ in Path(node["data"]).rglob("*.png"))
    assert train.content[P.METRICS]["num-examples"] < n_site  # the site's own images (less its query split)
    assert train.content[P.METRICS]["num-examples"] > 40  # not the 14 images of the server's data folder
    version = gm.version()
    content, _ = _content(bad, site_cfg, 2, model_version=version)
    content[P.CONFIG]["privacy"] = json.dumps({"unit": "sample (one image)", "epsilon": 0.01})  # a false claim
    idx = _send(content, P.MSG_INDEX, node)
    assert not idx.has_error(), idx.error

    assert _files(evil) == before  # nothing written or created where the server pointed
    assert not (evil / "out").exists() and not (evil / "cache").exists()
    folder = Path(node["out-dir"]) / "silos" / "hospital-a"
    with retrieval.open_index(folder) as ix:
        assert ix.model_version == version and len(ix) > 0
        priv = ix.encoder().record["privacy"]
    assert priv["epsilon"] == float("inf") and priv["computed_by"] == "site hospital-a"  # its own record
    assert list(Path(node["cache-dir"]).rglob("*.npy"))  # features cached where the site says
    assert any("ignores the run config's" in r.getMessage() and "weights" in r.getMessage() for r in caplog.records)


def test_site_errors_name_no_site_path_and_another_backbone_is_refused(bench):
    node, bad, evil, tmp = bench
    site_cfg = Config(**SMALL, cache_dir=node["cache-dir"])
    content, _ = _content(Config(**SMALL, backbone="resnet18"), site_cfg, 1)
    reply = _send(content, P.MSG_STATS, node)
    assert reply.has_error()
    reason = reply.error.reason
    assert "runs backbone 'tf_efficientnet_lite0'" in reason and "resnet18" in reason
    # an error that names a path at the site: the server sees <site path>, never the folder
    req = RecordDict({P.QUERIES: ArrayRecord({P.SEARCH_CODES: Array(np.zeros((1, 2), np.uint8))}),
                      P.CONFIG: ConfigRecord(P.search_config(3, "0" * 16))})
    reply = _send(req, P.MSG_SEARCH, node | {"silo": "hospital-z"})
    assert reply.has_error() and "holds no index at <site path>" in reply.error.reason
    for secret in (str(tmp), node["out-dir"], node["data"], "/tmp"):
        assert secret not in reply.error.reason
    # a simulated silo (no data key) keeps its text: there server and silos are one user
    from client.site import site_error_text

    assert site_error_text("no index at /x/y", {"partition-id": 0}) == "no index at /x/y"
    assert site_error_text(f"cannot read {node['data']}/a.png", node) == "cannot read <site path>/a.png"


def test_privacy_floor_refuses_a_weaker_run_and_the_server_stops(bench):
    from client import site

    node, _, _, _ = bench
    floor = node | {"require-dp": "sample", "max-epsilon": 8}
    site_cfg = Config(**SMALL, cache_dir=node["cache-dir"])
    content, _ = _content(site_cfg, site_cfg, 1)  # a run without DP
    reply = _send(content, P.MSG_STATS, floor)
    assert reply.has_error() and P.PRIVACY_FLOOR in reply.error.reason
    assert "hospital-a" in reply.error.reason and 'require-dp="sample" max-epsilon=8' in reply.error.reason

    dp = dict(dp="sample", supervised=False, mode="probe")
    site.check_privacy_floor(Config(**SMALL, **dp, dp_epsilon=6.0), floor, 54)  # its plan gives 6 <= 8: works
    with pytest.raises(Exception, match="epsilon=.*run with dp-epsilon <= 8"):
        site.check_privacy_floor(Config(**SMALL, **dp, dp_epsilon=0.0, dp_noise=0.3), floor, 54)  # ε far above 8
    with pytest.raises(Exception, match="max-epsilon"):
        site.privacy_floor({"max-epsilon": "lots"})
    with pytest.raises(Exception, match="can require"):
        site.privacy_floor({"require-dp": "client"})

    # the server stops the run on a refusal even when min-train-nodes would let it go on
    from server.link import Link

    class Grid:  # the two calls Link makes of Flower's grid
        def __init__(self):
            self.sent = []

        def push_messages(self, msgs):
            self.sent = list(msgs)
            return [f"m{i}" for i, _ in enumerate(self.sent)]

        def pull_messages(self, ids):
            from flwr.app import Error

            out = []
            for i, m in enumerate(self.sent):
                m.metadata.__dict__["_message_id"] = f"m{i}"
                out.append(Message(Error(code=0, reason=reply.error.reason), reply_to=m) if i == 0
                           else Message(RecordDict({P.SILO: ConfigRecord({P.SILO_NAME: "b"})}), reply_to=m))
            self.sent = []
            return out

    link = Link(Grid(), round_timeout=5, min_nodes=1, kept=lambda: "nothing kept")
    msgs = link.messages([1, 2], "train", RecordDict({P.CONFIG: ConfigRecord({"x": 1})}))
    with pytest.raises(TrainingError, match="privacy floor.*the run stops"):
        link.send(msgs, "train", 1, require="training")
