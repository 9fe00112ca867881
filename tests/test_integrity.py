"""Every persisted file verified on read (issue 13, part 6) and checkpoint retention (part 5).

Run folders, model files, silo indexes and their sidecars, federated checkpoints: an edited or damaged file
is refused with a one-line error naming it and the fix; checkpoints beyond keep-checkpoints are pruned
only after the new one is whole."""
import json
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch

from hashing import model as M
from hashing.config import Config
from hashing.errors import ConfigError, FedhashError, IntegrityError, ModelVersionError
from hashing.index import SiloIndex
from server import checkpoint as ckpt
from simulations.cli import main

from .conftest import train_digits, write_png


# --------------------------------------------------------------------------- a fedhash train run folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    return train_digits(tmp_path_factory.mktemp("runs"), cache_dir, bits=16, epochs=1)


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _refused(capsys, run, cache_dir, tmp_path, name: str) -> None:
    """eval and export-codes both exit 2 with one line on stderr that names the file ``name``."""
    for cmd in (["eval", "--run", str(run), "--bits", "16"],
                ["export-codes", "--run", str(run), "--out", str(tmp_path / "codes.npz")]):
        assert main(cmd + ["--cache-dir", str(cache_dir)]) == 2, cmd
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err, err
        assert str(run / name) in err, err
    assert not (tmp_path / "codes.npz").exists() and not (run / "eval.json").exists()


def _edit_json(path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d, indent=2, sort_keys=True))


def test_an_intact_run_is_read(copy, cache_dir, tmp_path, capsys):
    assert main(["export-codes", "--run", str(copy), "--out", str(tmp_path / "codes.npz"),
                 "--cache-dir", str(cache_dir)]) == 0
    assert (tmp_path / "codes.npz").is_file()
    rc = json.loads((copy / "config.json").read_text())
    assert len(rc["digest"]) == 64 and len(rc["splits_sha256"]) == 64
    assert len(M.read_record(copy / "model.pt")["digest"]) == 64


