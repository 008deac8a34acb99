"""Dataset loaders, registered by name in :data:`DATASETS`.

Each loader returns a :class:`DataSplits` with a seeded validation split carved from the
training set. None of them downloads anything unless the caller passes ``download=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from automlprune.data.base import Augmentation, DataSplits, ImageTensors
from automlprune.data.readers import read_cifar_batches, read_idx
from automlprune.errors import ConfigError, DataNotFoundError
from automlprune.registry import Registry

DATASETS: Registry[Callable[..., DataSplits]] = Registry("dataset")

DATA_ENV_VAR = "AUTOMLPRUNE_DATA"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_CACHE = Path.home() / ".cache" / "automlprune" / "data"


def validation_indices(n_train: int, val_size: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n_train)`` into (train, val) index tensors.

    ``val_size`` is a fraction in (0, 1) or a whole number of samples.
    """
    n_val = int(round(val_size * n_train)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < n_val < n_train:
        raise ConfigError(f"val_size={val_size} leaves no training or no validation samples out of {n_train}; use a fraction in (0, 1)")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _carve(train: ImageTensors, val_size: float | int, seed: int) -> tuple[ImageTensors, ImageTensors]:
    train_idx, val_idx = validation_indices(len(train), val_size, seed)
    return train.subset(train_idx), train.subset(val_idx)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255)
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


