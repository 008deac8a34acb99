"""Readers for the real on-disk formats: IDX (MNIST family) and CIFAR python pickles."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from automlprune.errors import DataNotFoundError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into an array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataNotFoundError(f"cannot read IDX file {path} ({exc}); delete it and fetch the dataset again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataNotFoundError(f"{path} is not an IDX file (bad magic number); delete it and fetch the dataset again")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataNotFoundError(
            f"{path} is truncated: header says {dims} but holds {len(raw) - offset} bytes; fetch the dataset again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz). Used by tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def read_cifar_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 python-format batches from ``folder`` (``cifar-10-batches-py``).

    Returns images as uint8 (N, 3, 32, 32) and labels as int64 (N,).
    """
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8)
            batch_labels = entry.get("labels", entry.get("fine_labels"))
        except (OSError, pickle.UnpicklingError, KeyError, EOFError, TypeError) as exc:
            raise DataNotFoundError(f"cannot read CIFAR batch {path} ({exc}); fetch the dataset again") from None
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)
