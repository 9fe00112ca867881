"""The CLI as a user runs it: train, eval and export-codes on scikit-learn's digits, small settings."""
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from simulations.cli import main

from .conftest import train_digits


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    return train_digits(tmp_path_factory.mktemp("runs"), cache_dir, bits=16)


def test_train_writes_run_folder(run):
    for f in ("config.json", "model.pt", "metrics.json", "splits.npz", "loss.png", "bit_balance.png", "index.faiss"):
        assert (run / f).exists(), f
    cfg = json.loads((run / "config.json").read_text())
    m = json.loads((run / "metrics.json").read_text())
    assert cfg["config"]["bits"] == 16 and cfg["config"]["data"] == "digits" and cfg["config"]["epochs"] == 3
    assert cfg["model_version"] == m["model_version"] and len(cfg["model_version"]) == 16
    assert len(m["step_loss"]) == 3 * (600 // 128) and len(m["epochs"]) == 3
    # training lowered the loss
    assert m["epochs"][-1]["loss"] < m["epochs"][0]["loss"]
    # codes better than chance on 10 balanced classes (chance mAP is about 0.1)
    assert m["symmetric"]["mAP@1000"] > 0.2


def test_export_codes_is_consistent(run, cache_dir, tmp_path):
    out = tmp_path / "codes.npz"
    assert main(["export-codes", "--run", str(run), "--out", str(out), "--cache-dir", str(cache_dir)]) == 0
    z = np.load(out)
    assert sorted(z.files) == sorted(["query_codes", "db_codes", "query_logits", "query_labels", "db_labels", "bits"])
    assert int(z["bits"]) == 16
    assert z["query_codes"].dtype == np.uint8 and z["query_codes"].shape == (179, 2)
    assert z["db_codes"].shape == (1618, 2) and z["query_logits"].shape == (179, 16)
    assert z["query_logits"].dtype == np.float32
    # codes are the sign of the logits, packed LSB first
    bits = np.unpackbits(z["query_codes"], axis=1, bitorder="little")
    assert np.array_equal(bits, (z["query_logits"] > 0).astype(np.uint8))
    # labels are those of the run's own splits
    splits = np.load(run / "splits.npz")
    from hashing.data import load_digits

    y = load_digits().labels
    assert np.array_equal(z["query_labels"], y[splits["query"]]) and np.array_equal(z["db_labels"], y[splits["database"]])
    # the mAP in metrics.json is reproduced from the exported codes, against scikit-learn's AP over the full ranking
    from hashing.codes import hamming
    from hashing.metrics import map_at_k

    d = hamming(z["query_codes"], z["db_codes"])
    m = json.loads((run / "metrics.json").read_text())
    assert map_at_k(d, z["query_labels"], z["db_labels"], 1000) == pytest.approx(m["symmetric"]["mAP@1000"], abs=1e-9)
    # the run's silo index holds the database codes under the database image ids, stamped with the model version
    from hashing.errors import ModelVersionError
    from hashing.index import SiloIndex

    index = SiloIndex.load(run / "index.faiss")
    assert len(index) == 1618 and index.model_version == m["model_version"] and index.bits == 16
    dist, ids = index.search(z["query_codes"], 10, model_version=m["model_version"])
    assert set(ids.ravel()) <= set(splits["database"].tolist())
    row = {int(i): r for r, i in enumerate(splits["database"])}
    assert np.array_equal(dist, np.take_along_axis(d, np.vectorize(row.get)(ids), axis=1))
    with pytest.raises(ModelVersionError):
        index.search(z["query_codes"], 10, model_version="another-model")
    # asymmetric distances recomputed in float64; a tiny index tie-break makes the ranking tie-free, where
    # scikit-learn's AP (which groups ties) and the stable-sort AP must agree
    logits = z["query_logits"].astype(np.float64)
    db_bits = np.unpackbits(z["db_codes"], axis=1, bitorder="little").astype(np.float64)
    asym = np.abs(1 / (1 + np.exp(-logits[:, None, :])) - db_bits[None]).sum(-1)
    asym = asym + 1e-9 * np.arange(asym.shape[1])[None]
    rel = z["query_labels"][:, None] == z["db_labels"][None]
    ours = map_at_k(asym, z["query_labels"], z["db_labels"], None)
    ref = np.mean([average_precision_score(rel[i], -asym[i]) if rel[i].any() else 0.0 for i in range(len(rel))])
    assert ours == pytest.approx(ref, abs=1e-9)


def test_eval_table(run, cache_dir, capsys):
    assert main(["eval", "--run", str(run), "--bits", "16,32", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    ev = json.loads((run / "eval.json").read_text())
    methods = {(r["method"], r["bits"]) for r in ev["rows"]}
    for b in (16, 32):
        for m in ("CroVCA unsup", "CroVCA sup", "ITQ", "PCA", "LSH"):
            assert (m, b) in methods
    assert ("float cosine", 0) in methods
    for f in ("eval.md", "pr_16bits.png", "pr_32bits.png", "map_bars.png"):
        assert (run / f).exists()
    assert "CroVCA sup" in out and "ITQ" in out
    rows = {(r["method"], r["bits"]): r for r in ev["rows"]}
    # the run's own model is evaluated, not retrained: same figure as at training time
    m = json.loads((run / "metrics.json").read_text())
    assert rows[("CroVCA unsup", 16)]["mAP@1000"] == pytest.approx(m["symmetric"]["mAP@1000"], abs=1e-9)
    # labels help: supervised CroVCA beats unsupervised on the same features
    assert rows[("CroVCA sup", 32)]["mAP@1000"] > rows[("CroVCA unsup", 32)]["mAP@1000"]
    # companions are kept for the next eval
    assert (run / "companions" / "sup-32.pt").exists()


def test_eval_and_export_refuse_a_model_of_other_backbone_weights(run, cache_dir, tmp_path, capsys):
    import shutil

    import torch

    other = tmp_path / "run"
    shutil.copytree(run, other)
    rec = torch.load(other / "model.pt", weights_only=True)
    rec["identity"]["weights_id"] = "0000000000000000"
    from hashing.model import version_of

    rec["model_version"] = version_of(rec["params"], rec["buffers"], rec["identity"])
    from hashing.index import SiloIndex
    from hashing.model import seal
    from hashing.atomic import sealed

    torch.save(seal(rec), other / "model.pt")  # a whole run folder of that model: its files agree with each other
    rc = json.loads((other / "config.json").read_text()) | {"model_version": rec["model_version"], "weights_id": "0" * 16}
    (other / "config.json").write_text(json.dumps(sealed(rc)))
    idx = SiloIndex.load(other / "index.faiss")
    idx.model_version = rec["model_version"]
    idx.save(other / "index.faiss")
    for cmd in (["eval", "--run", str(other), "--bits", "16"],
                ["export-codes", "--run", str(other), "--out", str(tmp_path / "x.npz")]):
        assert main(cmd + ["--cache-dir", str(cache_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "other backbone weights or input size" in err


def test_bad_input_one_line_errors(tmp_path, capsys):
    assert main(["export-codes", "--run", str(tmp_path), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a fedhash run folder" in err
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert main(["train", "--data", str(tmp_path / "empty"), "--runs-dir", str(tmp_path / "r")]) == 2
    assert "holds no images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--bits", "12"])
    assert "multiple of 8" in capsys.readouterr().err


def test_train_on_image_folder_with_a_corrupt_file(tmp_path, cache_dir, capsys, caplog):
    """A user's folder of class/*.png: the unreadable file is listed, skipped and counted; --strict stops on it."""
    from hashing.data import load_digits
    from tests.conftest import write_png

    d = load_digits()
    for i in range(120):
        write_png(tmp_path / "imgs" / f"digit{d.labels[i]}" / f"{i}.png", d.images[i])
    (tmp_path / "imgs" / "digit0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = ["train", "--data", str(tmp_path / "imgs"), "--bits", "8", "--size", "32", "--views", "2",
            "--epochs", "1", "--batch-size", "32", "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(cache_dir)]
    assert main(args) == 0
    assert any("skipped 1 unreadable" in r.getMessage() for r in caplog.records if r.name == "fedhash.data")
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image" in err and "broken.png" in err
    (run,) = list((tmp_path / "runs").iterdir())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["n_images"] == 120 and cfg["n_skipped"] == 1
    assert json.loads((run / "metrics.json").read_text())["skipped_images"][0][0].endswith("broken.png")
    assert main(args + ["--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.png" in err and "--strict" in err
