"""Datasets: splits partition the data (stratified, seeded), and file loaders read the exact on-disk formats.

Fashion-MNIST and CIFAR-10 are tested on small files written here in their real formats (idx, pickled
batches); only one test reads the Debian Fashion-MNIST package, and it is skipped when absent.
"""

import gzip
from dataclasses import replace
import math
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from mixflow_core import MLP, Conv, ModelConfig, build_model
from mixflow_core.data import DEBIAN_FASHION_MNIST, DataConfig, DatasetNotFoundError, Splits, load_data, read_idx

N_DIGITS = 1797


# -- helpers -----------------------------------------------------------------------------------


def examples(*datasets) -> Counter:
    """Multiset of (x bytes, label) over the given TensorDatasets."""
    return Counter((x.numpy().tobytes(), int(y)) for ds in datasets for x, y in zip(*ds.tensors))


def array_examples(x: np.ndarray, y: np.ndarray) -> Counter:
    """Multiset of (x bytes, label) of arrays as written to disk."""
    return Counter((xi.tobytes(), int(yi)) for xi, yi in zip(x, y))


def n_held(n: int, fraction: float) -> int:
    """Examples sklearn's train_test_split holds out for a float fraction."""
    return math.ceil(fraction * n)


def assert_stratified(held: torch.Tensor, y_all: np.ndarray, slack: float = 2.0) -> None:
    """Each class's count in `held` is within `slack` examples of its share of `y_all`."""
    k = int(y_all.max()) + 1
    expected = np.bincount(y_all, minlength=k) / len(y_all) * len(held)
    got = torch.bincount(held, minlength=k).numpy()
    assert np.abs(got - expected).max() <= slack, (got, expected)


def assert_same_splits(a: Splits, b: Splits) -> None:
    for part in ("train", "val", "test"):
        for ta, tb in zip(getattr(a, part).tensors, getattr(b, part).tensors):
            assert torch.equal(ta, tb)


def balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """n labels, every class 0..9 present n // 10 times (so stratified splits are possible), shuffled."""
    return rng.permutation(np.arange(n) % 10).astype(np.uint8)