def test_a_corrupted_index_is_refused(copy, cache_dir, tmp_path, capsys):
    data = bytearray((copy / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "index.faiss").write_bytes(bytes(data))
    _refused(capsys, copy, cache_dir, tmp_path, "index.faiss")


def test_a_missing_index_is_refused(copy, cache_dir, tmp_path, capsys):
    (copy / "index.faiss").unlink()
    _refused(capsys, copy, cache_dir, tmp_path, "index.faiss")


def test_an_edited_model_version_in_config_json_is_refused(copy, cache_dir, tmp_path, capsys):
    _edit_json(copy / "config.json", model_version="0123456789abcdef")
    _refused(capsys, copy, cache_dir, tmp_path, "config.json")


def test_config_json_is_cross_checked_against_model_pt_without_its_digest(copy, cache_dir, tmp_path, capsys):
    """A run folder without config.json's digest (written before it) still has its model version checked."""
    rc = json.loads((copy / "config.json").read_text())
    del rc["digest"]
    rc["model_version"] = "0123456789abcdef"
    (copy / "config.json").write_text(json.dumps(rc))
    _refused(capsys, copy, cache_dir, tmp_path, "config.json")
    err_free = json.loads((copy / "config.json").read_text())
    err_free["model_version"] = M.read_record(copy / "model.pt")["model_version"]
    err_free["config"] = err_free["config"] | {"bits": 32}
    (copy / "config.json").write_text(json.dumps(err_free))
    _refused(capsys, copy, cache_dir, tmp_path, "config.json")


def test_an_edited_model_pt_is_refused(copy, cache_dir, tmp_path, capsys):
    rec = torch.load(copy / "model.pt", weights_only=True)
    rec["privacy"] = {"unit": "sample", "epsilon": 1.0}  # a guarantee it was never trained under
    torch.save(rec, copy / "model.pt")
    _refused(capsys, copy, cache_dir, tmp_path, "model.pt")


def test_an_edited_index_sidecar_is_refused(copy, cache_dir, tmp_path, capsys):
    _edit_json(copy / "index.faiss.meta.json", backbone="vit_huge")
    _refused(capsys, copy, cache_dir, tmp_path, "index.faiss.meta.json")


def test_a_damaged_splits_file_is_refused(copy, cache_dir, tmp_path, capsys):
    data = bytearray((copy / "splits.npz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "splits.npz").write_bytes(bytes(data))
    _refused(capsys, copy, cache_dir, tmp_path, "splits.npz")


def test_search_refuses_an_edited_model_in_the_index_folder(run, cache_dir, tmp_path, capsys, digits):
    imgs = tmp_path / "imgs" / "c"
    imgs.mkdir(parents=True)
    for i in range(12):
        write_png(imgs / f"{i}.png", digits.images[i])
    folder = tmp_path / "idx"
    common = ["--cache-dir", str(cache_dir)]
    assert main(["index", "build", "--model", str(run), "--data", str(tmp_path / "imgs"), "--out", str(folder)]
                + common) == 0
    query = ["search", "--index", str(folder), "--image", str(imgs / "3.png")] + common
    assert main(query) == 0
    capsys.readouterr()
    (path,) = list((folder / "models").glob("*.pt"))
    rec = torch.load(path, weights_only=True)
    rec["extra"] = rec["extra"] | {"note": "edited"}
    torch.save(rec, path)
    assert main(query) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err, err


# --------------------------------------------------------------------------- catalogue rows


@pytest.fixture
def catalogue_index(run, cache_dir, tmp_path, digits):
    """An index folder of 40 digits kept in memory (their pixels in the catalogue), and a PNG of digit 3."""
    from hashing import retrieval as R
    from hashing.data import subset

    folder = tmp_path / "cidx"
    idx, _ = R.build(folder, run, subset(digits, np.arange(40)), cache_dir=cache_dir)
    idx.close()
    png = tmp_path / "q.png"
    write_png(png, digits.images[3])
    return folder, png


def _sql(folder, statement, *args):
    import sqlite3

    with sqlite3.connect(folder / "catalogue.sqlite") as db:
        db.execute(statement, args)


def test_an_edited_catalogue_row_is_refused_and_can_be_removed(catalogue_index, cache_dir, capsys, digits):
    from hashing import catalogue as C
    from hashing import retrieval as R

    folder, png = catalogue_index
    cid = C.content_id(digits.images[3])
    query = ["search", "--index", str(folder), "--image", str(png), "-k", "5", "--cache-dir", str(cache_dir)]
    assert main(query) == 0 and C.fmt_id(cid) in capsys.readouterr().out
    with R.open_index(folder) as idx:  # every row written carries its checksum
        assert idx.cat.db.execute("SELECT COUNT(*) FROM items WHERE checksum IS NULL").fetchone()[0] == 0
        assert idx.cat.db.execute("SELECT COUNT(*) FROM codes WHERE checksum IS NULL").fetchone()[0] == 0
    _sql(folder, "UPDATE items SET labels = ? WHERE id = ?", '["7"]', cid)  # a hit's label, edited
    assert main(query) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert str(folder / "catalogue.sqlite") in err and C.fmt_id(cid) in err and "checksum" in err, err
    # the damaged row can still be removed; then the index answers again, without it
    assert main(["index", "remove", "--index", str(folder), "--id", C.fmt_id(cid)]) == 0
    capsys.readouterr()
    assert main(query) == 0 and C.fmt_id(cid) not in capsys.readouterr().out


def test_an_edited_code_or_kept_pixels_are_refused_on_read(catalogue_index, digits):
    from hashing import catalogue as C
    from hashing import retrieval as R

    folder, _ = catalogue_index
    a, b = C.content_id(digits.images[5]), C.content_id(digits.images[6])
    with R.open_index(folder) as idx:
        version, nbytes = idx.model_version, idx.bits // 8
        assert idx.image(C.fmt_id(a)).shape == (8, 8, 3)
    _sql(folder, "UPDATE codes SET code = ? WHERE id = ?", bytes(nbytes), a)
    px = np.ascontiguousarray(C.canonical_pixels(digits.images[6])).copy()
    px[0, 0] ^= 1
    _sql(folder, "UPDATE items SET pixels = ? WHERE id = ?", C.pixels_blob(px), b)
    with R.open_index(folder) as idx:
        with pytest.raises(IntegrityError, match=f"code of image {C.fmt_id(a)} under model {version}.*checksum"):
            idx.cat.codes(version)  # what a rebuild of the FAISS file reads
        with pytest.raises(IntegrityError, match=f"pixels kept for image {C.fmt_id(b)}"):
            idx.image(C.fmt_id(b))


def test_a_catalogue_of_before_row_checksums_is_read_and_gets_them_for_new_rows(catalogue_index, cache_dir,
                                                                                 capsys, digits):
    from hashing import catalogue as C
    from hashing import retrieval as R
    from hashing.data import subset

    folder, png = catalogue_index
    for table in ("items", "codes"):
        _sql(folder, f"ALTER TABLE {table} DROP COLUMN checksum")
    cid = C.content_id(digits.images[3])
    _sql(folder, "UPDATE items SET labels = ? WHERE id = ?", '["7"]', cid)  # unverifiable: read as it is
    query = ["search", "--index", str(folder), "--image", str(png), "-k", "5", "--cache-dir", str(cache_dir)]
    assert main(query) == 0 and C.fmt_id(cid) in capsys.readouterr().out
    with R.open_index(folder) as idx:
        idx.add(subset(digits, np.arange(40, 50)))
        rows = dict(idx.cat.db.execute("SELECT id, checksum FROM items").fetchall())
    assert len(rows) == 50 and sum(v is None for v in rows.values()) == 40


# --------------------------------------------------------------------------- model records


def _record(**extra):
    params = OrderedDict(w=torch.arange(12, dtype=torch.float32).reshape(3, 4))
    buffers = OrderedDict(mean=torch.ones(4))
    ident = {"kind": "probe", "backbone": "b", "weights_id": "0" * 16, "size": 32, "bits": 16}
    return M.record(params, buffers, ident, extra=extra)


def test_model_record_digest_covers_metadata_and_old_records_still_load(tmp_path):
    p = tmp_path / "m.pt"
    M.write_record(p, _record(config={"a": 1}))
    rec = M.read_record(p)
    assert rec["digest"] == M.record_digest(rec)
    for field, value in (("privacy", {"unit": "client"}), ("extra", {"config": {"a": 2}}),
                         ("identity", rec["identity"] | {"size": 64})):
        raw = torch.load(p, weights_only=True)
        raw[field] = value
        if field == "identity":  # a consistent model version: only the digest can tell
            raw["model_version"] = M.version_of(raw["params"], raw["buffers"], raw["identity"])
        torch.save(raw, tmp_path / "edited.pt")
        with pytest.raises(IntegrityError, match="edited.pt.*digest"):
            M.read_record(tmp_path / "edited.pt")
    raw = torch.load(p, weights_only=True)
    raw["params"]["w"][0, 0] += 1
    torch.save(raw, tmp_path / "weights.pt")
    with pytest.raises(ModelVersionError, match="weights.pt"):
        M.read_record(tmp_path / "weights.pt")
    # a record written before digests (none in it) is read as before, its tensors still checked
    raw = torch.load(p, weights_only=True)
    del raw["digest"]
    torch.save(raw, tmp_path / "old.pt")
    assert M.read_record(tmp_path / "old.pt")["model_version"] == rec["model_version"]


# --------------------------------------------------------------------------- silo index sidecars


def _index(tmp_path):
    rng = np.random.default_rng(0)
    idx = SiloIndex(16, "v" * 16, backbone="bb")
    idx.add(rng.integers(0, 256, (50, 2), dtype=np.uint8), np.arange(50))
    path = tmp_path / "i.faiss"
    idx.save(path)
    return path, tmp_path / "i.faiss.meta.json"


@pytest.mark.parametrize("field,value", [("model_version", "f" * 16), ("bits", 24), ("backbone", "other"),
                                         ("privacy", {"unit": "sample", "epsilon": 1.0}), ("count", 49)])
def test_an_edited_sidecar_field_is_refused_on_load(tmp_path, field, value):
    path, side = _index(tmp_path)
    assert SiloIndex.load(path).model_version == "v" * 16
    _edit_json(side, **{field: value})
    with pytest.raises(IntegrityError, match=r"i\.faiss\.meta\.json: its digest does not match"):
        SiloIndex.load(path)


def test_index_bytes_sidecar_and_expected_version(tmp_path):
    path, side = _index(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"i\.faiss: its sha256 does not match i\.faiss\.meta\.json"):
        SiloIndex.load(path)
    path, side = _index(tmp_path)
    with pytest.raises(ModelVersionError, match="not of model"):
        SiloIndex.load(path, model_version="a" * 16)
    # a sidecar written before digests loads as before (its index bytes still checked)
    meta = json.loads(side.read_text())
    del meta["digest"]
    side.write_text(json.dumps(meta))
    assert len(SiloIndex.load(path, model_version="v" * 16)) == 50


# --------------------------------------------------------------------------- checkpoints


def _save(out, r: int, cfg: Config, prototypes=None):
    return ckpt.save_checkpoint(out, server_round=r, model=_record(rounds=r), cfg=cfg, prototypes=prototypes,
                                strategy_state={"m": {"w": np.full((3, 4), 0.5, np.float32)}},
                                silos={"silo-0": "0" * 16}, history=[{"round": i} for i in range(1, r + 1)], ledger={})


def test_a_flipped_byte_in_a_checkpoint_is_refused(tmp_path):
    cfg = Config(out_dir=str(tmp_path))
    marker = np.arange(1000, 1064, dtype=np.float32)  # prototypes whose bytes are found in the file
    path = _save(tmp_path, 1, cfg, prototypes=marker)
    rec = ckpt.load_checkpoint(path)
    assert np.array_equal(rec["prototypes"], marker) and rec["round"] == 1
    data = bytearray(path.read_bytes())
    at = bytes(data).find(marker.tobytes())
    assert at > 0
    data[at + 17] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(FedhashError, match=r"round-0001\.pt.*delete it to resume from the round before") as e:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(e.value)
    # an edited field (its history) with the tensors intact: only the digest can tell
    path = _save(tmp_path, 2, cfg)
    raw = torch.load(path, weights_only=True)
    raw["history"] = raw["history"][:1]
    torch.save(raw, path)
    with pytest.raises(IntegrityError, match=r"round-0002\.pt: its digest does not match"):
        ckpt.load_checkpoint(path)
    # the model record inside it is checked too
    path = _save(tmp_path, 3, cfg)
    raw = torch.load(path, weights_only=True)
    raw["model"]["privacy"] = {"unit": "client"}
    torch.save(raw, path)
    with pytest.raises(IntegrityError, match=r"round-0003\.pt"):
        ckpt.load_checkpoint(path)
    # a checkpoint written before digests is read as before
    path = _save(tmp_path, 4, cfg)
    raw = torch.load(path, weights_only=True)
    del raw["digest"], raw["model"]["digest"]
    torch.save(raw, path)
    assert ckpt.load_checkpoint(path)["round"] == 4


def test_resume_refuses_a_damaged_checkpoint_before_writing(tmp_path):
    from simulations.resume import check_resume_run

    run_dir = tmp_path / "sim"
    out = run_dir / "federated"
    cfg = Config(out_dir=str(out), num_server_rounds=5)
    run_dir.mkdir()
    (run_dir / "scenario.json").write_text("{}")
    path = _save(out, 2, cfg)
    check_resume_run(run_dir, {}, [cfg])  # intact: fine
    raw = torch.load(path, weights_only=True)
    raw["round"] = 1
    torch.save(raw, path)
    before = sorted(p.name for p in run_dir.rglob("*"))
    with pytest.raises(IntegrityError, match="round-0002.pt"):
        check_resume_run(run_dir, {}, [cfg])
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def _rounds(out) -> list[int]:
    return sorted(int(p.name[6:10]) for p in ckpt.checkpoint_dir(out).glob("round-*.pt"))


def test_retention_keeps_the_last_n(tmp_path, monkeypatch):
    cfg = Config(out_dir=str(tmp_path), keep_checkpoints=3)
    assert Config().keep_checkpoints == 3
    for r in range(1, 7):
        _save(tmp_path, r, cfg)
    assert _rounds(tmp_path) == [4, 5, 6]
    assert ckpt.latest_checkpoint(tmp_path).name == "round-0006.pt"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["round"] == 6
    # the last round saved again (the index phase's evaluation) stays the final one
    _save(tmp_path, 6, cfg)
    assert _rounds(tmp_path) == [4, 5, 6]
    # a crash while writing round 7 deletes nothing: the newest complete checkpoint is still there
    (ckpt.checkpoint_dir(tmp_path) / ".round-0007.pt.abc.tmp").write_bytes(b"half")  # a kill -9 mid-write

    def crash(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.atomic, "write_bytes", crash)
    with pytest.raises(OSError):
        _save(tmp_path, 7, cfg)
    monkeypatch.undo()
    assert _rounds(tmp_path) == [4, 5, 6] and ckpt.latest_checkpoint(tmp_path).name == "round-0006.pt"
    _save(tmp_path, 7, cfg)
    assert _rounds(tmp_path) == [5, 6, 7]
    assert not list(ckpt.checkpoint_dir(tmp_path).glob(".*.tmp"))  # what the killed write left is gone
    # keep 1: only the newest; keep 0: all
    _save(tmp_path, 8, cfg.replace(keep_checkpoints=1))
    assert _rounds(tmp_path) == [8]
    for r in range(9, 13):
        _save(tmp_path, r, cfg.replace(keep_checkpoints=0))
    assert _rounds(tmp_path) == [8, 9, 10, 11, 12]


def test_keep_checkpoints_is_a_config_key_of_at_least_0():
    assert Config.from_dict({"keep-checkpoints": 0}).keep_checkpoints == 0
    with pytest.raises(ConfigError, match="'keep-checkpoints' is -1"):
        Config.from_dict({"keep-checkpoints": -1}, source="test")


def test_disk_notice_before_a_run_that_takes_too_much():
    mb = 6_600_000  # the checkpoint
    small = Config(num_server_rounds=10)
    assert ckpt.disk_notice(small, mb) is None
    assert ckpt.disk_estimate(small, mb) >= 4 * mb  # 3 kept checkpoints and model.pt
    assert ckpt.disk_estimate(small.replace(keep_checkpoints=0), mb) >= 11 * mb
    line = ckpt.disk_notice(Config(num_server_rounds=1000, keep_checkpoints=0), mb)
    assert line is not None and "\n" not in line and "GiB" in line and "keep-checkpoints" in line
    assert ckpt.disk_notice(Config(num_server_rounds=1000), mb) is None  # the default keeps 3
    # 10**9 rounds, default retention: the history each checkpoint carries still adds up
    line = ckpt.disk_notice(Config(num_server_rounds=10**9), mb)
    assert line is not None and "TiB" in line


def test_the_server_says_before_the_run_what_its_checkpoints_will_take(tmp_path, caplog, cache_dir):
    from server.federation import Federation

    cfg = Config(out_dir=str(tmp_path / "fed"), num_server_rounds=10**9, cache_dir=str(cache_dir), size=32)
    with caplog.at_level("WARNING", logger="fedhash.server"):
        Federation(None, cfg)
        lines = [r.getMessage() for r in caplog.records if "of disk" in r.getMessage()]
        assert len(lines) == 1 and "TiB" in lines[0] and str(tmp_path / "fed" / "checkpoints") in lines[0]
        caplog.clear()
        Federation(None, cfg.replace(num_server_rounds=10))
        assert not [r for r in caplog.records if "of disk" in r.getMessage()]
    assert not ckpt.checkpoint_dir(cfg.out_dir).exists()  # nothing written before the run starts
