"""Data sets and splits.

An :class:`ImageSet` is a list of images with labels: either held in memory as a
uint8 array (Fashion-MNIST, scikit-learn digits) or as image files on disk (a
user's folder or CSV manifest). Labels are class ids ``(n,)`` or, for
multi-label data, a multi-hot matrix ``(n, C)``.
"""
from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

log = logging.getLogger("fedhash.data")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class ImageSet:
    name: str
    labels: np.ndarray  # (n,) int64 class ids, or (n, C) uint8 multi-hot
    classes: list[str]
    images: np.ndarray | None = None  # (n, H, W) or (n, H, W, 3) uint8, in memory
    paths: list[str] | None = None  # image files, when on disk
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __post_init__(self) -> None:
        n = len(self.images) if self.images is not None else len(self.paths or [])
        if n == 0:
            raise DataError(f"data set '{self.name}' holds no images; point it at a folder or manifest with images")
        if len(self.labels) != n:
            raise DataError(f"data set '{self.name}': {n} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    @property
    def grayscale(self) -> bool:
        return self.images is not None and self.images.ndim == 3

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 (H, W) or (H, W, 3)."""
        if self.images is not None:
            return self.images[i]
        return _read_rgb(self.paths[i])

    def fingerprint(self) -> str:
        """Identity of the content: pixel bytes in memory; path, size and mtime on disk."""
        h = hashlib.sha256(self.name.encode())
        if self.images is not None:
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).data)
        else:
            for p in self.paths:
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(np.ascontiguousarray(self.labels).data)
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------- loaders


def load_dataset(spec: str, *, strict: bool = False, limit: int | None = None, check: bool = True) -> ImageSet:
    """One door to every data source.

    ``spec`` is ``fashion-mnist`` (Debian's ``dataset-fashion-mnist``), ``digits``, a folder of IDX
    files (Fashion-MNIST or MNIST anywhere else), a folder of ``class_name/*.png|jpg``, or a CSV
    manifest ``path,labels``. ``check=False`` lists image files without decoding them (whoever reads
    them next must handle an unreadable one: the index does, reading each file once).
    """
    if spec in ("fashion-mnist", "fashion_mnist", "fmnist"):
        ds = load_idx_folder(FASHION_MNIST_DIR, name="fashion-mnist")
    elif spec in ("digits", "sklearn-digits"):
        ds = load_digits()
    else:
        p = Path(spec)
        if not p.exists():
            raise DataError(
                f"data '{spec}' is neither a known data set (fashion-mnist, digits) nor an existing folder or manifest"
            )
        if p.is_file():
            ds = load_manifest(p, strict=strict, check=check)
        elif _idx_files(p):
            ds = load_idx_folder(p)
        else:
            ds = load_folder(p, strict=strict, check=check)
    if limit is not None and limit < len(ds):
        ds = subset(ds, np.arange(limit))
    return ds


def subset(ds: ImageSet, idx: np.ndarray) -> ImageSet:
    idx = np.asarray(idx)
    return ImageSet(
        name=f"{ds.name}[{len(idx)}]",
        labels=ds.labels[idx],
        classes=ds.classes,
        images=ds.images[idx] if ds.images is not None else None,
        paths=[ds.paths[i] for i in idx] if ds.paths is not None else None,
        skipped=list(ds.skipped),
    )


def _idx_files(folder: Path) -> dict[str, Path]:
    found = {}
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        for cand in (folder / f"{stem}.gz", folder / stem):
            if cand.exists():
                found[stem] = cand
                break
    return found if len(found) == 4 else {}


_IDX_READ: dict[tuple, np.ndarray] = {}  # (path, size, mtime) -> its array, read-only: see read_idx
_IDX_KEEP = 8  # two data sets' four files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or raw) into a read-only NumPy array.

    Kept per process while the file's size and mtime stay the same: a simulated silo loads its data set for
    every message it answers (a process holds a few silos' data at a time), and decompressing Fashion-MNIST
    took 0.27 s of every such load (BENCHMARKS.md, "200 silos with sampling")."""
    try:
        st = os.stat(path)
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    except OSError as e:
        raise _unreadable_idx(path, e) from e
    hit = _IDX_READ.get(key)
    if hit is None:
        hit = _read_idx(path)
        hit.setflags(write=False)
        _IDX_READ[key] = hit
        while len(_IDX_READ) > _IDX_KEEP:
            _IDX_READ.pop(next(iter(_IDX_READ)))
    return hit


def _read_idx(path: str | os.PathLike) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape)  # read-only, over the bytes read: read_idx keeps it as it is
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise _unreadable_idx(path, e) from e


def _unreadable_idx(path: str | os.PathLike, e: Exception) -> DataError:
    return DataError(f"cannot read IDX file {path}: {e}; re-install it (apt-get install --reinstall "
                     "dataset-fashion-mnist)")


def load_idx_folder(folder: str | os.PathLike, name: str | None = None) -> ImageSet:
    """Fashion-MNIST (or MNIST) IDX files: train then test images, 70,000 in all."""
    folder = Path(folder)
    files = _idx_files(folder)
    if not files:
        raise DataError(
            f"no IDX files (train-images-idx3-ubyte[.gz] ...) in {folder}; "
            "install Debian's dataset-fashion-mnist or pass a folder that holds them"
        )
    x = np.concatenate([read_idx(files["train-images-idx3-ubyte"]), read_idx(files["t10k-images-idx3-ubyte"])])
    y = np.concatenate([read_idx(files["train-labels-idx1-ubyte"]), read_idx(files["t10k-labels-idx1-ubyte"])])
    classes = FASHION_MNIST_CLASSES if int(y.max()) < 10 else [str(c) for c in range(int(y.max()) + 1)]
    return ImageSet(name=name or f"idx:{folder}", labels=y.astype(np.int64), classes=classes, images=x)


def load_digits() -> ImageSet:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to uint8."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return ImageSet(name="digits", labels=d.target.astype(np.int64), classes=[str(c) for c in range(10)], images=images)


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _check_images(paths: list[str], strict: bool, source: str) -> tuple[list[int], list[tuple[str, str]]]:
    """Decode every image once; return the indices that read and the (path, reason) of those that did not."""
    from PIL import Image

    ok, bad = [], []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im.load()
                if im.width < 1 or im.height < 1:
                    raise ValueError("empty image")
            ok.append(i)
        except Exception as e:  # PIL raises many types for bad files
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if strict:
                raise DataError(f"unreadable image {p} ({reason}); remove or replace it, or drop --strict to skip it") from e
            bad.append((p, reason))
    if not ok:
        raise DataError(f"{source}: none of its {len(paths)} images could be read; check the files")
    return ok, bad


def _finish(name: str, paths: list[str], label_sets: list[list[str]], strict: bool, check: bool = True) -> ImageSet:
    ok, bad = _check_images(paths, strict, name) if check else (list(range(len(paths))), [])
    paths = [paths[i] for i in ok]
    label_sets = [label_sets[i] for i in ok]
    classes = sorted({c for ls in label_sets for c in ls})
    col = {c: j for j, c in enumerate(classes)}
    if all(len(ls) == 1 for ls in label_sets):
        labels = np.array([col[ls[0]] for ls in label_sets], dtype=np.int64)
    else:
        labels = np.zeros((len(paths), len(classes)), dtype=np.uint8)
        for i, ls in enumerate(label_sets):
            labels[i, [col[c] for c in ls]] = 1
    if bad:
        log.warning("%s: skipped %d unreadable image(s), first: %s (%s); use --strict to stop instead",
                    name, len(bad), bad[0][0], bad[0][1])
    return ImageSet(name=name, labels=labels, classes=classes, paths=paths, skipped=bad)


def load_folder(folder: str | os.PathLike, *, strict: bool = False, check: bool = True) -> ImageSet:
    """A folder of ``class_name/*.png|jpg``."""
    folder = Path(folder)
    paths, label_sets = [], []
    for cls_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(f))
                label_sets.append([cls_dir.name])
    if not paths:
        raise DataError(f"folder {folder} holds no images in class sub-folders (expected {folder}/<class>/*.png|jpg)")
    return _finish(f"folder:{folder}", paths, label_sets, strict, check)


def load_manifest(path: str | os.PathLike, *, strict: bool = False, check: bool = True) -> ImageSet:
    """A CSV manifest with a header ``path,labels``; ``;`` separates labels; relative paths start at the manifest's folder."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read manifest {path}: {e}") from e
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "labels"]:
        raise DataError(f"manifest {path}: the first line must be the header 'path,labels'")
    paths, label_sets, missing = [], [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise DataError(f"manifest {path} line {lineno}: expected 2 columns 'path,labels', got {len(row)}")
        p, labs = row[0].strip(), [s.strip() for s in row[1].split(";")]
        if not p:
            raise DataError(f"manifest {path} line {lineno}: the path is empty; write 'path,labels'")
        if not any(labs):
            raise DataError(f"manifest {path} line {lineno}: no label for {p}; give at least one (';' separates several)")
        if not all(labs):
            raise DataError(f"manifest {path} line {lineno}: the labels {row[1]!r} of {p} hold an empty label; "
                            "separate labels by exactly one ';' (e.g. 0;1)")
        if len(set(labs)) != len(labs):
            raise DataError(f"manifest {path} line {lineno}: the labels {row[1]!r} of {p} name a label twice; "
                            "list each label once")
        full = p if os.path.isabs(p) else str(path.parent / p)
        if not os.path.exists(full):
            missing.append(p)
        paths.append(full)
        label_sets.append(labs)
    if not paths:
        raise DataError(f"manifest {path} lists no images")
    if missing:
        raise DataError(
            f"manifest {path}: {len(missing)} of {len(paths)} paths do not exist (first: {missing[0]}); "
            f"fix them (relative paths are read from {path.parent})"
        )
    return _finish(f"manifest:{path}", paths, label_sets, strict, check)


ANIMAL_MNIST_INSTALL = "pip install --no-deps animal-mnist"


@functools.lru_cache(maxsize=1)
def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST's (10,000 images 28x28 uint8, labels 0..9) from the installed package's gzipped pickles.

    The package is not imported (its loaders import TensorFlow): its data files are read directly.
    """
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


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """Indices into an ImageSet. ``train`` is drawn from ``database``; ``query`` is disjoint from both."""

    train: np.ndarray
    query: np.ndarray
    database: np.ndarray
    seed: int

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "query": self.query, "database": self.database, "seed": np.array(self.seed)}


def make_splits(n: int, *, seed: int = 0, n_query: int | None = None, n_train: int | None = None) -> Splits:
    """Deterministic train / query / database split of ``n`` items from ``seed``.

    Query: ``n_query`` items (default min(1000, n // 10)); database: the rest;
    train: ``n_train`` items of the database (default all of it).
    """
    if n < 3:
        raise DataError(f"need at least 3 images to split into train, query and database, got {n}")
    n_query = min(1000, max(1, n // 10)) if n_query is None else int(n_query)
    if not 0 < n_query < n:
        raise DataError(f"n_query={n_query} must be between 1 and {n - 1} for {n} images")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    query = np.sort(perm[:n_query])
    database = np.sort(perm[n_query:])
    n_db = len(database)
    n_train = n_db if n_train is None else min(int(n_train), n_db)
    train = np.sort(rng.choice(database, size=n_train, replace=False)) if n_train < n_db else database.copy()
    return Splits(train=train, query=query, database=database, seed=seed)
