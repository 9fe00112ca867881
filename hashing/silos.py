"""Silos: one data set cut into the data silos of a simulated federation, or a real site's own data.

The config's partition keys (:class:`hashing.config.Config`: ``partitioner``, ``num-silos``,
``alpha``, ``classes-per-silo``, ``quantity-power``, ``domains``, ``min-size``, ``query-frac``,
``seed``) say how; :func:`make_silos` cuts an :class:`~hashing.data.ImageSet` into :class:`Silo`
objects (each with its own images, query/database splits and the ids of its images in the parent),
and :func:`make_silo` builds just one of them, as a ClientApp in a simulation does. A real site, with
its own data, is :func:`local_silo`.

Kinds (config key ``partitioner``):

``iid``
    Uniformly random, sizes equal to within one image. The labels are shuffled by
    ``numpy.random.default_rng(seed).permutation`` and fed to flwr-datasets'
    ``IidPartitioner`` (contiguous shards).
``dirichlet``
    Label skew: for every class, the share of each silo is drawn from Dirichlet(``alpha``).
    flwr-datasets' ``DirichletPartitioner(partition_by="label", alpha=alpha,
    min_partition_size=max(min_size, 3), self_balancing=True, shuffle=True, seed=seed)``
    on the labels in their original order; it redraws (up to 10 times) while a silo is
    smaller than the minimum. Small ``alpha`` (0.1) gives silos of a few classes each,
    large ``alpha`` (100) is close to IID.
``pathological``
    Every silo holds exactly ``classes_per_silo`` classes: flwr-datasets'
    ``PathologicalPartitioner`` (each class's images are split evenly among the silos
    that hold it), with one change: its class-to-silo assignment. Its own modes can leave
    classes unused even when ``num_silos * classes_per_silo`` is enough to cover them
    all, so here silo ``p`` holds classes ``perm[(p*k + i) % C]``, ``i < k``, for a
    permutation ``perm`` of the classes drawn from ``seed``: every class is used (and
    used equally often, within one) whenever ``num_silos * k >= C``. When it is not,
    the images of the classes no silo holds belong to no silo (a warning names them);
    this is the only kind whose silos do not cover the data set.
``quantity``
    Quantity skew with IID labels: silo ``i`` (0-based) gets a share proportional to
    ``(i + 1) ** quantity_power`` (a power law in the silo id: 0 = equal sizes, 1 =
    linear as flwr-datasets' ``LinearPartitioner``, 2 = ``SquarePartitioner``); the last
    silo is the largest. flwr-datasets' ``IdToSizeFncPartitioner`` on the labels shuffled by
    ``numpy.random.default_rng(seed).permutation`` (as ``iid``).
``domain``
    Domain (feature) skew: an IID split (as ``iid``), then each silo's images go through
    a transform, ``domains[i % len(domains)]`` for silo ``i``; with no ``domains`` given
    the cycle is ``("none", "invert", "blur")``. Transforms (:mod:`hashing.views`, :mod:`hashing.data`):

    - ``none``: the images as they are;
    - ``invert``: ``255 - x``;
    - ``blur``: a Gaussian blur, sigma = max(1, short side / 28) pixels, reflected edges;
    - ``animal-mnist``: the images are replaced by animal silhouettes of the PyPI package
      ``animal-mnist`` (10 classes of 28x28 images; install it with
      ``pip install --no-deps animal-mnist``). An image of class ``c`` becomes a random
      animal of class ``c % 10`` (resized to the data set's size, grey copied to RGB
      when needed); the labels stay, so the silo keeps the federation's label space but
      sees an unrelated kind of picture: a strong domain shift.

    ``domains`` given with another kind apply as well (label skew plus domain skew).
    Transforms need images in memory (Fashion-MNIST, digits); a folder or manifest of
    image files raises :class:`~hashing.errors.ConfigError`.

Multi-label data (labels ``(n, C)`` multi-hot) are partitioned by each image's first
label (its lowest class id); images with no label form one group of their own. Silos
keep the full multi-hot labels.

Every silo needs at least ``max(min_size, 3)`` images (3: a query, a database and a
train split); a smaller one raises :class:`~hashing.errors.DataError` naming the silo.
Everything is deterministic from ``seed``: the same config and labels give the same silos
in every process, which is what lets each ClientApp build only its own silo.

flwr-datasets (and so Flower's ``datasets``) is imported only inside the functions that
cut, so importing this module is cheap; the cut is memoised on disk beside the feature cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_path
from .cache import cache_root
from .catalogue import content_digest, fingerprint
from .config import PARTITIONERS, Config
from .data import ImageSet, Splits, load_animal_mnist, load_dataset, make_splits, subset
from .errors import ConfigError, DataError
from .views import gaussian_blur, invert

log = logging.getLogger("fedhash.silos")

ABSOLUTE_MIN_SIZE = 3  # one query, one database image, one more: make_splits' minimum

_FIX = "use fewer silos (num-silos), a larger alpha, or more images (n-images)"


def source_dataset(cfg: Config) -> ImageSet:
    """The data set a simulation partitions (and ``fedhash train`` splits): the first ``n-images`` of
    ``data`` (0: all), unreadable images skipped unless ``strict``."""
    ds = load_dataset(cfg.data, strict=cfg.strict, limit=cfg.n_images if cfg.n_images > 0 else None)
    if cfg.n_images > len(ds):
        logging.getLogger("fedhash.data").warning(
            "n-images %d is more than the %d images of %s; using all %d (give n-images 0 for all, or %d or less, to "
            "silence this)", cfg.n_images, len(ds), cfg.data, len(ds), len(ds))
    return ds


# --------------------------------------------------------------------------- silos


@dataclass(eq=False)
class Silo:
    """One silo: its own images (``ds``), splits into ``ds``, and where its images came from."""

    id: int
    name: str  # "silo-0", or "silo-2 (invert)" under a domain transform
    ds: ImageSet  # the silo's images (transformed under domain skew), named apart from the parent
    splits: Splits  # indices into ds: query, database (the rest), train (= database)
    source_ids: np.ndarray  # int64, sorted: the silo's images' indices in the parent data set
    domain: str = "none"

    _digests: list[tuple[int, str]] | None = field(default=None, repr=False)

    def content_digests(self) -> list[tuple[int, str]]:
        """(content id, sha256) of each of the silo's images, in order (:func:`hashing.catalogue.content_digest`:
        the id is 63 bits of the sha256 of its pixels); computed once, each image read once."""
        if self._digests is None:
            self._digests = [content_digest(self.ds.image(i)) for i in range(len(self.ds))]
        return self._digests

    def content_ids(self) -> np.ndarray:
        """The content id of each of the silo's images, in order."""
        return np.fromiter((i for i, _ in self.content_digests()), dtype=np.int64, count=len(self.ds))

    def content_fingerprint(self) -> str:
        """The silo's provenance: sha256 (16 hex) of its images' content ids and its domain. It says which
        images, never what they hold, and two sites with different images never share it."""
        return fingerprint(self.content_ids().tolist(), self.domain)

    def ids_fingerprint(self) -> str:
        """sha256 (16 hex) of the sample ids (positions in the parent) and the domain. Only the seed of the
        silo's DP noise draws (hashing.privacy.release) still reads it; provenance is
        :meth:`content_fingerprint`."""
        h = hashlib.sha256(np.ascontiguousarray(self.source_ids, dtype="<i8").tobytes())
        h.update(b"\0domain=" + self.domain.encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.ds)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Silo):
            return NotImplemented
        return (
            self.id == other.id and self.name == other.name and self.domain == other.domain
            and np.array_equal(self.source_ids, other.source_ids)
            and all(np.array_equal(getattr(self.splits, f), getattr(other.splits, f)) for f in ("train", "query", "database"))
            and self.splits.seed == other.splits.seed
            and self.ds.name == other.ds.name and self.ds.fingerprint() == other.ds.fingerprint()
        )

    __hash__ = None  # type: ignore[assignment]


