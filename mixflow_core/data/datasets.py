"""Datasets as in-memory tensors with fixed train / validation / test splits.

Images are integer quantisation levels (uint8: 0..16 for digits, 0..255 for Fashion-MNIST
and CIFAR-10), which is what MixtureFlow expects; toy2d is continuous (levels None).

- ``digits``: scikit-learn's load_digits (ships with sklearn; offline default), vectors (64,).
- ``fashion-mnist``: idx files from `root` (also root/FashionMNIST/raw), else from
  /usr/share/datasets/fashion-mnist (Debian: apt-get install dataset-fashion-mnist);
  torchvision downloads only when asked. Images (1, 28, 28).
- ``cifar10``: the python pickles of torchvision's CIFAR10 layout (root/cifar-10-batches-py),
  downloaded by torchvision only when asked. Images (3, 32, 32).
- ``toy2d``: two interleaved moons (sklearn), continuous 2-D points.

``DataConfig.classes`` keeps a subset of the classes (by name or label), relabelled 0..K'-1 in
the order given, in every split; the kept classes' splits are those of the full data set.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["DataConfig", "Splits", "load_data", "DEBIAN_FASHION_MNIST", "DatasetNotFoundError", "CLASS_NAMES",
           "resolve_classes", "classes_tag"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CLASS_NAMES: dict[str, tuple[str, ...]] = {  # every data set's class names: label k is name k
    "digits": tuple(str(i) for i in range(10)),
    "fashion-mnist": FASHION_CLASSES,
    "cifar10": CIFAR_CLASSES,
    "toy2d": ("upper moon", "lower moon"),
}


def resolve_classes(classes: Sequence[str | int], names: Sequence[str]) -> tuple[int, ...]:
    """The original labels of `classes`, in the order given.

    Args:
        classes: class names (as in `names`; matched case-insensitively when no name matches exactly)
            or integer labels 0..K-1, mixed freely.
        names: the data set's class names, label k = names[k].

    Returns:
        One label per entry of `classes`.

    Raises:
        ValueError: an entry is neither a known name nor a label (the message lists the valid names),
            two entries are the same class, fewer than 2 classes are chosen, or `classes` is not a list.
    """
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise ValueError(f"classes must be a list of class names or labels, got {classes!r}")
    names = tuple(names)
    folded: dict[str, int] = {}
    for k, name in enumerate(names):
        folded.setdefault(name.casefold(), k)
    valid = f"one of {', '.join(map(repr, names))} or a label 0..{len(names) - 1}"
    labels = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (str, int)):
            raise ValueError(f"classes: {c!r} is neither a class name nor an integer label; use {valid}")
        if isinstance(c, int):
            if not 0 <= c < len(names):
                raise ValueError(f"classes: unknown label {c}; use {valid}")
            labels.append(c)
        elif c in names:
            labels.append(names.index(c))
        elif c.casefold() in folded:
            labels.append(folded[c.casefold()])
        else:
            raise ValueError(f"classes: unknown class {c!r}; use {valid}")
    repeated = sorted({names[k] for k in labels if labels.count(k) > 1})
    if repeated:
        raise ValueError(f"classes: {', '.join(map(repr, repeated))} chosen more than once in {list(classes)!r}")
    if len(labels) < 2:
        raise ValueError(f"classes: a classifier needs at least 2 classes, got {list(classes)!r}")
    return tuple(labels)


def classes_tag(name: str, classes: Sequence[str | int] | None) -> str:
    """A directory-name suffix for a class subset: "" for all classes, else "-classes" + "-<label>" per class.

    The original labels, in the order given (so the tag says which classes and which relabelling), e.g.
    classes_tag("fashion-mnist", ["shirt", "T-shirt/top", "pullover"]) == "-classes-6-0-2".
    """
    if classes is None:
        return ""
    return "-classes" + "".join(f"-{k}" for k in resolve_classes(classes, CLASS_NAMES[name]))


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing or malformed; the message says where we looked and how to get them."""


