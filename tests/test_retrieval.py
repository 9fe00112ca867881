"""A silo's index as a user touches it: the Python API and the CLI, on real images (scikit-learn's digits
as PNG files and in memory) and a real trained model; results against brute-force Hamming over the
catalogue's codes; crash safety under kill -9."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from hashing import catalogue as C
from hashing import retrieval as R
from hashing.codes import hamming, logits_to_codes
from hashing.data import load_digits, subset
from hashing.errors import DataError, FedhashError, ModelVersionError
from simulations.cli import main

from .conftest import train_digits, write_png

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("models")
    a = train_digits(root / "a", cache_dir, bits=32, epochs=3)
    b = train_digits(root / "b", cache_dir, bits=32, epochs=4)
    return a, b


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """300 digits as class/i.png files, and 100 more in a flat folder (no labels)."""
    root = tmp_path_factory.mktemp("pngs")
    ds = load_digits()
    for i in range(300):
        write_png(root / "db" / str(ds.labels[i]) / f"{i}.png", ds.images[i])
    for i in range(300, 400):
        write_png(root / "new" / f"{i}.png", ds.images[i])
    return root


def assert_topk(D, I, codes, ids, query, k):
    """FAISS's top-k equals brute force: the same distances, and the same ids up to ties at the k-th."""
    Dref, Iref = R.brute_force(codes, ids, query, k)
    assert np.array_equal(np.asarray(D), Dref)
    full = hamming(query, codes)
    pos = {int(i): j for j, i in enumerate(ids)}
    for r in range(len(query)):
        got = np.asarray(I[r])
        assert len(set(got.tolist())) == len(got)
        assert np.array_equal(full[r, [pos[int(i)] for i in got]], Dref[r])  # each id's own distance
        below = Dref[r] < Dref[r, -1]
        assert set(got[below].tolist()) == set(Iref[r][below].tolist())


def _check_against_catalogue(idx: R.SearchIndex, queries: np.ndarray, k: int = 10):
    ids, codes = idx.cat.codes(idx.model_version)
    hits = idx.search_codes(queries, k, model_version=idx.model_version)
    D = np.array([[h.distance for h in row] for row in hits], dtype=np.int64)
    I = np.array([[h.id for h in row] for row in hits], dtype=np.int64)
    assert_topk(D, I, codes, ids, queries, min(k, len(ids)))


def test_content_ids():
    ds = load_digits()
    a, sha = C.content_digest(ds.images[0])
    assert 0 <= a < 2 ** 63 and len(sha) == 64 and C.content_id(ds.images[0].copy()) == a
    assert C.content_id(ds.images[1]) != a
    assert C.parse_id(C.fmt_id(a)) == a and len(C.fmt_id(a)) == 16
    for bad in ("xyz", "8000000000000000", "-1"):
        with pytest.raises(FedhashError, match="content id"):
            C.parse_id(bad)
    with pytest.raises(DataError, match="uint8"):
        C.content_id(ds.images[0].astype(np.float32))