def make_silos(ds: ImageSet, cfg: Config) -> list[Silo]:
    """Cut ``ds`` into ``num-silos`` silos (see the module docstring for the kinds)."""
    _check_domains(ds, cfg, range(cfg.num_silos))
    parts = partition_indices(ds.labels, cfg)
    return [_build_silo(ds, cfg, parts[i], i) for i in range(cfg.num_silos)]


def make_silo(ds: ImageSet, cfg: Config, silo_id: int) -> Silo:
    """Only silo ``silo_id`` (what one simulated client builds); equal to ``make_silos(ds, cfg)[silo_id]``.

    The partition itself is computed in full (it needs every label, and it raises the same
    errors for a too-small silo elsewhere), but only this silo's images are copied and transformed.
    """
    if isinstance(silo_id, bool) or not isinstance(silo_id, (int, np.integer)) or not 0 <= silo_id < cfg.num_silos:
        raise ConfigError(f"silo id {silo_id!r} is out of range: num-silos is {cfg.num_silos}, so ids run "
                          f"0..{cfg.num_silos - 1}")
    silo_id = int(silo_id)
    _check_domains(ds, cfg, [silo_id])
    parts = partition_indices(ds.labels, cfg)
    return _build_silo(ds, cfg, parts[silo_id], silo_id)