@dataclass(frozen=True)
class DataConfig:
    """Which data, where from, and how it is split."""

    name: Literal["digits", "fashion-mnist", "cifar10", "toy2d"] = "digits"
    root: str | None = None  # directory with the dataset files (fashion-mnist, cifar10)
    download: bool = False  # let torchvision download fashion-mnist / cifar10 into `root`
    seed: int = 0  # seed of the split (and of toy2d's points)
    val_fraction: float = 0.1  # of the training data, stratified
    test_fraction: float = 0.2  # digits / toy2d only (the others have official test sets)
    train_limit: int | None = None  # keep at most this many training examples (stratified), e.g. smoke runs
    test_limit: int | None = None  # evaluate on at most this many test examples (stratified), for cheap CPU studies
    toy_n: int = 2000  # toy2d: number of points
    toy_noise: float = 0.1  # toy2d: moons noise
    classes: tuple[str | int, ...] | None = None  # keep only these classes (names or labels), relabelled 0..K'-1

    def __post_init__(self) -> None:
        if self.name not in ("digits", "fashion-mnist", "cifar10", "toy2d"):
            raise ValueError(f"Unknown dataset {self.name!r}; use digits, fashion-mnist, cifar10 or toy2d")
        if not 0 < self.val_fraction < 1 or not 0 < self.test_fraction < 1:
            raise ValueError(f"val_fraction and test_fraction must lie in (0, 1): {self}")
        if self.classes is not None:
            resolve_classes(self.classes, CLASS_NAMES[self.name])  # fail here, not when the data are loaded
            object.__setattr__(self, "classes", tuple(self.classes))  # a list (as JSON has it) becomes a tuple