def test_build_search_add_remove_reload(models, pngs, cache_dir, tmp_path):
    model_a, _ = models
    folder = tmp_path / "idx"
    idx, rep = R.build(folder, model_a, pngs / "db", cache_dir=cache_dir)
    assert rep.added == 300 and len(idx) == 300 and idx.bits == 32
    enc = idx.encoder()
    digits = load_digits()
    # an image finds itself at distance 0, with its path and label
    q = [digits.images[7], digits.images[42]]
    hits = idx.search(q, k=5)
    for j, i in enumerate((7, 42)):
        top = [h for h in hits[j] if h.distance == 0]
        assert any(h.path == str((pngs / "db" / str(digits.labels[i]) / f"{i}.png").resolve()) for h in top)
        me = next(h for h in top if h.id == C.content_id(digits.images[i]))
        assert me.labels == (str(digits.labels[i]),)
    # the query goes through the same encoder as the database: the codes equal those the catalogue holds
    q_codes = logits_to_codes(enc.logits(R.query_set(q)))
    held = dict(zip(*idx.cat.codes(idx.model_version)))
    assert np.array_equal(q_codes[0], held[C.content_id(digits.images[7])])
    queries = logits_to_codes(enc.logits(R.query_set(list(digits.images[1000:1040]))))
    _check_against_catalogue(idx, queries)

    # add: a flat folder (no labels) and the in-memory set (whose first 300 are duplicates of the PNGs)
    rep = idx.add(pngs / "new")
    assert rep.added == 100 and len(idx) == 400
    rep = idx.add(subset(digits, np.arange(0, 500)))
    assert rep.added == 100 and len(rep.duplicates) == 400 and len(idx) == 500
    kept = idx.item(C.content_id(digits.images[450]))
    assert kept.path is None and kept.labels == (str(digits.labels[450]),)
    assert np.array_equal(idx.image(kept.id), C.canonical_pixels(digits.images[450]))
    assert idx.item(C.content_id(digits.images[350])).labels == ()
    _check_against_catalogue(idx, queries)

    # remove by id, path and content, all in one step
    by_path = str((pngs / "db" / str(digits.labels[3]) / "3.png").resolve())
    gone = [C.content_id(digits.images[i]) for i in (3, 350, 451)]
    n = idx.remove(ids=[C.fmt_id(gone[2])], paths=[by_path], images=[digits.images[350]])
    assert n == 3 and len(idx) == 497
    all_ids = {h.id for row in idx.search_codes(queries, 497, model_version=idx.model_version) for h in row}
    assert not all_ids & set(gone) and len(all_ids) == 497
    _check_against_catalogue(idx, queries)
    # an unknown item is reported and nothing changes
    gen = idx.cat.generation
    with pytest.raises(R.UnknownItemsError, match="nothing was removed"):
        idx.remove(ids=[C.fmt_id(gone[0]), C.fmt_id(C.content_id(digits.images[10]))])
    assert len(idx) == 497 and idx.cat.generation == gen
    assert idx.remove(ids=[C.fmt_id(gone[0]), C.fmt_id(C.content_id(digits.images[10]))], missing_ok=True) == 1
    idx.close()

    # reload: the same results from the FAISS file; a stale FAISS file is rebuilt from the catalogue
    with R.open_index(folder, cache_dir=cache_dir) as again:
        assert len(again) == 496
        _check_against_catalogue(again, queries)
        path, gen = again.faiss_path(again.model_version), again._stamp(again.cat.generation)
    meta = json.loads(Path(str(path) + ".meta.json").read_text())
    assert meta["generation"] == gen and meta["count"] == 496
    with sqlite3.connect(folder / R.CATALOGUE) as db:  # another process's change the FAISS file never saw
        db.execute("DELETE FROM items WHERE id = ?", (C.content_id(digits.images[20]),))
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
    with R.open_index(folder, cache_dir=cache_dir) as again:
        assert len(again) == 495 and again._sync().ntotal == 495
        _check_against_catalogue(again, queries)
        audit = again.cat.audit()
    assert [a["action"] for a in audit] == ["build", "add", "add", "remove", "remove"]
    assert [a["count"] for a in audit] == [300, 100, 100, 3, 1]
    # the audit log is append-only
    with sqlite3.connect(folder / R.CATALOGUE) as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")


def test_asymmetric_search_reranks_the_hamming_shortlist(models, cache_dir, tmp_path):
    idx, _ = R.build(tmp_path / "idx", models[0], subset(load_digits(), np.arange(600)), cache_dir=cache_dir)
    digits = load_digits()
    q = list(digits.images[700:720])
    logits = idx.encoder().logits(R.query_set(q))
    hits = idx.search(q, k=5, asymmetric=True)
    ids, codes = idx.cat.codes(idx.model_version)
    bits = np.unpackbits(codes, axis=1, bitorder="little").astype(np.float64)
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ref = np.abs(s[:, None, :] - bits[None]).sum(-1)  # over the whole database (shortlist 100 of 600)
    for r, row in enumerate(hits):
        d = np.array([h.distance for h in row])
        assert np.all(np.diff(d) >= -1e-5)
        got = ref[r, np.searchsorted(ids, [h.id for h in row])]
        assert np.allclose(d, got, atol=1e-4)
    idx.close()


