"""Datasets as in-memory uint8 tensors: Fashion-MNIST IDX files or a folder of photos per class.

The whole set fits in memory (Fashion-MNIST is 47 MB), so augmentation runs on
whole batches in the training process rather than per sample in loader workers.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from returns_model.meta import PreprocessSpec
from returns_model.names import IMAGE_SUFFIXES
from returns_model.preprocess import PhotoError, bytes_to_uint8
from training.config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# SHA-256 of the *decompressed* IDX bytes. Debian recompressed the .gz files, so the
# compressed checksums differ from upstream's while these contents are identical.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


class DataError(RuntimeError):
    """The training data is missing, truncated or not what it claims to be."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    source: str
    snapshot_sha256: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of its content
    held_out: tuple[str, ...] = ()  # splits held out of train ("val", "test"), not read from files of their own


def read_idx(path: Path) -> tuple[torch.Tensor, str]:
    """Parse one gzip-compressed IDX file (unsigned bytes) into a uint8 tensor.

    Returns the tensor and the SHA-256 of the decompressed bytes. Raises DataError
    naming the file when it is missing, truncated or malformed.
    """
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc}); the download may be truncated") from None
    if len(raw) < 4:
        raise DataError(f"{path}: only {len(raw)} bytes after decompression; an IDX header needs at least 4")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: bad IDX magic (dtype 0x{dtype:02x}, {ndim} dims); expected unsigned bytes, 1 or 3 dims")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(torch.tensor(dims).prod())
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, but its header {list(dims)} requires {expected}; the file is truncated or corrupt")
    tensor = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*dims)
    return tensor, hashlib.sha256(raw).hexdigest()


def _find_fashion_mnist(data_dir: Path | None, download_root: Path) -> Path:
    candidates = [data_dir] if data_dir else [DEFAULT_FASHION_MNIST_DIR]
    for d in candidates:
        if d and all((d / f).exists() for f in FASHION_MNIST_FILES.values()):
            return d
    raw = download_root / "FashionMNIST" / "raw"
    if all((raw / f).exists() for f in FASHION_MNIST_FILES.values()):
        return raw
    if data_dir is not None:
        raise DataError(f"{data_dir}: Fashion-MNIST files {sorted(FASHION_MNIST_FILES.values())} not found there")
    log.info("Fashion-MNIST not in %s; trying torchvision's download into %s", DEFAULT_FASHION_MNIST_DIR, download_root)
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(download_root), train=True, download=True)
        FashionMNIST(str(download_root), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"Fashion-MNIST is not in {DEFAULT_FASHION_MNIST_DIR} and could not be downloaded ({exc}). "
            "Install Debian's package 'dataset-fashion-mnist' or pass --data-dir"
        ) from None
    return raw


def _holdout(split: Split, size: int, seed: int) -> tuple[Split, Split]:
    if not 0 < size < len(split):
        raise DataError(f"cannot hold out {size} of {len(split)} training images")
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(perm[size:]), split.subset(perm[:size])


