import numpy as np
import pytest

from hashing.data import load_dataset, load_folder, load_manifest, make_splits, read_idx
from hashing.errors import DataError
from tests.conftest import write_png


def _folder(tmp_path, n_per_class=3, size=12):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        for i in range(n_per_class):
            write_png(tmp_path / "imgs" / cls / f"{i}.png", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return tmp_path / "imgs"


def test_fashion_mnist_from_debian_path():
    ds = load_dataset("fashion-mnist")
    assert len(ds) == 70000 and ds.images.shape == (70000, 28, 28) and ds.images.dtype == np.uint8
    assert sorted(np.unique(ds.labels)) == list(range(10))
    assert np.bincount(ds.labels).tolist() == [7000] * 10
    assert ds.classes[9] == "Ankle boot"


def test_idx_folder_of_same_files(tmp_path):
    import gzip
    import shutil

    src = "/usr/share/datasets/fashion-mnist"
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        # one raw, the others gzipped: the loader takes either
        if stem.startswith("t10k-labels"):
            with gzip.open(f"{src}/{stem}.gz") as f, open(tmp_path / stem, "wb") as g:
                g.write(f.read())
        else:
            shutil.copy(f"{src}/{stem}.gz", tmp_path)
    ds = load_dataset(str(tmp_path))
    ref = load_dataset("fashion-mnist")
    assert np.array_equal(ds.images, ref.images) and np.array_equal(ds.labels, ref.labels)


def test_corrupt_idx_is_one_line_error(tmp_path):
    (tmp_path / "x-idx3-ubyte").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read IDX"):
        read_idx(tmp_path / "x-idx3-ubyte")


def test_an_idx_file_is_read_once_per_process_until_it_changes(tmp_path):
    import os
    import struct

    def write(path, values):
        path.write_bytes(struct.pack(">HBBI", 0, 8, 1, len(values)) + bytes(values))

    f = tmp_path / "y-idx1-ubyte"
    write(f, [1, 2, 3])
    a = read_idx(f)
    assert a.tolist() == [1, 2, 3] and read_idx(f) is a  # the second read is the memo's
    with pytest.raises(ValueError):
        a[0] = 9  # read-only: no caller can change what the next one gets
    write(f, [4, 5, 6, 7])
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert read_idx(f).tolist() == [4, 5, 6, 7]  # a changed file is read again
    # every loader copies what it keeps: a data set's arrays are its own, writable as before
    ds = load_dataset("fashion-mnist")
    assert ds.images.flags.writeable and load_dataset("fashion-mnist").images is not ds.images


def test_digits(digits):
    assert len(digits) == 1797 and digits.images.max() == 255 and digits.images.dtype == np.uint8


def test_folder_skips_corrupt_and_strict_refuses(tmp_path, caplog):
    root = _folder(tmp_path)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level("WARNING", logger="fedhash.data"):
        ds = load_folder(root)
    (rec,) = [r for r in caplog.records if "skipped 1 unreadable" in r.getMessage()]
    assert "broken.png" in rec.getMessage() and "\n" not in rec.getMessage()  # one clean line
    assert len(ds) == 6 and len(ds.skipped) == 1 and ds.skipped[0][0].endswith("broken.png")
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.image(0).shape == (12, 12, 3)
    with pytest.raises(DataError, match="broken.png.*--strict"):
        load_folder(root, strict=True)


def test_empty_folder_is_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(str(tmp_path / "empty"))


def test_manifest_multilabel(tmp_path):
    root = _folder(tmp_path)
    m = tmp_path / "m.csv"
    m.write_text("path,labels\nimgs/cat/0.png,cat\nimgs/dog/0.png,dog;outdoor\nimgs/dog/1.png,outdoor\n")
    ds = load_manifest(m)
    assert ds.multilabel and ds.classes == ["cat", "dog", "outdoor"]
    assert ds.labels.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert root.exists()


def test_manifest_missing_paths_and_bad_header(tmp_path):
    _folder(tmp_path)
    m = tmp_path / "m.csv"
    m.write_text("path,labels\nimgs/cat/0.png,cat\nimgs/nope.png,dog\n")
    with pytest.raises(DataError, match=r"1 of 2 paths do not exist \(first: imgs/nope.png\)"):
        load_manifest(m)
    m.write_text("file,label\nimgs/cat/0.png,cat\n")
    with pytest.raises(DataError, match="header 'path,labels'"):
        load_manifest(m)
    m.write_text("path,labels\n")
    with pytest.raises(DataError, match="lists no images"):
        load_manifest(m)


def test_unknown_spec_is_error():
    with pytest.raises(DataError, match="neither a known data set"):
        load_dataset("/no/such/place")


def test_splits_deterministic_disjoint():
    a, b = make_splits(1000, seed=3, n_train=300), make_splits(1000, seed=3, n_train=300)
    c = make_splits(1000, seed=4, n_train=300)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "query", "database"))
    assert not np.array_equal(a.query, c.query)
    assert len(a.query) == 100 and len(a.database) == 900 and len(a.train) == 300
    assert not set(a.query) & set(a.database)
    assert set(a.train) <= set(a.database)
    assert sorted(np.concatenate([a.query, a.database]).tolist()) == list(range(1000))
    with pytest.raises(DataError):
        make_splits(2)
