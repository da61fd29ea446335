"""IDX parsing on the real Fashion-MNIST files, and clear errors for damaged ones."""
import gzip
import hashlib
import struct
from collections import Counter

import pytest
import torch

from training.data import (DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_SHA256, DataError, load_fashion_mnist,
                           load_image_folder, read_idx)
from returns_model.meta import PreprocessSpec
from tests.conftest import encode


def test_real_idx_files_parse_and_hash_to_known_contents():
    images, digest = read_idx(DEFAULT_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and int(labels.max()) == 9
    assert digest == FASHION_MNIST_SHA256["t10k-images-idx3-ubyte.gz"]


def test_truncated_gzip_names_the_file(tmp_path):
    data = (DEFAULT_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=str(bad)):
        read_idx(bad)


def test_idx_with_wrong_length_or_magic_is_refused(tmp_path):
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 8, 1, 100) + bytes(50)))
    with pytest.raises(DataError, match="requires 108"):
        read_idx(short)
    magic = tmp_path / "magic.gz"
    magic.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 0x0D, 1, 4) + bytes(16)))
    with pytest.raises(DataError, match="bad IDX magic"):
        read_idx(magic)


def test_changed_content_fails_the_checksum(tmp_path):
    for name in FASHION_MNIST_SHA256:
        (tmp_path / name).write_bytes((DEFAULT_FASHION_MNIST_DIR / name).read_bytes())
    labels, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    flipped = labels.clone()
    flipped[0] = (flipped[0] + 1) % 10
    header = struct.pack(">HBBI", 0, 8, 1, len(flipped))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + flipped.numpy().tobytes()))
    with pytest.raises(DataError, match="not Fashion-MNIST's"):
        load_fashion_mnist(tmp_path, val_size=5000, seed=0)


def image_hashes(images: torch.Tensor) -> list[bytes]:
    flat = images.reshape(len(images), -1).contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def test_validation_split_is_seeded_and_disjoint():
    a = load_fashion_mnist(None, val_size=5000, seed=0)
    b = load_fashion_mnist(None, val_size=5000, seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (55000, 5000, 10000)
    assert torch.equal(a.val.images, b.val.images)
    c = load_fashion_mnist(None, val_size=5000, seed=1)
    assert not torch.equal(a.val.labels, c.val.labels)  # another seed, another split
    assert len(a.snapshot_sha256) == 64
    # Disjoint and covering, by image content: train + validation is exactly the original training
    # split as a multiset, so no validation image was also kept for training (Fashion-MNIST has a
    # few duplicate images of its own; those are the only hashes allowed on both sides).
    original, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    raw = Counter(image_hashes(original))
    train, val = Counter(image_hashes(a.train.images)), Counter(image_hashes(a.val.images))
    assert train + val == raw
    shared = set(train) & set(val)
    assert all(raw[h] >= 2 for h in shared) and len(shared) < 50
    test = set(image_hashes(a.test.images))
    assert len(test & set(val)) < 50  # the test split is its own file; only the data set's own duplicates


def test_image_folder_of_any_size_and_colour(tmp_path, fmnist_test):
    images, labels = fmnist_test
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("boots", "shirts", "bags"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                px = images[i].repeat(3, 1, 1).permute(1, 2, 0).contiguous()  # colour
                (folder / f"{i}.jpg").write_bytes(encode(px, "JPEG"))
    (tmp_path / "train" / "bags" / "broken.png").write_bytes(b"not an image")
    spec = PreprocessSpec(channels=3, size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = load_image_folder(tmp_path, spec, val_size=6, seed=0)
    assert ds.class_names == ["bags", "boots", "shirts"]
    assert ds.train.images.shape[1:] == (3, 32, 32)
    assert len(ds.train) + len(ds.val) == 36 and len(ds.test) == 12
    with pytest.raises(DataError, match="train/<class>"):
        load_image_folder(tmp_path / "train" / "bags", spec, 5, 0)