def held_out_test_size(n_train: int) -> int:
    """Photos an image folder without ``test/`` gives its test split: a tenth of ``train/``, at least one."""
    return max(1, n_train // 10)


def held_out_val_size(n_train: int, val_size: int) -> int:
    """Photos an image folder without ``val/`` gives validation: a tenth of what ``train/`` has left after
    the test hold-out, at least one and at most ``val_size``."""
    return min(val_size, max(1, n_train // 10))


def hold_out(train: Split, test: Split | None, val: Split | None, val_size: int,
             seed: int) -> tuple[Split, Split, Split]:
    """An image folder's (train, val, test): a split without its own folder (None) is held out of train,
    seeded, the test split first."""
    if test is None:
        train, test = _holdout(train, held_out_test_size(len(train)), seed + 1)
    if val is None:
        train, val = _holdout(train, held_out_val_size(len(train), val_size), seed)
    return train, val, test


def snapshot_hash(file_hashes: dict[str, str]) -> str:
    """One hash for a data snapshot: over the sorted (name, content hash) pairs."""
    lines = "".join(f"{name}  {digest}\n" for name, digest in sorted(file_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def load_fashion_mnist(data_dir: Path | None, val_size: int, seed: int,
                       download_root: Path = Path("data")) -> Dataset:
    root = _find_fashion_mnist(data_dir, download_root)
    arrays, hashes = {}, {}
    for key, name in FASHION_MNIST_FILES.items():
        arrays[key], hashes[name] = read_idx(root / name)
        if hashes[name] != FASHION_MNIST_SHA256[name]:
            raise DataError(f"{root / name}: decompressed content SHA-256 {hashes[name]} is not Fashion-MNIST's "
                            f"({FASHION_MNIST_SHA256[name]}); the file is corrupt or a different data set")
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise DataError(f"{root}: {part} has {n_img} images but {n_lab} labels")
    train = Split(arrays["train_images"].unsqueeze(1), arrays["train_labels"].long())
    test = Split(arrays["test_images"].unsqueeze(1), arrays["test_labels"].long())
    train, val = _holdout(train, val_size, seed)
    return Dataset(train, val, test, list(FASHION_MNIST_CLASSES), f"fashion-mnist:{root}", snapshot_hash(hashes),
                   hashes, held_out=("val",))


def _read_class_folders(root: Path, class_names: list[str], spec: PreprocessSpec,
                        hashes: dict[str, str]) -> Split:
    images, labels = [], []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            data = path.read_bytes()
            try:
                images.append(bytes_to_uint8(data, spec))
            except PhotoError as exc:
                log.warning("skipping %s: %s", path, exc.message)
                continue
            labels.append(label)
            hashes[str(path.relative_to(root.parent))] = hashlib.sha256(data).hexdigest()
    if not images:
        raise DataError(f"{root}: no readable images in any of the class folders {class_names}")
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.long))


def load_image_folder(root: Path, spec: PreprocessSpec, val_size: int, seed: int) -> Dataset:
    """``root/train/<class>/*`` (and optional ``val/``, ``test/``) -> Dataset.

    Missing ``val/`` or ``test/`` splits are held out of train, seeded (``hold_out``).
    """
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: expected a 'train/<class>/' folder layout (and optional val/, test/)")
    class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(class_names) < 2:
        raise DataError(f"{train_dir}: found {len(class_names)} class folders; at least 2 are needed")
    hashes: dict[str, str] = {}
    train = _read_class_folders(train_dir, class_names, spec, hashes)
    test = _read_class_folders(root / "test", class_names, spec, hashes) if (root / "test").is_dir() else None
    val = _read_class_folders(root / "val", class_names, spec, hashes) if (root / "val").is_dir() else None
    held_out = tuple(name for name, split in (("val", val), ("test", test)) if split is None)
    train, val, test = hold_out(train, test, val, val_size, seed)
    return Dataset(train, val, test, class_names, f"image-folder:{root}", snapshot_hash(hashes), hashes, held_out)


def make_spec(cfg: TrainConfig, ds: Dataset | None = None) -> PreprocessSpec:
    """The preprocessing spec the model is trained with (and that model.json carries)."""
    if cfg.image_folder is None:
        return PreprocessSpec()  # Fashion-MNIST: 1x28x28 with its own statistics
    if ds is None:  # statistics not known yet: a neutral spec to decode with
        return PreprocessSpec(channels=cfg.channels, size=cfg.image_size,
                              mean=(0.5,) * cfg.channels, std=(0.5,) * cfg.channels)
    x = ds.train.images.float() / 255
    mean = tuple(round(float(v), 4) for v in x.mean((0, 2, 3)))
    std = tuple(round(max(float(v), 1e-3), 4) for v in x.std((0, 2, 3)))
    return PreprocessSpec(channels=cfg.channels, size=cfg.image_size, mean=mean, std=std)


def load_data(cfg: TrainConfig, spec: PreprocessSpec) -> Dataset:
    """The data set a training config names: Fashion-MNIST (IDX files) or a folder per class."""
    if cfg.image_folder:
        ds = load_image_folder(Path(cfg.image_folder), spec, cfg.val_size, cfg.seed)
    else:
        ds = load_fashion_mnist(Path(cfg.data_dir) if cfg.data_dir else None, cfg.val_size, cfg.seed)
    if cfg.train_subset:
        ds.train = ds.train.subset(torch.arange(min(cfg.train_subset, len(ds.train))))
    return ds
