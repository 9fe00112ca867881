"""Silo partitions for simulations: one data set cut into the data silos of a federation.

A :class:`PartitionSpec` says how; :func:`make_silos` cuts an :class:`~hashing.data.ImageSet`
into :class:`Silo` objects (each with its own images, query/database splits and the ids of
its images in the parent), and :func:`make_silo` builds just one of them, as a ClientApp in
a simulation does. A real site, with its own data, is :func:`local_silo`.

Kinds (``PartitionSpec.kind``, config key ``partitioner``):

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
    the cycle is ``("none", "invert", "blur")``. Transforms:

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
Everything is deterministic from ``seed``: the same spec and labels give the same silos
in every process, which is what lets each ClientApp build only its own silo.

flwr-datasets (and so Flower's ``datasets``) is imported only inside the functions that
cut, so importing this module is cheap.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hashing.atomic import atomic_path
from hashing.data import ImageSet, Splits, make_splits, subset
from hashing.errors import ConfigError, DataError

log = logging.getLogger("fedhash.partitions")

KINDS = ("iid", "dirichlet", "pathological", "quantity", "domain")
DOMAINS = ("none", "invert", "blur", "animal-mnist")
DEFAULT_DOMAINS = ("none", "invert", "blur")
ABSOLUTE_MIN_SIZE = 3  # one query, one database image, one more: make_splits' minimum

_FIX = "use fewer silos (num-silos), a larger alpha, or more images (n-images)"


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class PartitionSpec:
    """How to cut a data set into silos; validated on construction (:class:`ConfigError` naming the config key)."""

    kind: str = "dirichlet"
    num_silos: int = 5
    alpha: float = 0.3  # dirichlet concentration
    classes_per_silo: int = 2  # pathological
    quantity_power: float = 1.0  # quantity: silo i gets a share proportional to (i + 1) ** quantity_power
    domains: tuple[str, ...] = ()  # per-silo transforms, cycled; see the module docstring
    min_size: int = 10  # smallest acceptable silo (never below 3)
    query_frac: float = 0.1  # each silo's query split
    seed: int = 0

    def __post_init__(self) -> None:
        kind = str(self.kind).strip().lower()
        if kind not in KINDS:
            raise ConfigError(f"partitioner = {self.kind!r} is unknown; use one of: {', '.join(KINDS)}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "domains", _parse_domains(self.domains))
        if isinstance(self.num_silos, bool) or not isinstance(self.num_silos, (int, np.integer)) or self.num_silos < 1:
            raise ConfigError(f"num-silos must be an integer of at least 1, got {self.num_silos!r}")
        if not _finite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a number above 0 (0.1: strong label skew, 100: nearly IID), got {self.alpha!r}")
        if isinstance(self.classes_per_silo, bool) or not isinstance(self.classes_per_silo, (int, np.integer)) \
                or self.classes_per_silo < 1:
            raise ConfigError(f"classes-per-silo must be an integer of at least 1, got {self.classes_per_silo!r}")
        if not _finite(self.quantity_power) or self.quantity_power < 0:
            raise ConfigError(f"quantity-power must be a number of at least 0 (0: equal sizes), got {self.quantity_power!r}")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)) or self.min_size < 0:
            raise ConfigError(f"min-size must be an integer of at least 0, got {self.min_size!r}")
        if not _finite(self.query_frac) or not 0 < self.query_frac < 1:
            raise ConfigError(f"query-frac must be a number between 0 and 1 (exclusive), got {self.query_frac!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ConfigError(f"seed must be an integer of at least 0, got {self.seed!r}")
        for f in ("num_silos", "classes_per_silo", "min_size", "seed"):
            object.__setattr__(self, f, int(getattr(self, f)))
        for f in ("alpha", "quantity_power", "query_frac"):
            object.__setattr__(self, f, float(getattr(self, f)))

    @property
    def min_silo_size(self) -> int:
        return max(self.min_size, ABSOLUTE_MIN_SIZE)

    def domain_of(self, silo_id: int) -> str:
        """The transform silo ``silo_id`` gets: ``domains`` cycled (the default cycle under ``domain``), else ``none``."""
        cycle = self.domains or (DEFAULT_DOMAINS if self.kind == "domain" else ())
        return cycle[silo_id % len(cycle)] if cycle else "none"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_domains(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items = [s for s in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"domains must be a list or a comma-separated string of {', '.join(DOMAINS)}; got {value!r}")
    out = []
    for s in items:
        if not isinstance(s, str):
            raise ConfigError(f"domains must hold names ({', '.join(DOMAINS)}), got {s!r}")
        s = s.strip().lower().replace("_", "-")
        if not s:
            continue
        if s not in DOMAINS:
            raise ConfigError(f"domains: {s!r} is unknown; use names from: {', '.join(DOMAINS)}")
        out.append(s)
    return tuple(out)


_CONFIG_KEYS = {
    "partitioner": "kind",
    "num-silos": "num_silos",
    "alpha": "alpha",
    "classes-per-silo": "classes_per_silo",
    "quantity-power": "quantity_power",
    "domains": "domains",
    "min-size": "min_size",
    "query-frac": "query_frac",
    "seed": "seed",
}
_INT_FIELDS = {"num_silos", "classes_per_silo", "min_size", "seed"}
_FLOAT_FIELDS = {"alpha", "quantity_power", "query_frac"}


def spec_from_config(cfg: Mapping) -> PartitionSpec:
    """A :class:`PartitionSpec` from a flat config (a Flower run config, a scenario's table).

    Keys in kebab- or snake-case: ``partitioner`` (the kind), ``num-silos``, ``alpha``,
    ``classes-per-silo``, ``quantity-power``, ``domains`` (a list or a comma string),
    ``min-size``, ``query-frac``, ``seed``. Missing keys take the defaults; other keys are
    ignored (a run config holds many). Numbers may be given as strings. A bad value raises
    :class:`ConfigError` naming the key.
    """
    kwargs: dict[str, Any] = {}
    for key, value in cfg.items():
        norm = str(key).strip().lower().replace("_", "-")
        field = _CONFIG_KEYS.get(norm)
        if field is None:
            continue
        if field in _INT_FIELDS:
            kwargs[field] = _as_int(norm, value)
        elif field in _FLOAT_FIELDS:
            kwargs[field] = _as_float(norm, value)
        elif field == "kind":
            if not isinstance(value, str) or value.strip().lower() not in KINDS:
                raise ConfigError(f"partitioner = {value!r} is unknown; use one of: {', '.join(KINDS)}")
            kwargs[field] = value
        else:
            kwargs[field] = value
    return PartitionSpec(**kwargs)


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{key} must be an integer, got {value!r}")


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{key} must be a number, got {value!r}")


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

    def ids_fingerprint(self) -> str:
        """sha256 (16 hex) of the sample ids and the domain: says which images, never what they hold."""
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


def make_silos(ds: ImageSet, spec: PartitionSpec, *, cache_dir: str | os.PathLike | None = None) -> list[Silo]:
    """Cut ``ds`` into ``spec.num_silos`` silos (see the module docstring for the kinds)."""
    _check_domains(ds, spec, range(spec.num_silos))
    parts = partition_indices(ds.labels, spec, cache_dir=cache_dir)
    return [_build_silo(ds, spec, parts[i], i) for i in range(spec.num_silos)]


def make_silo(ds: ImageSet, spec: PartitionSpec, silo_id: int, *, cache_dir: str | os.PathLike | None = None) -> Silo:
    """Only silo ``silo_id`` (what one simulated client builds); equal to ``make_silos(ds, spec)[silo_id]``.

    The partition itself is computed in full (it needs every label, and it raises the same
    errors for a too-small silo elsewhere), but only this silo's images are copied and transformed.
    """
    if isinstance(silo_id, bool) or not isinstance(silo_id, (int, np.integer)) or not 0 <= silo_id < spec.num_silos:
        raise ConfigError(f"silo id {silo_id!r} is out of range: num-silos is {spec.num_silos}, so ids run 0..{spec.num_silos - 1}")
    silo_id = int(silo_id)
    _check_domains(ds, spec, [silo_id])
    parts = partition_indices(ds.labels, spec, cache_dir=cache_dir)
    return _build_silo(ds, spec, parts[silo_id], silo_id)


def local_silo(ds: ImageSet, name: str, *, seed: int = 0, query_frac: float = 0.1) -> Silo:
    """A real site's whole data set as its one silo (no cutting, no transform)."""
    if not _finite(query_frac) or not 0 < query_frac < 1:
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


def _check_domains(ds: ImageSet, spec: PartitionSpec, silo_ids) -> None:
    if ds.images is None:
        used = sorted({spec.domain_of(i) for i in silo_ids} - {"none"})
        if used:
            raise ConfigError(
                f"domains {used} transform images in memory, but data set '{ds.name}' is read from image files; "
                "domain skew needs an in-memory data set (fashion-mnist, digits): choose one, or drop domains "
                "and the 'domain' partitioner"
            )


def _build_silo(ds: ImageSet, spec: PartitionSpec, ids: np.ndarray, silo_id: int) -> Silo:
    domain = spec.domain_of(silo_id)
    sub = subset(ds, ids)
    images = sub.images
    if domain != "none":
        images = _transform(sub, domain, spec.seed, silo_id)
    tag = f"silo-{silo_id}" + (f" ({domain})" if domain != "none" else "")
    silo_ds = ImageSet(
        name=f"{ds.name}|{spec.kind}-seed{spec.seed}-of{spec.num_silos}|{tag}",
        labels=sub.labels,
        classes=list(ds.classes),
        images=images,
        paths=sub.paths,
    )
    n = len(silo_ds)
    splits = make_splits(n, seed=_split_seed(spec.seed, silo_id), n_query=_n_query(n, spec.query_frac))
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


def _memo_path(keys: np.ndarray, spec: PartitionSpec, cache_dir: str | os.PathLike | None) -> Path:
    """Where the partition of these labels under ``spec`` is memoised on disk (beside the feature
    cache). The key holds the labels' bytes, every field
    of the spec that shapes the cut, and flwr-datasets' version (its partitioners draw the cut)."""
    from importlib.metadata import PackageNotFoundError, version

    from hashing.features import cache_root

    try:
        fds = version("flwr-datasets")
    except PackageNotFoundError:  # pragma: no cover - a dependency of fedhash
        fds = "?"
    what = {"format": 1, "flwr-datasets": fds, "kind": spec.kind, "num_silos": spec.num_silos, "alpha": spec.alpha,
            "classes_per_silo": spec.classes_per_silo, "quantity_power": spec.quantity_power,
            "min_size": spec.min_silo_size, "seed": spec.seed}
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    h.update(np.ascontiguousarray(keys, dtype=np.int64).data)
    root = cache_root(cache_dir)
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


def partition_indices(labels: np.ndarray, spec: PartitionSpec, *,
                      cache_dir: str | os.PathLike | None = None) -> list[np.ndarray]:
    """Indices (sorted int64) of each silo's images: disjoint, covering (see ``pathological``), deterministic from ``spec``.

    Raises :class:`DataError` naming the silo when one would hold fewer than ``max(min_size, 3)`` images.
    The result is memoised on disk under ``cache_dir`` (default: the feature cache's folder): every
    simulated silo computes the same cut, and drawing it imports flwr-datasets (and Hugging Face
    datasets), seconds per process.
    """
    keys = _label_keys(labels)
    memo = _memo_path(keys, spec, cache_dir)
    hit = _memo_load(memo, len(keys), spec.num_silos) if memo.exists() else None
    if hit is not None:
        parts, unused = hit
        _warn_unused(spec, unused)
        return parts
    parts, unused = _partition(keys, spec)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(memo) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, unused=np.asarray(unused, np.int64), **{f"silo{i}": p for i, p in enumerate(parts)})
    except OSError as e:  # a read-only cache only costs the next process the same computation
        log.warning("could not memoise the partition under %s (%s)", memo.parent, e)
    return parts