def test_collision_refused_and_bad_input(models, cache_dir, tmp_path, monkeypatch):
    digits = load_digits()
    idx = R.create(tmp_path / "idx", models[0], cache_dir=cache_dir)
    idx.add(subset(digits, np.arange(10)))
    real = C.content_digest

    def colliding(image):  # image 10 gets image 0's id but keeps its own sha256
        cid, sha = real(image)
        return (real(digits.images[0])[0], sha) if np.array_equal(image, digits.images[10]) else (cid, sha)

    monkeypatch.setattr(C, "content_digest", colliding)
    with pytest.raises(DataError, match="collides"):
        idx.add(subset(digits, np.arange(10, 20)))
    assert len(idx) == 10
    monkeypatch.undo()
    # codes of another model are refused, naming both versions
    with pytest.raises(ModelVersionError, match=f"{idx.model_version}"):
        idx.search_codes(np.zeros((1, 4), np.uint8), 3, model_version="0123456789abcdef")
    with pytest.raises(FedhashError, match="32-bit"):
        idx.search_codes(np.zeros((1, 2), np.uint8), 3, model_version=idx.model_version)
    with pytest.raises(FedhashError, match="already holds an index"):
        R.create(tmp_path / "idx", models[0], cache_dir=cache_dir)
    with pytest.raises(FedhashError, match="not an index"):
        R.open_index(tmp_path)
    idx.close()


def test_upgrade_and_rollback(models, cache_dir, tmp_path):
    a, b = models
    digits = load_digits()
    idx, _ = R.build(tmp_path / "idx", a, subset(digits, np.arange(400)), cache_dir=cache_dir)
    va = idx.model_version
    q = list(digits.images[1500:1510])
    before = idx.search(q, 5)
    qa = logits_to_codes(idx.encoder().logits(R.query_set(q)))
    assert idx.upgrade(b) == 400
    vb = idx.model_version
    assert vb != va and idx.cat.previous_version == va
    # every code is the new model's; queries of the old model are refused, naming both
    ids, codes = idx.cat.codes(vb)
    enc_b = idx.encoder(vb)
    fresh = enc_b.codes(subset(digits, np.arange(400)))
    order = np.argsort([C.content_id(x) for x in digits.images[:400]])
    assert np.array_equal(codes, fresh[order])
    with pytest.raises(ModelVersionError, match=f"{va}.*{vb}"):
        idx.search_codes(qa, 5, model_version=va)
    _check_against_catalogue(idx, logits_to_codes(enc_b.logits(R.query_set(q))))
    assert sorted(p.name for p in (tmp_path / "idx" / "models").iterdir()) == sorted([f"{va}.pt", f"{vb}.pt"])
    # a removal takes the image out of every kept version
    idx.remove(images=[digits.images[0]])
    assert idx.cat.count_codes(va) == idx.cat.count_codes(vb) == 399
    assert idx.rollback() == va and idx.model_version == va
    qa_codes = logits_to_codes(idx.encoder(va).logits(R.query_set(q)))
    assert np.array_equal(qa_codes, qa)  # the old model's own copy, unchanged
    _check_against_catalogue(idx, qa)
    after = idx.search(q, 5)
    assert all(h.id != C.content_id(digits.images[0]) for row in after for h in row)
    gone = C.content_id(digits.images[0])
    for b_row, a_row in zip(before, after):  # the old model's ranking is back, less the removed image
        if all(h.id != gone for h in b_row):
            assert [h.distance for h in a_row] == [h.distance for h in b_row]
    # an image added after an upgrade has no codes of the previous model: rollback is refused
    idx.upgrade(b)
    idx.add(subset(digits, np.arange(400, 410)))
    with pytest.raises(FedhashError, match="added after the upgrade"):
        idx.rollback()
    assert [a_["action"] for a_ in idx.cat.audit()] == ["build", "upgrade", "remove", "rollback", "upgrade", "add"]
    idx.close()


