import pickle

import numpy as np
import pytest
import torch

from automlprune.data import iterate_batches, load_dataset, validation_indices
from automlprune.data import sources
from automlprune.data.readers import read_idx, write_idx
from automlprune.errors import ConfigError, DataNotFoundError


def test_digits_splits_are_disjoint_and_deterministic(digits):
    again = load_dataset("digits")
    assert torch.equal(digits.val.images, again.val.images)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    other_seed = load_dataset("digits", seed=1)
    assert not torch.equal(digits.val.labels, other_seed.val.labels)
    assert torch.equal(digits.test.labels, other_seed.test.labels)  # test split is fixed


def test_validation_indices_partition():
    train, val = validation_indices(100, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    with pytest.raises(ConfigError):
        validation_indices(10, 10, seed=0)


def _write_fmnist(folder, n_train=40, n_test=12, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{ext}", rng.integers(0, 255, (n_train, 28, 28)))
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", rng.integers(0, 10, n_train))
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 255, (n_test, 28, 28)))
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", rng.integers(0, 10, n_test))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    _write_fmnist(tmp_path, gz=gz)
    data = load_dataset("fashion-mnist", root=str(tmp_path), val_size=10)
    assert data.train.images.shape == (30, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert len(data.val) == 10 and len(data.test) == 12
    x, y = next(iterate_batches(data.train, data, 8, shuffle=True, augment=True))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    _write_fmnist(tmp_path / "fashion-mnist")
    monkeypatch.setenv("AUTOMLPRUNE_DATA", str(tmp_path))
    assert len(load_dataset("fashion-mnist", val_size=10).test) == 12


def test_missing_fashion_mnist_names_places_and_remedies(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.setattr(sources, "DOWNLOAD_CACHE", tmp_path / "cache")
    monkeypatch.delenv("AUTOMLPRUNE_DATA", raising=False)
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fashion-mnist", root=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert "nowhere" in message and "debian" in message
    assert "apt-get install dataset-fashion-mnist" in message and "download: true" in message


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataNotFoundError, match="not an IDX file"):
        read_idx(bad)
    good = tmp_path / "t.gz"
    write_idx(good, np.zeros((3, 2, 2)))
    assert read_idx(good).shape == (3, 2, 2)
    trunc = tmp_path / "trunc"
    write_idx(trunc, np.zeros((3, 2, 2)))
    trunc.write_bytes(trunc.read_bytes()[:-3])
    with pytest.raises(DataNotFoundError, match="truncated"):
        read_idx(trunc)


def test_cifar10_reads_python_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 20), ("data_batch_2", 20), ("test_batch", 10)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}, f)
    data = load_dataset("cifar10", root=str(tmp_path), val_size=5)
    assert data.train.images.shape == (35, 3, 32, 32) and len(data.val) == 5 and len(data.test) == 10
    assert data.in_channels == 3 and data.image_size == (32, 32)


def test_missing_cifar10_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DOWNLOAD_CACHE", tmp_path / "cache")
    monkeypatch.delenv("AUTOMLPRUNE_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="download: true"):
        load_dataset("cifar10", root=str(tmp_path))


def test_imagefolder_reads_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset("imagefolder", root=str(tmp_path), val_size=2, image_size=16)
    assert data.num_classes == 2 and len(data.train) == 10 and len(data.val) == 2 and len(data.test) == 4
    x, y = next(iterate_batches(data.val, data, 4))
    assert x.shape == (2, 3, 16, 16)


def test_unknown_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown dataset 'mnist3d'"):
        load_dataset("mnist3d")


@pytest.mark.parametrize("channels", [1, 3])
def test_augmented_batches_are_channels_first(channels):
    """A one-channel crop cut from a channels-last view used to keep channels-last strides, so every
    convolution ran NHWC, where oneDNN's 1x1 stride-2 backward-weights kernel hangs for fewer than 8
    input channels (the narrow pruned shortcuts); batches must come out channels-first."""
    from dataclasses import replace

    from automlprune.data.base import Augmentation, ImageTensors

    images = torch.randint(0, 255, (16, channels, 8, 8), dtype=torch.uint8)
    split = ImageTensors(images, torch.zeros(16, dtype=torch.long))
    data = replace(load_dataset("digits"), train=split, mean=(0.5,) * channels, std=(0.5,) * channels,
                   augmentation=Augmentation(crop_padding=2, hflip=True))
    x, _ = next(iter(iterate_batches(split, data, 8, augment=True, shuffle=True)))
    assert x.stride() == torch.empty(x.shape).stride()
    out = torch.nn.Conv2d(channels, 4, 3, padding=1)(x)
    assert out.stride() == torch.empty(out.shape).stride()  # the network runs NCHW
