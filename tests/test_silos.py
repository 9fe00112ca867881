"""Silo partitions (hashing/silos.py): flwr-datasets partitioners behind the config's partition keys,
silos, domain skew."""
import gzip
import pickle
import warnings

import numpy as np
import pytest

from hashing import data as D
from hashing import plots
from hashing.config import PARTITIONERS as KINDS
from hashing.config import Config
from hashing.data import ImageSet, subset
from hashing.errors import ConfigError, DataError
from hashing.silos import Silo, label_histogram, local_silo, make_silo, make_silos, partition_indices
from hashing.views import gaussian_blur


def cut(kind="dirichlet", **kw) -> Config:
    """A config of the partition keys (checked as any config is: a bad value names its key)."""
    if "domains" in kw and isinstance(kw["domains"], tuple):
        kw["domains"] = ",".join(kw["domains"])
    return Config.from_dict({"partitioner": kind, **kw}, source="test")


def spec_from_config(values: dict) -> Config:
    return Config.from_dict(values, source="test")


def _entropy(hist: np.ndarray) -> np.ndarray:
    p = hist / hist.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)


def _check_disjoint_covering(parts, n, covering=True):
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "silos overlap"
    if covering:
        assert np.array_equal(np.sort(allidx), np.arange(n)), "silos do not cover the data set"
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_disjoint_covering_and_deterministic(digits, kind):
    spec = cut(kind=kind, num_silos=5, alpha=0.3, seed=3)
    a = partition_indices(digits.labels, spec)
    b = partition_indices(digits.labels, spec)
    assert len(a) == 5
    _check_disjoint_covering(a, len(digits))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "same spec, different silos"
    other = partition_indices(digits.labels, cut(kind=kind, num_silos=5, alpha=0.3, seed=4))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other)), "the seed changes nothing"


def test_dirichlet_small_alpha_is_more_skewed_than_iid(digits):
    iid = make_silos(digits, cut(kind="iid", num_silos=5))
    dirich = make_silos(digits, cut(kind="dirichlet", num_silos=5, alpha=0.1))
    h_iid, h_dir = _entropy(label_histogram(iid)).mean(), _entropy(label_histogram(dirich)).mean()
    assert h_iid > 0.95 * np.log(10)
    assert h_dir < h_iid - 0.5, (h_dir, h_iid)


def test_dirichlet_is_flwr_datasets_dirichlet_partitioner(digits):
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    spec = cut(kind="dirichlet", num_silos=4, alpha=0.5, min_size=20, seed=7)
    ours = partition_indices(digits.labels, spec)
    direct = DirichletPartitioner(num_partitions=4, partition_by="label", alpha=0.5, min_partition_size=20,
                                  self_balancing=True, shuffle=True, seed=7)
    direct.dataset = datasets.Dataset.from_dict({"label": digits.labels.tolist(), "idx": list(range(len(digits)))})
    for i in range(4):
        assert np.array_equal(ours[i], np.sort(direct.load_partition(i)["idx"]))


def test_quantity_power_one_is_flwr_datasets_linear_partitioner(digits):
    import datasets
    from flwr_datasets.partitioner import LinearPartitioner

    ours = partition_indices(digits.labels, cut(kind="quantity", num_silos=4, quantity_power=1, seed=5))
    order = np.random.default_rng(5).permutation(len(digits))
    direct = LinearPartitioner(num_partitions=4)
    direct.dataset = datasets.Dataset.from_dict({"label": digits.labels[order].tolist(), "idx": order.tolist()})
    for i in range(4):
        assert np.array_equal(ours[i], np.sort(direct.load_partition(i)["idx"]))


