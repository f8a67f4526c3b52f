"""Data sets for the fastae command: the bundled digits, and files.

    load_dataset("digits")            scikit-learn's bundled 8x8 digits: 1797 samples, labels 0-9
    load_dataset("x.npy")             an array (N, D) or (N, height, width); no labels
    load_dataset("x.npz")             arrays "x" (or "X", "data", the first array) and optional
                                      labels "y" (or "labels", "target")
    load_dataset("x.csv")             numeric CSV, optional header row, optional label column
    load_dataset("train-images-idx3-ubyte[.gz]")
                                      MNIST IDX images; labels from the matching
                                      "...-labels-idx1-ubyte[.gz]" next to it, if present

Every sample is flattened to a row of D float32 features. split() draws a seeded train/validation
split; MinMaxScaler maps the data to [0, 1] with one (low, high) pair fitted on the training split
only, and clips the validation split into [0, 1] (so binary cross-entropy sees valid targets).
Errors are DataError (a ValueError) naming the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "MinMaxScaler",
    "Split",
    "load_dataset",
    "prepare",
    "split_indices",
]

NAMED = ("digits",)


class DataError(ValueError):
    """Bad data: a missing or unreadable file, ragged rows, NaN or Inf values."""


@dataclass
class Dataset:
    """Samples x (N, D) float32, labels y (N,) int64 or None, and the shape of one image
    (height, width) when the samples are images (None otherwise)."""

    x: np.ndarray
    y: np.ndarray | None
    name: str
    image_shape: tuple[int, int] | None


def load_dataset(source: str, label_column: str | int | None = None) -> Dataset:
    """Load a named data set ("digits") or a .npy, .npz, .csv or MNIST IDX file.

    Args:
        source: a name in NAMED or a path.
        label_column: for CSV files, the column holding the labels (its header name, or its
            0-based index); None for no labels.
    """
    if label_column is not None and not str(source).lower().endswith(".csv"):
        raise DataError(f"{source}: a label column applies to CSV files only")
    if source in NAMED:
        return _digits()
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file (expected a file or one of {', '.join(NAMED)})")
    lower = source.lower()
    if lower.endswith(".npy"):
        dataset = _npy(source)
    elif lower.endswith(".npz"):
        dataset = _npz(source)
    elif lower.endswith(".csv"):
        dataset = _csv(source, label_column)
    elif "idx3-ubyte" in lower or lower.endswith((".idx", ".idx.gz")):
        dataset = _idx_images(source)
    else:
        raise DataError(
            f"{source}: unknown file type, expected .npy, .npz, .csv or an MNIST IDX file "
            "(*-idx3-ubyte, optionally .gz)"
        )
    _check_finite(source, dataset.x)
    if dataset.x.shape[0] < 2:
        raise DataError(f"{source}: got {dataset.x.shape[0]} sample(s), expected at least 2")
    return dataset


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return Dataset(digits.data.astype(np.float32), digits.target.astype(np.int64), "digits", (8, 8))


def _as_samples(source: str, array: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None]:
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{source}: got dtype {array.dtype}, expected a real numeric array")
    if array.ndim == 2:
        return array.astype(np.float32), _square_image(array.shape[1])
    if array.ndim == 3:
        return array.reshape(array.shape[0], -1).astype(np.float32), tuple(array.shape[1:])
    raise DataError(
        f"{source}: got an array of shape {array.shape}, expected (N, D) or (N, height, width)"
    )


def _square_image(features: int) -> tuple[int, int] | None:
    side = math.isqrt(features)
    return (side, side) if side * side == features and side > 1 else None


def _labels(source: str, y: np.ndarray | None, count: int) -> np.ndarray | None:
    if y is None:
        return None
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != count:
        raise DataError(f"{source}: got {y.shape[0]} labels for {count} samples")
    return y


def _npy(source: str) -> Dataset:
    try:
        array = np.load(source, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{source}: not a readable .npy file ({error})") from None
    x, image_shape = _as_samples(source, array)
    return Dataset(x, None, os.path.basename(source), image_shape)


def _npz(source: str) -> Dataset:
    try:
        with np.load(source, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise DataError(f"{source}: not a readable .npz file ({error})") from None
    if not arrays:
        raise DataError(f"{source}: the archive holds no arrays")
    x_key = next((k for k in ("x", "X", "data") if k in arrays), next(iter(arrays)))
    y_key = next((k for k in ("y", "labels", "target") if k in arrays and k != x_key), None)
    x, image_shape = _as_samples(source, arrays[x_key])
    y = _labels(source, arrays[y_key] if y_key else None, x.shape[0])
    return Dataset(x, y, os.path.basename(source), image_shape)


def _csv(source: str, label_column: str | int | None) -> Dataset:
    try:
        with open(source, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{source}: not a readable CSV file ({error})") from None
    if not rows:
        raise DataError(f"{source}: the file is empty")

    header = None
    if not _numeric_row(rows[0]):
        header, rows = [cell.strip() for cell in rows[0]], rows[1:]
    if not rows:
        raise DataError(f"{source}: no data rows after the header")
    width = len(header) if header is not None else len(rows[0])
    first_line = 2 if header is not None else 1
    for number, row in enumerate(rows, start=first_line):
        if len(row) != width:
            raise DataError(
                f"{source}: line {number} has {len(row)} columns, expected {width} (ragged CSV)"
            )

    label_index = None
    if label_column is not None:
        label_index = _column_index(source, label_column, header, width)
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError:
        for number, row in enumerate(rows, start=first_line):
            if not _numeric_row(row):
                raise DataError(f"{source}: line {number} is not all numbers: {row!r}") from None
        raise
    y = None
    if label_index is not None:
        y = table[:, label_index]
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{source}: the label column holds values that are not integers")
        y = y.astype(np.int64)
        table = np.delete(table, label_index, axis=1)
    if table.shape[1] == 0:
        raise DataError(f"{source}: no feature columns besides the labels")
    x = table.astype(np.float32)
    return Dataset(x, y, os.path.basename(source), _square_image(x.shape[1]))


def _numeric_row(row: list[str]) -> bool:
    try:
        for cell in row:
            float(cell)
    except ValueError:
        return False
    return True


def _column_index(source: str, column: str | int, header: list[str] | None, width: int) -> int:
    if isinstance(column, str) and header is not None and column in header:
        return header.index(column)
    try:
        index = int(column)
    except ValueError:
        known = f"one of {header}" if header is not None else "a 0-based column number"
        raise DataError(f"{source}: label column {column!r} not found, expected {known}") from None
    if not 0 <= index < width:
        raise DataError(f"{source}: label column {index} out of range, the file has {width}")
    return index


def _open_maybe_gzip(path: str):
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


_IDX_TYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str) -> np.ndarray:
    """One IDX file (the MNIST format), gzipped or not, as a numpy array."""
    try:
        with _open_maybe_gzip(path) as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable IDX file ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dims = raw[3]
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: got {len(raw) - header} data bytes, expected {expected} for shape {shape}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_images(source: str) -> Dataset:
    images = read_idx(source)
    if images.ndim not in (2, 3):
        raise DataError(f"{source}: got an IDX array of shape {images.shape}, expected images")
    x, image_shape = _as_samples(source, images)
    y = None
    labels_path = source.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
    if labels_path != source and os.path.isfile(labels_path):
        y = _labels(labels_path, read_idx(labels_path).astype(np.int64), x.shape[0])
    return Dataset(x, y, os.path.basename(source), image_shape)


def _check_finite(source: str, x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        count = int(bad.sum())
        raise DataError(
            f"{source}: got {count} NaN or Inf value(s), the first at sample {row}, feature "
            f"{column}; expected finite numbers"
        )


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(count) into (train, validation) index arrays."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: got {val_fraction!r}, expected a number in (0, 1)")
    n_val = min(count - 1, max(1, round(count * val_fraction)))
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass
class MinMaxScaler:
    """x -> clip((x - low) / (high - low), 0, 1), with low and high fitted on training data."""

    low: float = 0.0
    high: float = 1.0

    @classmethod
    def fit(cls, x: np.ndarray) -> MinMaxScaler:
        low, high = float(x.min()), float(x.max())
        # A constant training set maps to 0 rather than dividing by zero.
        return cls(low, high if high > low else low + 1.0)

    def transform(self, x: np.ndarray) -> np.ndarray:
        scaled = (x - self.low) / (self.high - self.low)
        return np.clip(scaled, 0.0, 1.0).astype(np.float32)


@dataclass
class Split:
    """The train and validation parts of a data set, scaled to [0, 1]."""

    x_train: np.ndarray
    x_val: np.ndarray
    y_train: np.ndarray | None
    y_val: np.ndarray | None
    scaler: MinMaxScaler
    image_shape: tuple[int, int] | None


def prepare(dataset: Dataset, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Split a data set with the seed, fit the scaler on the training part, scale both parts."""
    train, val = split_indices(dataset.x.shape[0], val_fraction, seed)
    scaler = MinMaxScaler.fit(dataset.x[train])
    y = dataset.y
    return Split(
        scaler.transform(dataset.x[train]),
        scaler.transform(dataset.x[val]),
        y[train] if y is not None else None,
        y[val] if y is not None else None,
        scaler,
        dataset.image_shape,
    )