def local_silo(ds: ImageSet, name: str, *, seed: int = 0, query_frac: float = 0.1) -> Silo:
    """A real site's whole data set as its one silo (no cutting, no transform)."""
    if isinstance(query_frac, bool) or not isinstance(query_frac, (int, float)) or not math.isfinite(query_frac) \
            or not 0 < query_frac < 1:
        raise ConfigError(f"query-frac must be a number between 0 and 1 (exclusive), got {query_frac!r}")
    n = len(ds)
    if n < ABSOLUTE_MIN_SIZE:
        raise DataError(f"silo '{name}' holds {n} image(s); a silo needs at least {ABSOLUTE_MIN_SIZE}: add images")
    splits = make_splits(n, seed=int(seed), n_query=_n_query(n, query_frac))
    return Silo(id=0, name=name, ds=ds, splits=splits, source_ids=np.arange(n, dtype=np.int64), domain="none")


def _n_query(n: int, query_frac: float) -> int:
    return int(min(n - 1, max(1, round(query_frac * n))))


def _split_seed(seed: int, silo_id: int) -> int:
    return int(np.random.SeedSequence([seed, silo_id]).generate_state(1)[0])


def _check_domains(ds: ImageSet, cfg: Config, silo_ids) -> None:
    if ds.images is None:
        used = sorted({cfg.domain_of(i) for i in silo_ids} - {"none"})
        if used:
            raise ConfigError(
                f"domains {used} transform images in memory, but data set '{ds.name}' is read from image files; "
                "domain skew needs an in-memory data set (fashion-mnist, digits): choose one, or drop domains "
                "and the 'domain' partitioner"
            )


def silo_name(cfg: Config, silo_id: int) -> str:
    """The name of simulated silo ``silo_id``: "silo-0", or "silo-2 (invert)" under a domain transform."""
    domain = cfg.domain_of(silo_id)
    return f"silo-{silo_id}" + (f" ({domain})" if domain != "none" else "")


def _build_silo(ds: ImageSet, cfg: Config, ids: np.ndarray, silo_id: int) -> Silo:
    domain = cfg.domain_of(silo_id)
    sub = subset(ds, ids)
    images = sub.images
    if domain != "none":
        images = _transform(sub, domain, cfg.seed, silo_id)
    tag = silo_name(cfg, silo_id)
    silo_ds = ImageSet(
        name=f"{ds.name}|{cfg.partitioner}-seed{cfg.seed}-of{cfg.num_silos}|{tag}",
        labels=sub.labels,
        classes=list(ds.classes),
        images=images,
        paths=sub.paths,
    )
    n = len(silo_ds)
    splits = make_splits(n, seed=_split_seed(cfg.seed, silo_id), n_query=_n_query(n, cfg.query_frac))
    return Silo(id=silo_id, name=tag, ds=silo_ds, splits=splits, source_ids=np.asarray(ids, dtype=np.int64), domain=domain)


# --------------------------------------------------------------------------- cutting