def idx_bytes(a: np.ndarray) -> bytes:
    """idx format: magic 0x0000 08 ndim (uint8 data), big-endian uint32 dims, then the raw data."""
    magic = 0x00000800 | a.ndim  # 0x00000803 for (N, 28, 28) images, 0x00000801 for labels
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in a.shape)
    return header + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def write_idx(path: Path, a: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(a)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_fashion(folder: Path, gz: bool = True, n_train: int = 100, n_test: int = 20, seed: int = 0) -> dict:
    """Four Fashion-MNIST idx files of random images and balanced labels in `folder`; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": balanced_labels(n_train, rng),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": balanced_labels(n_test, rng),
    }
    names = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
    for key, name in names.items():
        write_idx(folder / name, arrays[key], gz)
    return arrays


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def write_cifar_batch(path: Path, data, labels) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"test", b"data": data, b"labels": labels, b"filenames": []}, f)


def write_cifar(root: Path, n: int = 20, seed: int = 0) -> dict:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch}: {b"data": (n, 3072) uint8, b"labels": [int]}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for name in CIFAR_TRAIN + ("test_batch",):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in balanced_labels(n, rng)]
        write_cifar_batch(folder / name, data, labels)
        xs.append(data)
        ys.append(np.array(labels))
    return {"train_x": np.concatenate(xs[:5]), "train_y": np.concatenate(ys[:5]), "test_x": xs[5], "test_y": ys[5]}


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_full() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return d.data.astype(np.uint8), d.target


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_data(DataConfig(name="digits"))


@pytest.fixture
def fashion(tmp_path) -> tuple[Path, dict]:
    return tmp_path, write_fashion(tmp_path)


@pytest.fixture
def cifar(tmp_path) -> tuple[Path, dict]:
    return tmp_path, write_cifar(tmp_path)


# -- digits ------------------------------------------------------------------------------------


def test_digits_sizes_add_up(digits):
    n_test = n_held(N_DIGITS, 0.2)
    n_val = n_held(N_DIGITS - n_test, 0.1)
    assert (len(digits.train), len(digits.val), len(digits.test)) == (N_DIGITS - n_test - n_val, n_val, n_test)


def test_digits_splits_partition_the_data(digits, digits_full):
    """Every (image, label) of load_digits lands in exactly one split, unchanged."""
    assert examples(digits.train, digits.val, digits.test) == array_examples(*digits_full)


def test_digits_splits_are_stratified(digits, digits_full):
    y_all = digits_full[1]
    for part in (digits.val, digits.test, digits.train):
        assert_stratified(part.tensors[1], y_all)


def test_digits_metadata_and_values(digits):
    x = digits.train.tensors[0]
    assert x.dtype == torch.uint8 and digits.test.tensors[0].dtype == torch.uint8
    assert digits.train.tensors[1].dtype == torch.int64
    assert int(x.min()) == 0 and int(x.max()) == 16
    assert digits.data_shape == (64,) and tuple(x.shape[1:]) == (64,)
    assert digits.levels == 17 and digits.num_classes == 10
    assert digits.class_names == tuple(str(i) for i in range(10))


def test_digits_class_counts_is_bincount_of_train(digits):
    counts = digits.class_counts()
    assert counts.shape == (10,)
    assert torch.equal(counts, torch.bincount(digits.train.tensors[1], minlength=10))
    assert int(counts.sum()) == len(digits.train)


def test_digits_split_seed(digits):
    assert_same_splits(digits, load_data(DataConfig(name="digits", seed=0)))
    other = load_data(DataConfig(name="digits", seed=1))
    assert not torch.equal(other.test.tensors[0], digits.test.tensors[0])
    assert not torch.equal(other.val.tensors[0], digits.val.tensors[0])


@pytest.mark.parametrize("limit", [100, 414, 1000])  # 414: 1 - 414/1437 rounded up by sklearn kept 413
def test_digits_train_limit(limit, digits, digits_full):
    """train + val hold exactly `limit` examples, drawn from the usual training set, still stratified."""
    limited = load_data(DataConfig(name="digits", train_limit=limit))
    assert len(limited.train) + len(limited.val) == limit
    assert len(limited.val) == n_held(limit, 0.1)
    for a, b in zip(limited.test.tensors, digits.test.tensors):  # the test split is not limited
        assert torch.equal(a, b)
    full_train = examples(digits.train, digits.val)
    kept = examples(limited.train, limited.val)
    assert not kept - full_train  # a sub-multiset of the unlimited training data
    y_all = digits_full[1]
    assert_stratified(torch.cat([limited.train.tensors[1], limited.val.tensors[1]]), y_all)
    assert_stratified(limited.val.tensors[1], y_all)


def test_digits_train_limit_above_size_keeps_everything(digits):
    assert_same_splits(load_data(DataConfig(name="digits", train_limit=10**6)), digits)


# -- toy2d -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, val_fraction, test_fraction", [(2000, 0.1, 0.2), (301, 0.25, 0.3)])
def test_toy2d(n, val_fraction, test_fraction):
    s = load_data(DataConfig(name="toy2d", toy_n=n, val_fraction=val_fraction, test_fraction=test_fraction))
    n_test = n_held(n, test_fraction)
    n_val = n_held(n - n_test, val_fraction)
    assert (len(s.train), len(s.val), len(s.test)) == (n - n_test - n_val, n_val, n_test)
    x = s.train.tensors[0]
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (2,) and s.data_shape == (2,)
    assert torch.isfinite(x).all()
    assert s.levels is None and s.num_classes == 2 and len(s.class_names) == 2
    assert set(torch.cat([p.tensors[1] for p in (s.train, s.val, s.test)]).tolist()) == {0, 1}
    assert_same_splits(s, load_data(DataConfig(name="toy2d", toy_n=n, val_fraction=val_fraction,
                                               test_fraction=test_fraction)))


# -- Fashion-MNIST (generated idx files) -------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("layout", [".", "FashionMNIST/raw"], ids=["root", "torchvision"])
def test_fashion_mnist_round_trip(tmp_path, gz, layout):
    arrays = write_fashion(tmp_path / layout, gz=gz)
    s = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)
    assert s.data_shape == (1, 28, 28) and s.levels == 256 and s.num_classes == 10 and len(s.class_names) == 10
    for part in (s.train, s.val, s.test):
        assert part.tensors[0].dtype == torch.uint8 and tuple(part.tensors[0].shape[1:]) == (1, 28, 28)
    assert examples(s.train, s.val) == array_examples(arrays["train_x"][:, None], arrays["train_y"])
    # the official test set is passed through in file order
    assert torch.equal(s.test.tensors[0], torch.from_numpy(arrays["test_x"][:, None]))
    assert torch.equal(s.test.tensors[1], torch.from_numpy(arrays["test_y"].astype(np.int64)))
    assert_stratified(s.val.tensors[1], arrays["train_y"], slack=1)


def test_read_idx_header(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(a)
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:8] == (2).to_bytes(4, "big")
    for gz in (False, True):
        got = read_idx(write_idx(tmp_path / f"a{gz}", a, gz))
        assert got.dtype == np.uint8 and np.array_equal(got, a) and got.flags.writeable


def corrupt(kind: str, raw: bytes) -> bytes:
    if kind == "bad magic":
        return bytes([0, 0, 0x0D, 3]) + raw[4:]  # dtype byte 0x0D = float32
    if kind == "bad first bytes":
        return b"\x1f\x8b" + raw[2:]
    if kind == "truncated data":
        return raw[:-5]
    if kind == "truncated header":
        return raw[:10]
    raise AssertionError(kind)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("kind", ["bad magic", "bad first bytes", "truncated data", "truncated header"])
def test_read_idx_rejects_corrupt_files(tmp_path, kind, gz):
    raw = corrupt(kind, idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8)))
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(path))):
        read_idx(path)


def test_read_idx_rejects_truncated_gzip_stream(tmp_path):
    packed = gzip.compress(idx_bytes(np.arange(5 * 784, dtype=np.uint8).reshape(5, 28, 28)))
    path = tmp_path / "x.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(path))):
        read_idx(path)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    msg = str(err.value)
    assert str(tmp_path) in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_fashion_mnist_one_file_missing(fashion):
    root, _ = fashion
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_data(DataConfig(name="fashion-mnist", root=str(root)))


@pytest.mark.parametrize("what", ["image size", "label range", "count mismatch"])
def test_fashion_mnist_malformed(tmp_path, what):
    arrays = write_fashion(tmp_path, gz=False)
    if what == "image size":
        write_idx(tmp_path / "train-images-idx3-ubyte", arrays["train_x"][:, :27], gz=False)
    elif what == "label range":
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(20, 10, dtype=np.uint8), gz=False)
    else:
        write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train_y"][:-1], gz=False)
    with pytest.raises(DatasetNotFoundError, match="malformed"):
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)))


def test_fashion_mnist_download_needs_root():
    with pytest.raises(ValueError, match="root"):
        load_data(DataConfig(name="fashion-mnist", download=True))


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                    reason=f"{DEBIAN_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist():
    s = load_data(DataConfig(name="fashion-mnist"))
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.data_shape == (1, 28, 28) and s.train.tensors[0].dtype == torch.uint8 and s.levels == 256
    # the official sets are balanced (6000 / 1000 a class), so a stratified 10 % split is exactly balanced
    assert torch.equal(s.class_counts(), torch.full((10,), 5400))
    assert torch.equal(torch.bincount(s.val.tensors[1], minlength=10), torch.full((10,), 600))
    assert torch.equal(torch.bincount(s.test.tensors[1], minlength=10), torch.full((10,), 1000))


# -- CIFAR-10 (generated pickles) --------------------------------------------------------------


def test_cifar10_round_trip(cifar):
    root, arrays = cifar
    s = load_data(DataConfig(name="cifar10", root=str(root)))
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)
    assert s.data_shape == (3, 32, 32) and s.levels == 256 and s.num_classes == 10 and len(s.class_names) == 10
    assert s.train.tensors[0].dtype == torch.uint8 and s.train.tensors[1].dtype == torch.int64
    c, h, w = np.indices((3, 32, 32))
    flat_to_chw = c * 1024 + h * 32 + w  # channel-major: flat index of pixel [c, h, w]
    assert np.array_equal(s.test.tensors[0].numpy(), arrays["test_x"][:, flat_to_chw])
    assert np.array_equal(s.test.tensors[1].numpy(), arrays["test_y"])
    assert examples(s.train, s.val) == array_examples(arrays["train_x"][:, flat_to_chw], arrays["train_y"])


def test_cifar10_known_pixel(cifar):
    root, arrays = cifar
    data = np.zeros((20, 3072), dtype=np.uint8)
    data[0, 2 * 1024 + 5 * 32 + 17] = 255  # blue channel, row 5, column 17
    write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", data, [int(v) for v in arrays["test_y"]])
    x0 = load_data(DataConfig(name="cifar10", root=str(root))).test.tensors[0][0]
    assert x0[2, 5, 17] == 255 and int(x0.sum()) == 255


def test_cifar10_missing(tmp_path, cifar):
    with pytest.raises(DatasetNotFoundError, match="root"):
        load_data(DataConfig(name="cifar10"))
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path / "elsewhere")))
    root, _ = cifar
    missing = root / "cifar-10-batches-py" / "data_batch_4"
    missing.unlink()
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(missing))):
        load_data(DataConfig(name="cifar10", root=str(root)))


@pytest.mark.parametrize("what", ["random bytes", "data width", "label count", "label range", "missing key"])
def test_cifar10_malformed(cifar, what):
    root, _ = cifar
    path = root / "cifar-10-batches-py" / "data_batch_3"
    data, labels = np.zeros((20, 3072), dtype=np.uint8), [i % 10 for i in range(20)]
    if what == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif what == "data width":
        write_cifar_batch(path, data[:, :3000], labels)
    elif what == "label count":
        write_cifar_batch(path, data, labels[:-1])
    elif what == "label range":
        write_cifar_batch(path, data, labels[:-1] + [10])
    else:
        with open(path, "wb") as f:
            pickle.dump({b"data": data}, f)
    with pytest.raises(DatasetNotFoundError, match=f"{re.escape(str(path))}.*malformed"):
        load_data(DataConfig(name="cifar10", root=str(root)))


# -- DataConfig --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"name": "mnist"}, {"val_fraction": 0.0}, {"val_fraction": 1.0}, {"val_fraction": -0.1},
     {"test_fraction": 0.0}, {"test_fraction": 1.5}],
)
def test_data_config_rejects(kwargs):
    with pytest.raises(ValueError):
        DataConfig(**kwargs)


# -- end to end: the splits feed a MixtureFlow as they are -------------------------------------

MLP_CFG = ModelConfig(arch=MLP(n_blocks=1, hidden=(8,)))
CONV_CFG = ModelConfig(arch=Conv(channels=4, n_blocks=1, n_scales=2))


@pytest.mark.parametrize("name", ["digits", "toy2d", "fashion-mnist", "cifar10"])
def test_splits_feed_a_model(tmp_path, name):
    if name == "fashion-mnist":
        write_fashion(tmp_path)
    elif name == "cifar10":
        write_cifar(tmp_path)
    s = load_data(DataConfig(name=name, root=str(tmp_path), toy_n=200))
    model_cfg = CONV_CFG if len(s.data_shape) == 3 else MLP_CFG
    model = build_model(s.data_shape, s.num_classes, s.levels, model_cfg, class_counts=s.class_counts())
    x = s.train.tensors[0][:4]  # as stored: uint8 levels, or float32 points for toy2d
    assert x.dtype == (torch.float32 if s.levels is None else torch.uint8)
    with torch.no_grad():
        out = model.log_prob_all(x)
    assert out.shape == (4, s.num_classes)
    assert torch.isfinite(out).all()


def test_test_limit_keeps_a_stratified_subset_of_the_test_split():
    full = load_data(DataConfig("digits"))
    small = load_data(DataConfig("digits", test_limit=100))
    assert len(small.test) == 100 and len(small.train) == len(full.train)
    counts = torch.bincount(small.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 9 and int(counts.max()) <= 11  # stratified: ~10 per class
    full_rows = {(bytes(x.numpy()), int(y)) for x, y in zip(*full.test.tensors)}
    assert all((bytes(x.numpy()), int(y)) in full_rows for x, y in zip(*small.test.tensors))  # a subset


def test_fashion_smoke_profile_trains_from_the_gaussian_start(tmp_path):
    """The fashion-mnist i-ResNet smoke profile (the default's Russian-roulette estimator) with the data-dependent
    full-covariance moments prior, end to end on generated idx files: fit initialises the prior from the class
    moments of the initial latents, trains with finite losses, and the model evaluates on the test split."""
    from mixflow_core.eval.metrics import evaluate
    from mixflow_core.training.config import apply_overrides
    from mixflow_core.training.fit import fit
    from mixflow_core.training.profiles import get_profile

    write_fashion(tmp_path)
    cfg = apply_overrides(get_profile("fashion-mnist", "smoke", "iresnet"),
                          {"prior.init": "moments", "prior.covariance": "full", "prior.learn_scales": False,
                           "prior.learn_means": False})
    assert cfg.model.logdet == get_profile("fashion-mnist", "default", "iresnet").model.logdet
    s = load_data(replace(cfg.data, root=str(tmp_path)))
    torch.manual_seed(0)
    model = build_model(s.data_shape, s.num_classes, s.levels, cfg.model, cfg.prior, s.class_counts())
    history = fit(model, s, cfg.train, cfg.runtime)
    assert not model.prior.needs_data_init and all(math.isfinite(e["train_loss"]) for e in history.epochs)
    cov = model.prior.covariances()[0].detach()
    assert cov.shape == (784, 784) and (cov - torch.diag(torch.diagonal(cov))).abs().max() > 0  # full, not diagonal
    m = evaluate(model, s.test, batch_size=64)
    assert math.isfinite(m["bpd_conditional"]) and 0.0 <= m["accuracy"] <= 1.0