@dataclass
class Splits:
    """Train / validation / test TensorDatasets of (x, y) plus what a model needs to know."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    data_shape: tuple[int, ...]
    num_classes: int
    levels: int | None  # quantisation levels; None for continuous data
    class_names: tuple[str, ...]

    def class_counts(self) -> Tensor:
        """Training examples per class, (K,)."""
        return torch.bincount(self.train.tensors[1], minlength=self.num_classes)


def _stratified_split(y: np.ndarray, fraction: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted indices; `fraction` held out (float) or that many examples (int)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    keep, held = train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)
    return np.sort(keep), np.sort(held)


def _to_splits(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    cfg: DataConfig, levels: int | None, class_names: tuple[str, ...],
) -> Splits:
    """Train / val / test from a training pool and a test set: class subset, then limits, then the val split.

    With cfg.classes the kept classes' examples are exactly the ones they have without it (the val
    split is drawn from the whole pool, then restricted), unless train_limit / test_limit cut the
    subset: the limits count examples of the kept classes. Stratification uses the original labels,
    so the order of cfg.classes changes the labels only.
    """
    relabel = np.arange(len(class_names))  # original label -> new label; -1: a class left out
    if cfg.classes is not None:
        kept = resolve_classes(cfg.classes, class_names)
        relabel = np.full(len(class_names), -1)
        relabel[list(kept)] = np.arange(len(kept))
        class_names = tuple(class_names[k] for k in kept)
    pool = np.flatnonzero(relabel[y_train] >= 0)  # the kept classes' training examples
    test = np.flatnonzero(relabel[y_test] >= 0)
    if cfg.train_limit is not None and cfg.train_limit < len(pool):
        # an int count, not 1 - limit / n: sklearn rounds a float test size up, keeping limit - 1
        keep, _ = _stratified_split(y_train[pool], len(pool) - cfg.train_limit, cfg.seed)
        pool = pool[keep]
        fit, val = _stratified_split(y_train[pool], cfg.val_fraction, cfg.seed)
        fit_idx, val_idx = pool[fit], pool[val]
    else:  # the whole pool's split, restricted to the kept classes (all of them without cfg.classes)
        fit_idx, val_idx = _stratified_split(y_train, cfg.val_fraction, cfg.seed)
        fit_idx, val_idx = fit_idx[relabel[y_train[fit_idx]] >= 0], val_idx[relabel[y_train[val_idx]] >= 0]
    if cfg.test_limit is not None and cfg.test_limit < len(test):
        _, keep = _stratified_split(y_test[test], cfg.test_limit, cfg.seed)
        test = test[keep]

    def ds(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> TensorDataset:
        x = x if len(idx) == len(x) else x[idx]  # idx sorted: all of them means x as it is, not a copy
        labels = relabel[y[idx]].astype(np.int64)
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels))

    return Splits(
        train=ds(x_train, y_train, fit_idx),
        val=ds(x_train, y_train, val_idx),
        test=ds(x_test, y_test, test),
        data_shape=tuple(x_train.shape[1:]),
        num_classes=len(class_names),
        levels=levels,
        class_names=class_names,
    )


def _split_off_test(x: np.ndarray, y: np.ndarray, cfg: DataConfig, levels: int | None, names: tuple[str, ...]) -> Splits:
    train_idx, test_idx = _stratified_split(y, cfg.test_fraction, cfg.seed)
    return _to_splits(x[train_idx], y[train_idx], x[test_idx], y[test_idx], cfg, levels, names)


# -- digits / toy2d ------------------------------------------------------------------------
def _digits(cfg: DataConfig) -> Splits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.uint8)  # (1797, 64), levels 0..16
    return _split_off_test(x, d.target, cfg, 17, CLASS_NAMES["digits"])


def _toy2d(cfg: DataConfig) -> Splits:
    from sklearn.datasets import make_moons

    x, y = make_moons(cfg.toy_n, noise=cfg.toy_noise, random_state=cfg.seed)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    return _split_off_test(x, y, cfg, None, CLASS_NAMES["toy2d"])


# -- Fashion-MNIST ------------------------------------------------------------------------
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally .gz): magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:  # not gzip, or a truncated gzip stream
        raise DatasetNotFoundError(f"{path} is truncated or not gzip: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetNotFoundError(f"{path} is not a uint8 idx file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetNotFoundError(f"{path} is truncated: header of {ndim} dims cut short")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetNotFoundError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims).copy()  # frombuffer is read-only; torch wants writable memory


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _fashion_mnist(cfg: DataConfig) -> Splits:
    if cfg.download:
        if cfg.root is None:
            raise ValueError("download=True needs a root directory to download into")
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(cfg.root, train=train, download=True)
    roots = [Path(cfg.root)] if cfg.root is not None else [DEBIAN_FASHION_MNIST]
    dirs = [p for r in roots for p in (r, r / "FashionMNIST" / "raw")]
    arrays = {}
    for key, stem in _FASHION_FILES.items():
        path = _find_idx(dirs, stem)
        if path is None:
            raise DatasetNotFoundError(
                f"Fashion-MNIST file {stem}[.gz] not found in {', '.join(map(str, dirs))}. Get it with "
                f"`apt-get install dataset-fashion-mnist` (files land in {DEBIAN_FASHION_MNIST}) or pass "
                "root=<dir> with download=True (needs internet)."
            )
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y) or y.max() > 9:
            raise DatasetNotFoundError(f"Fashion-MNIST {split} files are malformed: images {x.shape}, labels {y.shape}")
    return _to_splits(
        arrays["train_x"][:, None], arrays["train_y"], arrays["test_x"][:, None], arrays["test_y"], cfg, 256, FASHION_CLASSES
    )


# -- CIFAR-10 -------------------------------------------------------------------------------
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


def _read_cifar_batches(folder: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DatasetNotFoundError(
                f"CIFAR-10 file {path} not found. Pass root=<dir> containing {_CIFAR_DIR}/ (torchvision's "
                "layout), or root=<dir> with download=True (needs internet)."
            )
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as err:  # any unpickling or key problem means the file is not a CIFAR batch
            raise DatasetNotFoundError(f"CIFAR-10 file {path} is malformed: {err}") from err
        bad_labels = labels.ndim != 1 or (labels.size > 0 and (labels.min() < 0 or labels.max() > 9))
        if bad_labels or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise DatasetNotFoundError(f"CIFAR-10 file {path} is malformed: data {data.shape}, labels {labels.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _cifar10(cfg: DataConfig) -> Splits:
    if cfg.root is None:
        raise DatasetNotFoundError("CIFAR-10 needs root=<dir> (containing cifar-10-batches-py/, or to download into)")
    if cfg.download:
        from torchvision.datasets import CIFAR10

        CIFAR10(cfg.root, train=True, download=True)
    folder = Path(cfg.root) / _CIFAR_DIR
    x_train, y_train = _read_cifar_batches(folder, _CIFAR_TRAIN)
    x_test, y_test = _read_cifar_batches(folder, _CIFAR_TEST)
    return _to_splits(x_train, y_train, x_test, y_test, cfg, 256, CIFAR_CLASSES)


_LOADERS = {"digits": _digits, "toy2d": _toy2d, "fashion-mnist": _fashion_mnist, "cifar10": _cifar10}


def load_data(cfg: DataConfig = DataConfig()) -> Splits:
    """Train / validation / test splits for `cfg` (never touches the network unless cfg.download).

    Args:
        cfg: which dataset (digits, fashion-mnist, cifar10, toy2d), where its files are, the split seed and sizes,
            and optionally which classes to keep (cfg.classes, relabelled 0..K'-1 in that order).

    Returns:
        Splits: train / val / test TensorDatasets of integer levels (uint8; float32 points for
        toy2d) and int64 labels, with data_shape, levels, class_names.

    Raises:
        DatasetNotFoundError: the files are missing or malformed (the message says where it looked).

    Example:
        >>> from mixflow_core.data import DataConfig, load_data
        >>> digits = load_data(DataConfig("digits"))  # ships with scikit-learn
        >>> digits.data_shape, digits.levels, digits.num_classes, len(digits.train), len(digits.val), len(digits.test)
        ((64,), 17, 10, 1293, 144, 360)
    """
    return _LOADERS[cfg.name](cfg)