def _label_keys(labels: np.ndarray) -> np.ndarray:
    """One int class key per image: the label, or for multi-hot rows the first label (no label: C)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels.astype(np.int64)
    if labels.ndim != 2:
        raise DataError(f"labels must be (n,) class ids or (n, C) multi-hot, got shape {labels.shape}")
    has = labels.astype(bool)
    keys = np.argmax(has, axis=1).astype(np.int64)
    keys[~has.any(axis=1)] = labels.shape[1]
    return keys


def _memo_path(keys: np.ndarray, cfg: Config) -> Path:
    """Where the partition of these labels under ``cfg`` is memoised on disk (beside the feature
    cache). The key holds the labels' bytes, every key
    of the config that shapes the cut, and flwr-datasets' version (its partitioners draw the cut)."""
    from importlib.metadata import PackageNotFoundError, version


    try:
        fds = version("flwr-datasets")
    except PackageNotFoundError:  # pragma: no cover - a dependency of fedhash
        fds = "?"
    what = {"format": 1, "flwr-datasets": fds, "kind": cfg.partitioner, "num_silos": cfg.num_silos,
            "alpha": cfg.alpha, "classes_per_silo": cfg.classes_per_silo, "quantity_power": cfg.quantity_power,
            "min_size": cfg.min_silo_size, "seed": cfg.seed}
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    h.update(np.ascontiguousarray(keys, dtype=np.int64).data)
    root = cache_root(cfg.cache_dir)
    return root / "partitions" / f"{h.hexdigest()[:24]}.npz"


def _memo_load(path: Path, n: int, s: int) -> tuple[list[np.ndarray], list[int]] | None:
    try:
        with np.load(path) as z:
            parts = [z[f"silo{i}"].astype(np.int64) for i in range(s)]
            unused = [int(c) for c in z["unused"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= n or len(np.unique(flat)) != len(flat)):
        return None  # not a partition of these n images: recompute (and overwrite)
    return parts, unused


def partition_indices(labels: np.ndarray, cfg: Config) -> list[np.ndarray]:
    """Indices (sorted int64) of each silo's images: disjoint, covering (see ``pathological``), deterministic from ``cfg``.

    Raises :class:`DataError` naming the silo when one would hold fewer than ``max(min_size, 3)`` images.
    The result is memoised on disk under the config's ``cache-dir`` (default: the feature cache's folder): every
    simulated silo computes the same cut, and drawing it imports flwr-datasets (and Hugging Face
    datasets), seconds per process.
    """
    keys = _label_keys(labels)
    memo = _memo_path(keys, cfg)
    hit = _memo_load(memo, len(keys), cfg.num_silos) if memo.exists() else None
    if hit is not None:
        parts, unused = hit
        _warn_unused(cfg, unused)
        return parts
    parts, unused = _partition(keys, cfg)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(memo) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, unused=np.asarray(unused, np.int64), **{f"silo{i}": p for i, p in enumerate(parts)})
    except OSError as e:  # a read-only cache only costs the next process the same computation
        log.warning("could not memoise the partition under %s (%s)", memo.parent, e)
    return parts


def _warn_unused(cfg: Config, unused) -> None:
    if cfg.partitioner == "pathological" and unused:
        warnings.warn(
            f"pathological partition: {cfg.num_silos} silos x {cfg.classes_per_silo} classes cannot hold all classes; "
            f"the images of classes {list(unused)} belong to no silo",
            stacklevel=3,
        )