def test_cli(models, pngs, cache_dir, tmp_path, capsys):
    a, b = models
    folder = tmp_path / "idx"
    common = ["--cache-dir", str(cache_dir)]
    assert main(["index", "build", "--model", str(a), "--data", str(pngs / "db"), "--out", str(folder)] + common) == 0
    assert "added 300 image(s)" in capsys.readouterr().out
    query = pngs / "db" / "4" / "4.png"
    assert main(["search", "--index", str(folder), "--image", str(query), "-k", "3", "--json"] + common) == 0
    out = json.loads(capsys.readouterr().out)
    top = out["queries"][0]["results"]
    assert len(top) == 3 and top[0]["distance"] == 0
    assert any(h["path"] == str(query.resolve()) for h in top if h["distance"] == 0)
    assert main(["search", "--index", str(folder), "--image", str(query), "-k", "3"] + common) == 0
    printed = capsys.readouterr().out
    assert "Hamming" in printed and str(query.resolve()) in printed
    assert main(["index", "add", "--index", str(folder), "--data", str(pngs / "new")] + common) == 0
    assert "added 100" in capsys.readouterr().out
    manifest = tmp_path / "forget.csv"
    manifest.write_text(f"path\n{query.resolve()}\n{pngs / 'new' / '301.png'}\n")
    assert main(["index", "remove", "--index", str(folder), "--manifest", str(manifest)] + common) == 0
    assert "removed 2 image(s); 398 left" in capsys.readouterr().out
    # removing it again: reported, nothing changes, exit code 2 and a one-line error
    assert main(["index", "remove", "--index", str(folder), "--path", str(query)] + common) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedhash: error: not in the index") and "\n" not in err
    assert main(["index", "upgrade", "--index", str(folder), "--model", str(b)] + common) == 0
    assert "398 images re-encoded" in capsys.readouterr().out
    assert main(["index", "audit", "--index", str(folder), "--json"] + common) == 0
    log = json.loads(capsys.readouterr().out)
    assert [r["action"] for r in log] == ["build", "add", "remove", "upgrade"]
    assert "index remove" in log[2]["command"] and log[2]["count"] == 2
    assert main(["index", "info", "--index", str(folder)] + common) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 398 and info["bits"] == 32
    # bad input: one line naming the fix
    for argv, msg in (
        (["search", "--index", str(folder), "--image", str(manifest)], "is not an image"),
        (["search", "--index", str(tmp_path), "--image", str(query)], "is not an index"),
        (["index", "remove", "--index", str(folder), "--id", "zz"], "not a content id"),
        (["index", "build", "--model", str(a), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
         "neither a known data set"),
    ):
        assert main(argv + common) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()  # bad data fails before the folder is made


# --------------------------------------------------------------------------- kill -9

_KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from hashing import retrieval as R, catalogue as C
    from hashing.data import load_digits, subset
    where, folder, cache, model = sys.argv[1:5]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "after-commit":       # the catalogue committed, the FAISS file not yet written
        R.SearchIndex._after_write = die
    elif where == "in-transaction":   # rows inserted, the transaction not committed
        C.Catalogue.log = die
    elif where == "upgrade-encoded":  # the new codes computed, the swap not committed
        C.Catalogue.put_codes = die
    idx = R.open_index(folder, cache_dir=cache)
    if where == "upgrade-encoded":
        idx.upgrade(model)
    else:
        idx.add(subset(load_digits(), np.arange(200, 260)))
""")


@pytest.mark.parametrize("where", ["after-commit", "in-transaction", "upgrade-encoded"])
def test_kill_9_leaves_index_and_catalogue_consistent(models, cache_dir, tmp_path, where):
    digits = load_digits()
    folder = tmp_path / "idx"
    idx, _ = R.build(folder, models[0], subset(digits, np.arange(200)), cache_dir=cache_dir)
    version = idx.model_version
    idx.close()
    proc = subprocess.run([sys.executable, "-c", _KILLER, where, str(folder), str(cache_dir), str(models[1])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with R.open_index(folder, cache_dir=cache_dir) as idx:
        assert idx.model_version == version  # an interrupted upgrade changed nothing
        n = 260 if where == "after-commit" else 200
        assert len(idx) == n and idx._sync().ntotal == n and idx.cat.count_codes(version) == n
        q = idx.encoder().codes(subset(digits, np.arange(1700, 1720)))
        _check_against_catalogue(idx, q)
        assert [a["action"] for a in idx.cat.audit()] == (["build", "add"] if n == 260 else ["build"])
        # and the index goes on working
        assert idx.add(subset(digits, np.arange(200, 270))).added == 70 - (60 if n == 260 else 0)


def _open_files(pid: int) -> list[str]:
    """The files process ``pid`` holds open now (one it closes, or its exit, between the listing and the
    read is simply not among them)."""
    out = []
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return out
    for f in fds:
        try:
            out.append(os.readlink(f))
        except OSError:
            pass
    return out


def test_kill_9_during_a_real_cli_add(models, pngs, cache_dir, tmp_path):
    """``fedhash index add`` killed at some point of its work: the index is the old one or the new one."""
    folder = tmp_path / "idx"
    assert main(["index", "build", "--model", str(models[0]), "--data", str(pngs / "db"), "--out", str(folder),
                 "--cache-dir", str(cache_dir)]) == 0
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "fedhash"), "index", "add", "--index", str(folder),
                             "--data", "digits", "--cache-dir", str(tmp_path / "cold-cache")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # killed once it is at work: it has the catalogue open (after its imports, in the middle of the add)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(x.endswith(R.CATALOGUE) for x in _open_files(proc.pid)):
                break
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with R.open_index(folder, cache_dir=cache_dir) as idx:
        assert len(idx) in (300, 1797) and idx._sync().ntotal == len(idx)
        q = idx.encoder().codes(subset(load_digits(), np.arange(1700, 1710)))
        _check_against_catalogue(idx, q)


def test_add_reads_each_file_once_skips_damaged_ones_and_uses_the_feature_cache(models, pngs, cache_dir, tmp_path):
    import shutil

    from hashing.features import cached_features

    folder = tmp_path / "data"
    shutil.copytree(pngs / "db", folder)
    (folder / "0" / "broken.png").write_bytes(b"\x89PNG not really")
    # strict: the damaged file is refused and nothing is added
    idx = R.create(tmp_path / "idx", models[0], cache_dir=cache_dir)
    with pytest.raises(DataError, match="broken.png.*nothing was added"):
        idx.add(folder, strict=True)
    assert len(idx) == 0 and idx.cat.audit() == []
    rep = idx.add(folder)
    assert rep.added == 300 and [p for p, _ in rep.skipped] == [str((folder / "0" / "broken.png").resolve())]
    direct = dict(zip(*idx.cat.codes(idx.model_version)))
    assert idx.cat.audit()[-1]["detail"]["from_feature_cache"] is False
    idx.close()
    # the features of exactly this data in the cache (as a federation at this site leaves them): used, same codes
    (folder / "0" / "broken.png").unlink()
    enc = R.SearchIndex(tmp_path / "idx", cache_dir=cache_dir).encoder()
    ds = R.load_images(folder)
    cached_features(enc.backbone, enc.backbone_name, ds, np.arange(len(ds)), size=enc.size, cache_dir=cache_dir,
                    weights_id=enc.identity["weights_id"])
    idx2, rep = R.build(tmp_path / "idx2", models[0], folder, cache_dir=cache_dir)
    assert rep.added == 300 and idx2.cat.audit()[-1]["detail"]["from_feature_cache"] is True
    assert dict(zip(*idx2.cat.codes(idx2.model_version))).keys() == direct.keys()
    assert all(np.array_equal(c, direct[i]) for i, c in zip(*idx2.cat.codes(idx2.model_version)))
    idx2.close()


def test_an_add_racing_an_upgrade_adds_nothing(models, cache_dir, tmp_path, monkeypatch):
    """Codes encoded by the old model never land under the new one: another process upgrades mid-add."""
    digits = load_digits()
    idx, _ = R.build(tmp_path / "idx", models[0], subset(digits, np.arange(100)), cache_dir=cache_dir)
    old = idx.model_version
    enc = idx.encoder()
    real = enc.logits

    def upgrade_meanwhile(*a, **k):
        out = real(*a, **k)
        with R.open_index(tmp_path / "idx", cache_dir=cache_dir) as other:  # "another process"
            other.upgrade(models[1])
        return out

    monkeypatch.setattr(enc, "logits", upgrade_meanwhile)
    with pytest.raises(ModelVersionError, match="nothing was added"):
        idx.add(subset(digits, np.arange(100, 150)))
    assert idx.model_version != old and len(idx) == 100
    assert idx.cat.db.execute("SELECT COUNT(*) FROM codes").fetchone()[0] == 200  # 100 per kept version
    idx.close()


def test_a_removal_leaves_nothing_behind_and_stands(models, cache_dir, tmp_path):
    digits = load_digits()
    idx, _ = R.build(tmp_path / "idx", models[0], subset(digits, np.arange(100)), cache_dir=cache_dir)
    va = idx.model_version
    idx.upgrade(models[1])
    idx.rollback()
    idx.rollback()  # back and forth: the old version's FAISS file is written, which a removal must take too
    assert idx.faiss_path(va).exists() and idx.model_version != va
    gone = C.content_id(digits.images[7])
    # a long-lived index (a server) and a removal by another process
    other = R.open_index(tmp_path / "idx", cache_dir=cache_dir)
    q = idx.cat.codes(idx.model_version)[1][:20]
    assert gone in {h.id for row in other.search_codes(q, 100, model_version=idx.model_version) for h in row}
    assert idx.remove(images=[digits.images[7]]) == 1
    assert gone not in {h.id for row in other.search_codes(q, 100, model_version=idx.model_version) for h in row}
    assert other._sync().ntotal == 99 and gone not in set(other._sync().ids().tolist())
    other.close()
    # no code of it in any kept version (raw rows, not joined), no FAISS file of the old version
    assert idx.cat.db.execute("SELECT COUNT(*) FROM codes WHERE id = ?", (gone,)).fetchone()[0] == 0
    assert idx.cat.db.execute("SELECT COUNT(*) FROM codes").fetchone()[0] == 2 * 99
    assert not list((tmp_path / "idx" / "faiss").glob(f"{va}.*"))
    assert idx.cat.db.execute("PRAGMA secure_delete").fetchone()[0] == 1
    # the deletion request stands: adding the same image again is refused, unless asked for
    rep = idx.add(subset(digits, np.arange(0, 20)))
    assert rep.added == 0 and [i for _, i in rep.removed_before] == [C.fmt_id(gone)] and len(idx) == 99
    assert "removed from this index before, left out" in rep.summary()
    with pytest.raises(DataError, match="removed from this index before"):  # codes handed in: refused
        idx.add_codes(R.new_items(subset(digits, np.array([7]))), np.zeros((1, 4), np.uint8),
                      model_version=idx.model_version)
    assert len(idx) == 99
    assert idx.add(subset(digits, np.arange(0, 20)), readd=True).added == 1 and len(idx) == 100
    # a rollback after the removal does not bring it back: the old model's codes went with it
    idx.remove(images=[digits.images[7]])
    idx.rollback()
    assert idx.model_version == va and len(idx) == 99
    ids, _ = idx.cat.codes(va)
    assert gone not in set(ids.tolist())
    idx.close()


def test_overwrite_replaces_the_content_and_keeps_the_audit_log(models, cache_dir, tmp_path):
    digits = load_digits()
    R.build(tmp_path / "idx", models[0], subset(digits, np.arange(50)), cache_dir=cache_dir)[0].close()
    idx, rep = R.build(tmp_path / "idx", models[1], subset(digits, np.arange(50, 80)), cache_dir=cache_dir,
                       overwrite=True)
    assert len(idx) == 30 and list(idx.cat.models()) == [idx.model_version]
    assert [a["action"] for a in idx.cat.audit()] == ["build", "overwrite", "build"]
    assert sorted(p.name for p in (tmp_path / "idx" / "models").iterdir()) == [f"{idx.model_version}.pt"]
    with pytest.raises(FedhashError, match="kind 'flat'"):
        R.create(tmp_path / "other", models[0], kind="ivf")
    idx.close()