@DATASETS.register("digits", description="scikit-learn's bundled 8x8 handwritten digits (embedded, no download)")
def load_digits(val_size: float | int = 0.15, seed: int = 0, test_size: float = 0.2, **_: object) -> DataSplits:
    """scikit-learn's 1,797 8x8 digit images, scaled to uint8; a fixed stratified 20% test split
    (split seed 0, independent of ``seed``), then a seeded validation split of the rest."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=test_size, random_state=0, stratify=labels)
    full_train = ImageTensors(torch.from_numpy(x_tr), torch.from_numpy(y_tr))
    train, val = _carve(full_train, val_size, seed)
    mean, std = _channel_stats(full_train.images)
    return DataSplits("digits", train, val, ImageTensors(torch.from_numpy(x_te), torch.from_numpy(y_te)),
                      num_classes=10, in_channels=1, image_size=(8, 8), mean=mean, std=std,
                      augmentation=Augmentation(crop_padding=1, hflip=False))


_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_files(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _FMNIST_FILES.items():
        candidates = [folder / f"{stem}.gz", folder / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def fashion_mnist_search_path(root: str | os.PathLike | None) -> list[Path]:
    """Folders searched for Fashion-MNIST IDX files, in order."""
    places: list[Path] = []
    if root is not None:
        places += [Path(root), Path(root) / "fashion-mnist", Path(root) / "FashionMNIST" / "raw"]
    if os.environ.get(DATA_ENV_VAR):
        env = Path(os.environ[DATA_ENV_VAR])
        places += [env, env / "fashion-mnist", env / "FashionMNIST" / "raw"]
    places += [DEBIAN_FASHION_MNIST, DOWNLOAD_CACHE / "FashionMNIST" / "raw"]
    return places


@DATASETS.register("fashion-mnist", description="Fashion-MNIST 28x28 (IDX files; Debian dataset-fashion-mnist)")
def load_fashion_mnist(root: str | None = None, val_size: float | int = 5000, seed: int = 0,
                       download: bool = False, **_: object) -> DataSplits:
    """Fashion-MNIST from IDX files, looked for in ``root``, ``$AUTOMLPRUNE_DATA``,
    ``/usr/share/datasets/fashion-mnist`` and the download cache, in that order;
    torchvision downloads it into the cache only when ``download`` is true."""
    places = fashion_mnist_search_path(root)
    files = next((f for f in map(_find_idx_files, places) if f is not None), None)
    if files is None and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(DOWNLOAD_CACHE), download=True)
        files = _find_idx_files(DOWNLOAD_CACHE / "FashionMNIST" / "raw")
    if files is None:
        raise DataNotFoundError(
            "Fashion-MNIST IDX files not found in " + ", ".join(str(p) for p in places)
            + "; install them with 'apt-get install dataset-fashion-mnist' or set download: true in the task's dataset section"
        )
    tr = ImageTensors(torch.from_numpy(read_idx(files["train_images"]).copy())[:, None],
                      torch.from_numpy(read_idx(files["train_labels"]).astype(np.int64)))
    te = ImageTensors(torch.from_numpy(read_idx(files["test_images"]).copy())[:, None],
                      torch.from_numpy(read_idx(files["test_labels"]).astype(np.int64)))
    train, val = _carve(tr, val_size, seed)
    return DataSplits("fashion-mnist", train, val, te, num_classes=10, in_channels=1, image_size=(28, 28),
                      mean=(0.2860,), std=(0.3530,), augmentation=Augmentation(crop_padding=2, hflip=True))


def _cifar_folder(root: str | None) -> tuple[Path | None, list[Path]]:
    places = []
    for base in ([Path(root)] if root else []) + ([Path(os.environ[DATA_ENV_VAR])] if os.environ.get(DATA_ENV_VAR) else []) + [DOWNLOAD_CACHE]:
        places += [base / "cifar-10-batches-py", base]
    found = next((p for p in places if (p / "data_batch_1").is_file() and (p / "test_batch").is_file()), None)
    return found, places


@DATASETS.register("cifar10", description="CIFAR-10 32x32 (python pickles, 'cifar-10-batches-py')")
def load_cifar10(root: str | None = None, val_size: float | int = 5000, seed: int = 0,
                 download: bool = False, **_: object) -> DataSplits:
    """CIFAR-10 from its python-format batches in ``root`` or ``$AUTOMLPRUNE_DATA``; torchvision
    downloads it into the cache only when ``download`` is true."""
    folder, places = _cifar_folder(root)
    if folder is None and download:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(DOWNLOAD_CACHE), download=True)
        folder, places = _cifar_folder(root)
    if folder is None:
        raise DataNotFoundError(
            "CIFAR-10 batches (data_batch_1..5, test_batch) not found in " + ", ".join(str(p) for p in places)
            + "; put 'cifar-10-batches-py' under the task's dataset root or $AUTOMLPRUNE_DATA, or set download: true"
        )
    train_names = sorted(p.name for p in folder.glob("data_batch_*"))
    x_tr, y_tr = read_cifar_batches(folder, train_names)
    x_te, y_te = read_cifar_batches(folder, ["test_batch"])
    train, val = _carve(ImageTensors(torch.from_numpy(x_tr), torch.from_numpy(y_tr)), val_size, seed)
    return DataSplits("cifar10", train, val, ImageTensors(torch.from_numpy(x_te), torch.from_numpy(y_te)),
                      num_classes=10, in_channels=3, image_size=(32, 32), mean=(0.4914, 0.4822, 0.4465),
                      std=(0.2470, 0.2435, 0.2616), augmentation=Augmentation(crop_padding=4, hflip=True))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@DATASETS.register("imagefolder", description="any image classification folder: ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg")
def load_imagefolder(root: str | None = None, val_size: float | int = 0.05, seed: int = 0,
                     image_size: int | Sequence[int] = 224, test_dir: str = "val", **_: object) -> DataSplits:
    """A torchvision ``ImageFolder`` tree: ``root/train`` for training (validation carved from
    it, seeded) and ``root/<test_dir>`` for the test split. Training images get
    RandomResizedCrop + flip; evaluation images Resize(1.14 x size) + CenterCrop."""
    from torch.utils.data import Subset
    from torchvision import datasets, transforms

    if root is None:
        raise ConfigError("the imagefolder dataset needs a root; set dataset.root in the task YAML")
    train_dir, test_path = Path(root) / "train", Path(root) / test_dir
    for folder in (train_dir, test_path):
        if not folder.is_dir():
            raise DataNotFoundError(f"image folder {folder} does not exist; lay the data out as ROOT/train/CLASS/*.jpg and ROOT/{test_dir}/CLASS/*.jpg")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(int(round(size[0] * 1.14))), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])
    train_aug = datasets.ImageFolder(str(train_dir), transform=train_tf)
    train_plain = datasets.ImageFolder(str(train_dir), transform=eval_tf)
    train_idx, val_idx = validation_indices(len(train_aug), val_size, seed)
    test = datasets.ImageFolder(str(test_path), transform=eval_tf)
    if test.classes != train_aug.classes:
        raise DataNotFoundError(f"{test_path} and {train_dir} hold different class folders; give both the same classes")
    return DataSplits("imagefolder", Subset(train_aug, train_idx.tolist()), Subset(train_plain, val_idx.tolist()), test,
                      num_classes=len(train_aug.classes), in_channels=3, image_size=size,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD)


def load_dataset(name: str, **options: object) -> DataSplits:
    """Load a registered dataset by name with the task's options (root, val_size, seed, download, ...)."""
    return DATASETS.get(name)(**options)