def _partition(keys: np.ndarray, cfg: Config) -> tuple[list[np.ndarray], list[int]]:
    kind = cfg.partitioner
    n, s, m = len(keys), cfg.num_silos, cfg.min_silo_size
    if n < s * m:
        raise DataError(
            f"{kind} partition: {s} silos of at least {m} images need {s * m} images, the data set has {n}, "
            f"so silo-{s - 1} would hold fewer than {m}; {_FIX}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr-datasets' retry chatter; our own warnings are issued below
        if kind in ("iid", "domain"):
            parts = _iid(keys, cfg)
        elif kind == "dirichlet":
            parts = _dirichlet(keys, cfg)
        elif kind == "pathological":
            parts, unused = _pathological(keys, cfg)
        elif kind == "quantity":
            parts = _quantity(keys, cfg)
        else:  # pragma: no cover - Config checks the partitioner
            raise ConfigError(f"partitioner = {kind!r} is unknown; use one of: {', '.join(PARTITIONERS)}")
    unused = [int(c) for c in unused] if kind == "pathological" else []
    _warn_unused(cfg, unused)
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    for i, p in enumerate(parts):
        if len(p) < m:
            raise DataError(
                f"{kind} partition: silo-{i} holds {len(p)} image(s), fewer than the {m} a silo needs "
                f"(min-size); {_FIX}"
            )
    return parts, unused


def _hf_dataset(keys: np.ndarray, order: np.ndarray):
    """The table a partitioner cuts: row r has ``label`` keys[order[r]] and ``idx`` order[r] (an image id)."""
    import datasets

    # Arrow format: the partitioners read whole columns (``np.array(dataset["label"])``), which
    # the default format does row by row; the result is the same, in milliseconds.
    return datasets.Dataset.from_dict({"label": keys[order], "idx": order}).with_format("arrow")


def _read(partitioner, s: int) -> list[np.ndarray]:
    """Each partition's ``idx`` column: the image ids of each silo.

    ``load_partition`` builds each partition with ``Dataset.select``, which fingerprints its
    index list (seconds for 70,000 images); where the partitioner keeps its row assignment
    (Dirichlet, Pathological and the size partitioners do, as ``_partition_id_to_indices``)
    the same ``idx`` values are read from the table directly. The result is identical; a
    test compares it with ``load_partition``.
    """
    partitioner.num_partitions  # noqa: B018 - makes every partitioner used here compute its assignment
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(mapping, dict) and sorted(mapping) == list(range(s)):
        idx = _idx_column(partitioner.dataset)
        return [idx[np.asarray(mapping[i], dtype=np.int64)] for i in range(s)]
    return [_idx_column(partitioner.load_partition(i)) for i in range(s)]


def _idx_column(table) -> np.ndarray:
    # one batch read of the whole column (a plain ``table["idx"]`` goes row by row)
    return np.asarray(table.with_format("numpy")[:]["idx"], dtype=np.int64).reshape(-1)


def _shuffled(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


def _iid(keys: np.ndarray, cfg: Config) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    p = IidPartitioner(num_partitions=cfg.num_silos)
    p.dataset = _hf_dataset(keys, _shuffled(len(keys), cfg.seed))
    return _read(p, cfg.num_silos)


def _dirichlet(keys: np.ndarray, cfg: Config) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    def make(min_size: int):
        p = DirichletPartitioner(
            num_partitions=cfg.num_silos, partition_by="label", alpha=cfg.alpha,
            min_partition_size=min_size, self_balancing=True, shuffle=True, seed=cfg.seed,
        )
        p.dataset = _hf_dataset(keys, np.arange(len(keys), dtype=np.int64))
        return p

    try:
        return _read(make(cfg.min_silo_size), cfg.num_silos)
    except ValueError as e:
        if "attempts" not in str(e):
            raise DataError(f"dirichlet partition failed: {e}; {_FIX}") from e
        # Name the silo: the first draw (the same seed, no minimum) shows who came up short.
        sizes = [len(x) for x in _read(make(0), cfg.num_silos)]
        worst = int(np.argmin(sizes))
        raise DataError(
            f"dirichlet partition: silo-{worst} holds {sizes[worst]} image(s), fewer than the {cfg.min_silo_size} "
            f"a silo needs (min-size), and 10 more Dirichlet draws (alpha={cfg.alpha:g}, {cfg.num_silos} silos, "
            f"{len(keys)} images) did not fix it; {_FIX}"
        ) from e


def _pathological(keys: np.ndarray, cfg: Config) -> tuple[list[np.ndarray], list[int]]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    classes = sorted(int(c) for c in np.unique(keys))
    c, k, s = len(classes), cfg.classes_per_silo, cfg.num_silos
    if k > c:
        raise ConfigError(f"classes-per-silo = {k} is more than the {c} classes the data set holds; use 1..{c}")
    perm = [classes[j] for j in np.random.default_rng(cfg.seed).permutation(c)]
    assignment = {p: [perm[(p * k + i) % c] for i in range(k)] for p in range(s)}

    class _Covering(PathologicalPartitioner):
        """PathologicalPartitioner whose class-to-silo assignment covers every class when it can."""

        def _determine_partition_id_to_unique_labels(self) -> None:
            self._unique_labels = sorted(self.dataset.unique(self._partition_by))
            for pid in range(self._num_partitions):
                self._partition_id_to_unique_labels[pid] = list(assignment[pid])

    part = _Covering(num_partitions=s, partition_by="label", num_classes_per_partition=k, shuffle=True, seed=cfg.seed)
    part.dataset = _hf_dataset(keys, np.arange(len(keys), dtype=np.int64))
    try:
        parts = _read(part, s)
    except ValueError as e:
        raise DataError(f"pathological partition: {e}; use fewer silos (num-silos), fewer classes-per-silo, or more images") from e
    used = {x for labs in assignment.values() for x in labs}
    return parts, [x for x in classes if x not in used]


def _quantity(keys: np.ndarray, cfg: Config) -> list[np.ndarray]:
    from flwr_datasets.partitioner.id_to_size_fnc_partitioner import IdToSizeFncPartitioner

    power = cfg.quantity_power
    p = IdToSizeFncPartitioner(num_partitions=cfg.num_silos, partition_id_to_size_fn=lambda ids: np.power(ids, power))
    p.dataset = _hf_dataset(keys, _shuffled(len(keys), cfg.seed))
    try:
        return _read(p, cfg.num_silos)
    except ValueError as e:
        sizes = [int(p.partition_id_to_size.get(i, 0)) for i in range(cfg.num_silos)]
        worst = int(np.argmin(sizes)) if sizes else 0
        raise DataError(
            f"quantity partition: silo-{worst} would hold {sizes[worst] if sizes else 0} image(s) "
            f"(quantity-power={power:g}); use fewer silos, a smaller quantity-power, or more images"
        ) from e


# --------------------------------------------------------------------------- domain transforms


def _transform(sub: ImageSet, domain: str, seed: int, silo_id: int) -> np.ndarray:
    x = sub.images
    if domain == "invert":
        return invert(x)
    if domain == "blur":
        return gaussian_blur(x, sigma=max(1.0, min(x.shape[1], x.shape[2]) / 28.0))
    if domain == "animal-mnist":
        return _animal_images(_label_keys(sub.labels), x.shape, seed, silo_id)
    raise ConfigError(f"domains: {domain!r} is unknown")  # pragma: no cover - Config checks the names


def _animal_images(keys: np.ndarray, shape: tuple[int, ...], seed: int, silo_id: int) -> np.ndarray:
    ax, ay = load_animal_mnist()
    n_cls = int(ay.max()) + 1
    rng = np.random.default_rng([seed, silo_id, 0xA11])
    pick = np.empty(len(keys), dtype=np.int64)
    for c in np.unique(keys):
        where = np.nonzero(keys == c)[0]
        pool = np.nonzero(ay == int(c) % n_cls)[0]
        pick[where] = rng.choice(pool, size=len(where), replace=len(where) > len(pool))
    imgs = ax[pick]
    h, w = shape[1], shape[2]
    if imgs.shape[1:] != (h, w):
        from PIL import Image

        imgs = np.stack([np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR)) for a in imgs])
    if len(shape) == 4:
        imgs = np.repeat(imgs[..., None], shape[3], axis=-1)
    return np.ascontiguousarray(imgs, dtype=np.uint8)


# --------------------------------------------------------------------------- reports


def label_histogram(silos: Sequence[Silo]) -> np.ndarray:
    """``(num_silos, C)`` image counts per class (multi-label: images carrying each class)."""
    if not silos:
        return np.zeros((0, 0), dtype=np.int64)
    c = max(len(s.ds.classes) for s in silos)
    rows = []
    for s in silos:
        lab = np.asarray(s.ds.labels)
        if lab.ndim == 2:
            row = lab.astype(np.int64).sum(axis=0)
        else:
            row = np.bincount(lab.astype(np.int64), minlength=c)
        rows.append(row)
    width = max(c, max(len(r) for r in rows))
    return np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(np.int64)
