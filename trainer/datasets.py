"""Readers for the datasets behind the tasks, with numpy only (no scikit-learn, no torchvision).

- digits: scikit-learn's 8x8 digits, shipped in trainer/data/digits.csv.gz (see LICENSE-digits.txt).
- mnist: the four standard IDX files (optionally .gz), as published by LeCun et al. and as
  torchvision stores them (DIR, DIR/MNIST/raw or DIR/raw).
- cifar10: the "python version" pickles (data_batch_1..5, test_batch) in DIR or DIR/cifar-10-batches-py.

Why not torchvision: its CPU wheel for this torch is not on PyPI (the PyPI wheel is built for CUDA
and fails to load beside torch+cpu), and its CIFAR10 class refuses any file whose MD5 differs from
the official archive, so it cannot read small files in the same format. The formats are simple.
"""

from __future__ import annotations

import gzip
import io
import pickle
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["DataError", "load_cifar10", "load_digits", "load_mnist", "split_indices"]


class DataError(ValueError):
    """A dataset is missing or malformed; the message names the file and what was expected."""


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digit images as float32 in [0, 1], shape (1797, 64), and int64 labels."""
    raw = resources.files("trainer").joinpath("data/digits.csv.gz").read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.float32)
    return table[:, :64] / 16.0, table[:, 64].astype(np.int64)


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train/test split: the same permutation for every run, whatever --seed says."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# --- MNIST (IDX) ---------------------------------------------------------------------------------

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(data_dir: Path, name: str, subdirs: tuple[str, ...]) -> Path:
    for sub in subdirs:
        for candidate in (data_dir / sub / name, data_dir / sub / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    where = ", ".join(str(data_dir / s) if s else str(data_dir) for s in subdirs)
    raise DataError(f"missing {name}[.gz] (looked in {where})")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (big-endian header: 0, 0, dtype code, ndim, then ndim uint32 sizes)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[data[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 0
    if len(data) - offset != count * dtype.itemsize:
        raise DataError(f"{path}: header says shape {shape} but the file holds {len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape)


def load_mnist(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST (or Fashion-MNIST, same format) images as float32 (N, 1, 28, 28) in [0, 1], int64 labels."""
    data_dir = Path(data_dir)
    img_name, lbl_name = MNIST_FILES[split]
    subdirs = ("", "MNIST/raw", "raw")
    images = read_idx(_find(data_dir, img_name, subdirs))
    labels = read_idx(_find(data_dir, lbl_name, subdirs))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"MNIST {split} files in {data_dir} disagree: images {images.shape}, labels {labels.shape}")
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)


# --- CIFAR-10 (python pickles) -------------------------------------------------------------------

CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only plain containers and numpy arrays: a data file must not be able to run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # protocol-2 pickles store bytes this way (harmless: str -> bytes)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({exc})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape}, {labels.shape}")
    return data, labels


def load_cifar10(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images as float32 (N, 3, 32, 32) in [0, 1] and int64 labels."""
    data_dir = Path(data_dir)
    parts = [_read_cifar_batch(_find(data_dir, name, ("", "cifar-10-batches-py"))) for name in CIFAR_FILES[split]]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return (data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0), labels
