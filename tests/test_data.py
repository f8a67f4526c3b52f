"""Data loading: digits, .npy, .npz, .csv, MNIST IDX; errors; split and scaling."""

import gzip
import struct

import numpy as np
import pytest

from fastae.data import DataError
from fastae.data import MinMaxScaler
from fastae.data import load_dataset
from fastae.data import prepare
from fastae.data import split_indices


def test_digits():
    data = load_dataset("digits")
    assert data.x.shape == (1797, 64) and data.x.dtype == np.float32
    assert data.y.shape == (1797,) and set(data.y.tolist()) == set(range(10))
    assert data.image_shape == (8, 8)
    assert data.x.min() == 0 and data.x.max() == 16


def test_npy_2d_and_3d(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    np.save(tmp_path / "a.npy", images)
    data = load_dataset(str(tmp_path / "a.npy"))
    assert data.image_shape == (3, 4) and data.y is None
    np.testing.assert_array_equal(data.x, images.reshape(2, 12).astype(np.float32))


def test_npz_with_labels(tmp_path):
    x = np.random.default_rng(0).random((5, 4))
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    data = load_dataset(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(data.x, x.astype(np.float32))
    np.testing.assert_array_equal(data.y, np.arange(5))


def test_csv_with_header_and_label_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("f1,label,f2\n1.5,3,2\n0,1,-1\n")
    data = load_dataset(str(path), label_column="label")
    np.testing.assert_array_equal(data.x, [[1.5, 2.0], [0.0, -1.0]])
    np.testing.assert_array_equal(data.y, [3, 1])

    no_header = tmp_path / "b.csv"
    no_header.write_text("1,2,3\n4,5,6\n")
    data = load_dataset(str(no_header), label_column=0)
    np.testing.assert_array_equal(data.x, [[2, 3], [5, 6]])
    np.testing.assert_array_equal(data.y, [1, 4])
    assert load_dataset(str(no_header)).x.shape == (2, 3)


def _idx(array: np.ndarray, code: int) -> bytes:
    return (
        bytes([0, 0, code, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + (array.tobytes())
    )


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    labels = np.array([7, 0, 2], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(tmp_path / f"train-images-idx3-ubyte{suffix}", "wb") as handle:
        handle.write(_idx(images, 0x08))
    with opener(tmp_path / f"train-labels-idx1-ubyte{suffix}", "wb") as handle:
        handle.write(_idx(labels, 0x08))
    data = load_dataset(str(tmp_path / f"train-images-idx3-ubyte{suffix}"))
    np.testing.assert_array_equal(data.x, images.reshape(3, 16).astype(np.float32))
    np.testing.assert_array_equal(data.y, [7, 0, 2])
    assert data.image_shape == (4, 4)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="nope.csv: no such file"):
        load_dataset(str(tmp_path / "nope.csv"))

    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2,3\n4,5\n")
    with pytest.raises(DataError, match="ragged.csv: line 2 has 2 columns, expected 3"):
        load_dataset(str(ragged))

    words = tmp_path / "words.csv"
    words.write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(DataError, match="words.csv: line 3 is not all numbers"):
        load_dataset(str(words))

    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="binary.csv: not a readable CSV"):
        load_dataset(str(binary))

    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[0.0, 1.0], [np.nan, np.inf]]))
    with pytest.raises(
        DataError, match=r"nan.npy: got 2 NaN or Inf value\(s\), the first at sample 1"
    ):
        load_dataset(str(nan))

    idx = tmp_path / "bad-images-idx3-ubyte"
    idx.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02")
    with pytest.raises(DataError, match="truncated IDX header"):
        load_dataset(str(idx))

    other = tmp_path / "a.txt"
    other.write_text("1")
    with pytest.raises(DataError, match="unknown file type"):
        load_dataset(str(other))


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_indices(100, 0.2, seed=3)
    again_train, again_val = split_indices(100, 0.2, seed=3)
    other_train, _ = split_indices(100, 0.2, seed=4)
    assert len(val) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(train, other_train)


def test_scaler_is_fitted_on_the_training_split_only():
    data = load_dataset("digits")
    split = prepare(data, 0.2, seed=0)
    train, _ = split_indices(1797, 0.2, seed=0)
    assert split.scaler == MinMaxScaler(float(data.x[train].min()), float(data.x[train].max()))
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0
    assert 0.0 <= split.x_val.min() and split.x_val.max() <= 1.0

    # Values outside the training range are clipped into [0, 1].
    scaler = MinMaxScaler(2.0, 4.0)
    np.testing.assert_array_equal(scaler.transform(np.array([1.0, 3.0, 5.0])), [0.0, 0.5, 1.0])
