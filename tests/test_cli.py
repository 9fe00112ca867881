"""The CLI as a user runs it: train, eval and export-codes on scikit-learn's digits, small settings."""
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from simulations.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("runs")
    rc = main(["train", "--data", "digits", "--bits", "16", "--size", "32", "--views", "2", "--n-train", "600",
               "--epochs", "3", "--batch-size", "128", "--runs-dir", str(root), "--cache-dir", str(cache_dir)])
    assert rc == 0
    (d,) = list(root.iterdir())
    return d


def test_train_writes_run_folder(run):
    for f in ("config.json", "model.pt", "metrics.json", "splits.npz", "loss.png", "bit_balance.png"):
        assert (run / f).exists(), f
    cfg = json.loads((run / "config.json").read_text())
    m = json.loads((run / "metrics.json").read_text())
    assert cfg["train"]["bits"] == 16 and cfg["data"]["data"] == "digits"
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