def _warn_unused(spec: PartitionSpec, unused) -> None:
    if spec.kind == "pathological" and unused:
        warnings.warn(
            f"pathological partition: {spec.num_silos} silos x {spec.classes_per_silo} classes cannot hold all classes; "
            f"the images of classes {list(unused)} belong to no silo",
            stacklevel=3,
        )


def _partition(keys: np.ndarray, spec: PartitionSpec) -> tuple[list[np.ndarray], list[int]]:
    n, s, m = len(keys), spec.num_silos, spec.min_silo_size
    if n < s * m:
        raise DataError(
            f"{spec.kind} partition: {s} silos of at least {m} images need {s * m} images, the data set has {n}, "
            f"so silo-{s - 1} would hold fewer than {m}; {_FIX}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr-datasets' retry chatter; our own warnings are issued below
        if spec.kind in ("iid", "domain"):
            parts = _iid(keys, spec)
        elif spec.kind == "dirichlet":
            parts = _dirichlet(keys, spec)
        elif spec.kind == "pathological":
            parts, unused = _pathological(keys, spec)
        elif spec.kind == "quantity":
            parts = _quantity(keys, spec)
        else:  # pragma: no cover - PartitionSpec validates kind
            raise ConfigError(f"partitioner = {spec.kind!r} is unknown; use one of: {', '.join(KINDS)}")
    unused = [int(c) for c in unused] if spec.kind == "pathological" else []
    _warn_unused(spec, unused)
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    for i, p in enumerate(parts):
        if len(p) < m:
            raise DataError(
                f"{spec.kind} partition: silo-{i} holds {len(p)} image(s), fewer than the {m} a silo needs "
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


def _iid(keys: np.ndarray, spec: PartitionSpec) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    p = IidPartitioner(num_partitions=spec.num_silos)
    p.dataset = _hf_dataset(keys, _shuffled(len(keys), spec.seed))
    return _read(p, spec.num_silos)


def _dirichlet(keys: np.ndarray, spec: PartitionSpec) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    def make(min_size: int):
        p = DirichletPartitioner(
            num_partitions=spec.num_silos, partition_by="label", alpha=spec.alpha,
            min_partition_size=min_size, self_balancing=True, shuffle=True, seed=spec.seed,
        )
        p.dataset = _hf_dataset(keys, np.arange(len(keys), dtype=np.int64))
        return p

    try:
        return _read(make(spec.min_silo_size), spec.num_silos)
    except ValueError as e:
        if "attempts" not in str(e):
            raise DataError(f"dirichlet partition failed: {e}; {_FIX}") from e
        # Name the silo: the first draw (the same seed, no minimum) shows who came up short.
        sizes = [len(x) for x in _read(make(0), spec.num_silos)]
        worst = int(np.argmin(sizes))
        raise DataError(
            f"dirichlet partition: silo-{worst} holds {sizes[worst]} image(s), fewer than the {spec.min_silo_size} "
            f"a silo needs (min-size), and 10 more Dirichlet draws (alpha={spec.alpha:g}, {spec.num_silos} silos, "
            f"{len(keys)} images) did not fix it; {_FIX}"
        ) from e


def _pathological(keys: np.ndarray, spec: PartitionSpec) -> tuple[list[np.ndarray], list[int]]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    classes = sorted(int(c) for c in np.unique(keys))
    c, k, s = len(classes), spec.classes_per_silo, spec.num_silos
    if k > c:
        raise ConfigError(f"classes-per-silo = {k} is more than the {c} classes the data set holds; use 1..{c}")
    perm = [classes[j] for j in np.random.default_rng(spec.seed).permutation(c)]
    assignment = {p: [perm[(p * k + i) % c] for i in range(k)] for p in range(s)}

    class _Covering(PathologicalPartitioner):
        """PathologicalPartitioner whose class-to-silo assignment covers every class when it can."""

        def _determine_partition_id_to_unique_labels(self) -> None:
            self._unique_labels = sorted(self.dataset.unique(self._partition_by))
            for pid in range(self._num_partitions):
                self._partition_id_to_unique_labels[pid] = list(assignment[pid])

    part = _Covering(num_partitions=s, partition_by="label", num_classes_per_partition=k, shuffle=True, seed=spec.seed)
    part.dataset = _hf_dataset(keys, np.arange(len(keys), dtype=np.int64))
    try:
        parts = _read(part, s)
    except ValueError as e:
        raise DataError(f"pathological partition: {e}; use fewer silos (num-silos), fewer classes-per-silo, or more images") from e
    used = {x for labs in assignment.values() for x in labs}
    return parts, [x for x in classes if x not in used]


def _quantity(keys: np.ndarray, spec: PartitionSpec) -> list[np.ndarray]:
    from flwr_datasets.partitioner.id_to_size_fnc_partitioner import IdToSizeFncPartitioner

    power = spec.quantity_power
    p = IdToSizeFncPartitioner(num_partitions=spec.num_silos, partition_id_to_size_fn=lambda ids: np.power(ids, power))
    p.dataset = _hf_dataset(keys, _shuffled(len(keys), spec.seed))
    try:
        return _read(p, spec.num_silos)
    except ValueError as e:
        sizes = [int(p.partition_id_to_size.get(i, 0)) for i in range(spec.num_silos)]
        worst = int(np.argmin(sizes)) if sizes else 0
        raise DataError(
            f"quantity partition: silo-{worst} would hold {sizes[worst] if sizes else 0} image(s) "
            f"(quantity-power={power:g}); use fewer silos, a smaller quantity-power, or more images"
        ) from e


# --------------------------------------------------------------------------- domain transforms


def _transform(sub: ImageSet, domain: str, seed: int, silo_id: int) -> np.ndarray:
    x = sub.images
    if domain == "invert":
        return (255 - x).astype(np.uint8)
    if domain == "blur":
        return gaussian_blur(x, sigma=max(1.0, min(x.shape[1], x.shape[2]) / 28.0))
    if domain == "animal-mnist":
        return _animal_images(_label_keys(sub.labels), x.shape, seed, silo_id)
    raise ConfigError(f"domains: {domain!r} is unknown; use names from: {', '.join(DOMAINS)}")  # pragma: no cover


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of uint8 images ``(n, H, W)`` or ``(n, H, W, 3)`` (separable, reflected edges), as uint8."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.empty_like(images)
    for start in range(0, len(images), 2048):  # bounded float memory on large silos
        a = images[start : start + 2048].astype(np.float32)
        for axis in (1, 2):
            r = min(radius, a.shape[axis] - 1)  # reflect needs pad < size
            pad = [(0, 0)] * a.ndim
            pad[axis] = (r, r)
            padded = np.pad(a, pad, mode="reflect" if r > 0 else "edge")
            kk = kernel[radius - r : radius + r + 1]
            kk = kk / kk.sum()
            acc = np.zeros_like(a)
            for j, w in enumerate(kk):
                acc += w * np.take(padded, np.arange(j, j + a.shape[axis]), axis=axis)
            a = acc
        out[start : start + 2048] = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return out


ANIMAL_MNIST_INSTALL = "pip install --no-deps animal-mnist"


@functools.lru_cache(maxsize=1)
def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST's (10,000 images 28x28 uint8, labels 0..9) from the installed package's gzipped pickles.

    The package is not imported (its loaders import TensorFlow): its data files are read directly.
    """
    import gzip
    import importlib.util
    import pickle

    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"domain 'animal-mnist' needs the PyPI package animal-mnist, which is not installed: {ANIMAL_MNIST_INSTALL}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")
    try:
        with gzip.open(os.path.join(folder, "animal_data_version_3.gz"), "rb") as f:
            x = np.asarray(pickle.load(f))
        with gzip.open(os.path.join(folder, "animal_label_version_3.gz"), "rb") as f:
            y = np.asarray(pickle.load(f))
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise DataError(f"cannot read animal-mnist's data in {folder} ({e}); reinstall it: {ANIMAL_MNIST_INSTALL} --force-reinstall") from e
    if x.ndim != 3 or len(x) != len(y) or len(x) == 0:
        raise DataError(f"animal-mnist's data in {folder} has an unexpected shape {x.shape} / {y.shape}; reinstall it: {ANIMAL_MNIST_INSTALL}")
    return x.astype(np.uint8), y.astype(np.int64).reshape(-1)


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


def plot_partition(silos: Sequence[Silo], path, title: str | None = None) -> None:
    """Stacked bar chart of class counts per silo, written atomically as PNG."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = label_histogram(silos)
    classes = list(silos[0].ds.classes) if silos else []
    fig = Figure(figsize=(max(5.0, 0.7 * len(silos) + 3.0), 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(silos))
    bottom = np.zeros(len(silos))
    cmap = matplotlib.colormaps["tab20" if hist.shape[1] > 10 else "tab10"]
    for j in range(hist.shape[1]):
        label = classes[j] if j < len(classes) else str(j)
        ax.bar(x, hist[:, j], bottom=bottom, color=cmap(j % cmap.N), label=label, width=0.8)
        bottom += hist[:, j]
    ax.set_xticks(x)
    ax.set_xticklabels([s.name for s in silos], rotation=30 if len(silos) > 6 else 0, ha="right" if len(silos) > 6 else "center")
    ax.set_ylabel("images")
    ax.set_title(title or "class counts per silo")
    if 0 < hist.shape[1] <= 20:
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