def test_importing_partitions_loads_no_flower():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, hashing.silos; print('flwr_datasets' in sys.modules or 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "False"


def test_pathological_silos_hold_exactly_k_classes_and_cover_them(digits):
    for k in (1, 2, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # k=1: 5 silos cannot hold 10 classes (tested below)
            silos = make_silos(digits, cut(kind="pathological", num_silos=5, classes_per_silo=k, seed=1))
        hist = label_histogram(silos)
        assert ((hist > 0).sum(axis=1) == k).all(), hist
        if 5 * k >= 10:
            assert (hist.sum(axis=0) > 0).all(), "a class is in no silo although the silos could hold them all"
            _check_disjoint_covering([s.source_ids for s in silos], len(digits))


def test_pathological_too_few_slots_warns_and_drops_classes(digits):
    spec = cut(kind="pathological", num_silos=3, classes_per_silo=2)
    with pytest.warns(UserWarning, match="belong to no silo"):
        parts = partition_indices(digits.labels, spec)
    _check_disjoint_covering(parts, len(digits), covering=False)
    assert sum(len(p) for p in parts) < len(digits)


def test_pathological_classes_per_silo_out_of_range_names_the_key(digits):
    with pytest.raises(ConfigError, match="classes-per-silo"):
        partition_indices(digits.labels, cut(kind="pathological", classes_per_silo=11))
    with pytest.raises(ConfigError, match="classes-per-silo"):
        cut(kind="pathological", classes_per_silo=0)


def test_quantity_sizes_differ_strongly_iid_sizes_equal(digits):
    q = [len(p) for p in partition_indices(digits.labels, cut(kind="quantity", num_silos=5, quantity_power=1.5))]
    iid = [len(p) for p in partition_indices(digits.labels, cut(kind="iid", num_silos=5))]
    assert max(iid) - min(iid) <= 1
    assert max(q) / min(q) > 5, q
    assert q == sorted(q), "sizes grow with the silo id"
    flat = [len(p) for p in partition_indices(digits.labels, cut(kind="quantity", num_silos=5, quantity_power=0))]
    assert max(flat) - min(flat) <= 5


def test_domain_invert_pixels_and_fingerprints(digits):
    spec = cut(kind="domain", num_silos=4, domains=("none", "invert"))
    silos = make_silos(digits, spec)
    assert [s.domain for s in silos] == ["none", "invert", "none", "invert"]
    assert silos[1].name == "silo-1 (invert)" and silos[0].name == "silo-0"
    inv = silos[1]
    assert np.array_equal(inv.ds.images, 255 - digits.images[inv.source_ids])
    assert np.array_equal(inv.ds.labels, digits.labels[inv.source_ids])
    plain_same_ids = make_silos(digits, cut(kind="iid", num_silos=4))[1]
    assert np.array_equal(plain_same_ids.source_ids, inv.source_ids), "domain uses the IID split"
    assert plain_same_ids.ids_fingerprint() != inv.ids_fingerprint()
    assert plain_same_ids.ds.fingerprint() != inv.ds.fingerprint()
    assert len({s.ds.fingerprint() for s in silos}) == 4 and len({s.ids_fingerprint() for s in silos}) == 4
    assert len({s.ds.name for s in silos}) == 4 and all(s.ds.name != digits.name for s in silos)
    # label skew plus domain skew
    mixed = make_silos(digits, cut(kind="dirichlet", num_silos=3, domains=("blur",)))
    assert all(s.domain == "blur" for s in mixed)


def test_default_domain_cycle_and_blur(digits):
    silos = make_silos(digits, cut(kind="domain", num_silos=3))
    assert [s.domain for s in silos] == ["none", "invert", "blur"]
    blur = silos[2]
    orig = digits.images[blur.source_ids].astype(float)
    assert blur.ds.images.dtype == np.uint8 and blur.ds.images.shape == orig.shape
    assert blur.ds.images.astype(float).std() < orig.std()  # smoother
    assert abs(blur.ds.images.astype(float).mean() - orig.mean()) < 0.1 * orig.mean()  # about the same brightness
    const = np.full((2, 28, 28, 3), 77, np.uint8)
    assert np.array_equal(gaussian_blur(const, 1.0), const)


def test_make_silo_equals_make_silos(digits):
    for spec in (cut(kind="dirichlet", num_silos=4, seed=2),
                 cut(kind="domain", num_silos=3, domains=("invert", "blur", "none"))):
        all_ = make_silos(digits, spec)
        for i in range(spec.num_silos):
            one = make_silo(digits, spec, i)
            assert one == all_[i]
            assert np.array_equal(one.ds.images, all_[i].ds.images)
            assert one.ids_fingerprint() == all_[i].ids_fingerprint()
    with pytest.raises(ConfigError, match="num-silos"):
        make_silo(digits, cut(num_silos=3), 3)


def test_splits_disjoint_and_query_fraction(digits):
    for s in make_silos(digits, cut(kind="quantity", num_silos=4, query_frac=0.2)):
        sp, n = s.splits, len(s)
        assert len(np.intersect1d(sp.query, sp.database)) == 0
        assert np.array_equal(np.union1d(sp.query, sp.database), np.arange(n))
        assert np.array_equal(sp.train, sp.database)
        assert abs(len(sp.query) - 0.2 * n) <= 1
    silos = make_silos(digits, cut(kind="iid", num_silos=2))
    assert not np.array_equal(silos[0].splits.query, silos[1].splits.query), "every silo draws its own split"


def test_too_small_silo_names_the_silo(digits):
    tiny = subset(digits, np.arange(30))
    with pytest.raises(DataError, match=r"silo-\d+.*fewer silos"):
        make_silos(tiny, cut(kind="iid", num_silos=5, min_size=10))
    with pytest.raises(DataError, match=r"silo-2 would hold fewer than 3"):
        partition_indices(np.arange(7) % 2, cut(kind="iid", num_silos=3, min_size=0))
    with pytest.raises(DataError, match=r"silo-0 .*quantity-power"):
        partition_indices(digits.labels, cut(kind="quantity", num_silos=10, quantity_power=4, min_size=10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"silo-\d+ holds \d+ image.*larger alpha"):
            partition_indices(digits.labels, cut(kind="dirichlet", num_silos=12, alpha=0.01, min_size=100))


def test_spec_checks_and_config(digits):
    with pytest.raises(ConfigError, match="partitioner.*iid, dirichlet, pathological, quantity, domain"):
        spec_from_config({"partitioner": "banana"})
    with pytest.raises(ConfigError, match="num-silos"):
        spec_from_config({"num-silos": 0})
    with pytest.raises(ConfigError, match="num-silos"):
        spec_from_config({"num_silos": "many"})
    with pytest.raises(ConfigError, match="alpha"):
        cut(alpha=0)
    with pytest.raises(ConfigError, match="domains"):
        spec_from_config({"domains": "none,sepia"})
    with pytest.raises(ConfigError, match="query-frac"):
        cut(query_frac=1.0)
    got = spec_from_config({
        "partitioner": "Domain", "num-silos": "4", "alpha": 1, "classes_per_silo": 3, "quantity-power": "2",
        "domains": "invert, blur", "min_size": 5, "query-frac": 0.25, "seed": 9, "bits": 64, "lr": 0.001,
    })
    assert got.partition_config() == cut(kind="domain", num_silos=4, alpha=1.0, classes_per_silo=3, quantity_power=2.0,
                                          domains=("invert", "blur"), min_size=5, query_frac=0.25, seed=9).partition_config()
    assert spec_from_config({"domains": ["invert"]}).domain_list == ("invert",)
    assert spec_from_config({}).partition_config() == Config().partition_config()


def test_domain_on_path_backed_set_is_a_config_error():
    ds = ImageSet(name="folder:x", labels=np.arange(40) % 4, classes=list("abcd"), paths=[f"/nope/{i}.png" for i in range(40)])
    with pytest.raises(ConfigError, match="in-memory"):
        make_silos(ds, cut(kind="domain", num_silos=2))
    silos = make_silos(ds, cut(kind="iid", num_silos=2))  # no transform: fine
    assert silos[0].ds.paths == [ds.paths[i] for i in silos[0].source_ids]


def test_animal_mnist_missing_says_how_to_install(digits, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "animal_mnist" else real(name, *a))
    D.load_animal_mnist.cache_clear()
    try:
        with pytest.raises(DataError, match="pip install --no-deps animal-mnist"):
            make_silos(digits, cut(kind="domain", num_silos=2, domains=("none", "animal-mnist")))
    finally:
        D.load_animal_mnist.cache_clear()


def test_animal_mnist_replaces_images_from_the_package_pickles(digits, tmp_path, monkeypatch):
    # A stand-in for the installed package: the same layout of gzipped pickles.
    folder = tmp_path / "animal_mnist" / "data" / "Animal_MNIST"
    folder.mkdir(parents=True)
    (tmp_path / "animal_mnist" / "__init__.py").write_text("")
    y = np.repeat(np.arange(10), 20).astype(np.int64)
    x = (y[:, None, None] * 20 + np.zeros((1, 28, 28))).astype(np.uint8)  # class c: constant 20*c
    with gzip.open(folder / "animal_data_version_3.gz", "wb") as f:
        pickle.dump(x, f)
    with gzip.open(folder / "animal_label_version_3.gz", "wb") as f:
        pickle.dump(y, f)
    monkeypatch.syspath_prepend(str(tmp_path))
    D.load_animal_mnist.cache_clear()
    try:
        silos = make_silos(digits, cut(kind="domain", num_silos=2, domains=("none", "animal-mnist")))
    finally:
        D.load_animal_mnist.cache_clear()
    a = silos[1]
    assert a.domain == "animal-mnist" and a.ds.images.shape == (len(a), 8, 8)
    assert np.array_equal(a.ds.labels, digits.labels[a.source_ids])
    assert np.array_equal(a.ds.images[:, 4, 4], (a.ds.labels * 20).astype(np.uint8))  # class-matched animals
    assert np.array_equal(silos[0].ds.images, digits.images[silos[0].source_ids])


def test_multilabel_partitions_by_first_label(digits):
    n = len(digits)
    multi = np.zeros((n, 10), np.uint8)
    multi[np.arange(n), digits.labels] = 1
    multi[np.arange(n), (digits.labels + 3) % 10] = 1
    ds = ImageSet(name="multi", labels=multi, classes=digits.classes, images=digits.images)
    silos = make_silos(ds, cut(kind="pathological", num_silos=5, classes_per_silo=2))
    _check_disjoint_covering([s.source_ids for s in silos], n)
    for s in silos:
        first = np.argmax(s.ds.labels, axis=1)
        assert len(np.unique(first)) == 2
        assert s.ds.labels.ndim == 2
    assert label_histogram(silos).sum() == multi.sum()


def test_local_silo(digits):
    s = local_silo(digits, "site-a", seed=1, query_frac=0.1)
    assert isinstance(s, Silo) and s.name == "site-a" and s.ds is digits and len(s) == len(digits)
    assert np.array_equal(s.source_ids, np.arange(len(digits)))
    assert abs(len(s.splits.query) - 180) <= 1 and np.array_equal(s.splits.train, s.splits.database)
    assert s.ids_fingerprint() == local_silo(digits, "site-a", seed=1).ids_fingerprint()


def test_label_histogram_and_plot(digits, tmp_path):
    silos = make_silos(digits, cut(kind="dirichlet", num_silos=5))
    hist = label_histogram(silos)
    assert hist.shape == (5, 10) and np.array_equal(hist.sum(axis=0), np.bincount(digits.labels))
    out = tmp_path / "plots" / "partition.png"
    plots.plot_partition(hist, [s.name for s in silos], digits.classes, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["partition.png"]  # no temp file left


def test_content_fingerprint_tells_sites_apart(digits):
    """Two real sites with different images, the same number of them: the positional ids agree, the
    provenance (content ids) does not; the same images under other names or order agree."""
    from hashing.catalogue import content_id
    from hashing.data import subset

    a = local_silo(subset(digits, np.arange(0, 300)), "site-a", seed=1)
    b = local_silo(subset(digits, np.arange(300, 600)), "site-b", seed=1)
    assert a.ids_fingerprint() == b.ids_fingerprint()  # positions 0..299 at both: why provenance moved
    assert a.content_fingerprint() != b.content_fingerprint()
    shuffled = local_silo(subset(digits, np.arange(299, -1, -1)), "site-c", seed=1)
    assert shuffled.content_fingerprint() == a.content_fingerprint()
    assert a.content_ids()[5] == content_id(digits.images[5])
    # a grey image and its RGB copy are the same content
    assert content_id(digits.images[5]) == content_id(np.repeat(digits.images[5][:, :, None], 3, axis=2))
