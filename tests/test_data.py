"""The dataset readers on small files written in the real on-disk formats, and on the real Fashion-MNIST."""

import pickle
import struct

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ddpmlab.data import DEBIAN_FASHION_MNIST, DiffusionDataModule
from ddpmlab.errors import ConfigError


def write_idx(path, array: np.ndarray) -> None:
    """IDX as LeCun's MNIST files: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist_like(raw_dir, n_train=12, n_test=5, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 256, (n_test, 28, 28))
    write_idx(raw_dir / "train-images-idx3-ubyte", train)
    write_idx(raw_dir / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train))
    write_idx(raw_dir / "t10k-images-idx3-ubyte", test)
    write_idx(raw_dir / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test))
    return train, test


def write_cifar10(folder, per_batch=4, seed=0) -> np.ndarray:
    """The CIFAR-10 python version: pickled dicts with 'data' (N, 3072) uint8 rows (R, G, B planes) and 'labels'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(rng.integers(0, 10, per_batch)), "batch_label": name}, f)
        batches.append(data)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, f)
    return np.concatenate(batches[:5]).reshape(-1, 3, 32, 32)


def datamodule(dataset, root, image_size=28, channels=1, **kwargs) -> DiffusionDataModule:
    return DiffusionDataModule(dataset, str(root), image_size=image_size, channels=channels, batch_size=4, **kwargs)


@pytest.mark.parametrize(("dataset", "folder"), [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_idx_files_are_read_by_torchvision_and_scaled_to_minus_one_one(tmp_path, dataset, folder):
    train, test = write_mnist_like(tmp_path / folder / "raw")
    dm = datamodule(dataset, tmp_path)
    dm.setup("fit")
    dm.setup("test")
    assert torch.equal(dm.train_images[:, 0], torch.from_numpy(train.astype(np.uint8)))
    assert len(dm.test_images) == len(test)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch.shape == (4, 1, 28, 28) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    # 0 -> -1 and 255 -> 1 exactly.
    scaled = dm.on_after_batch_transfer(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), 0)
    assert scaled.flatten().tolist() == [-1.0, 1.0]


def test_cifar10_python_pickles_are_read_by_torchvision(tmp_path):
    expected = write_cifar10(tmp_path / "cifar-10-batches-py")
    dm = datamodule("cifar10", tmp_path, image_size=32, channels=3, verify_checksums=False)
    dm.setup("fit")
    assert dm.train_images.shape == (20, 3, 32, 32)
    assert torch.equal(dm.train_images, torch.from_numpy(expected))


def test_cifar10_checksums_are_verified_by_default(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ConfigError, match="not found or corrupted.*verify_checksums=false"):
        datamodule("cifar10", tmp_path, image_size=32, channels=3).setup("fit")


def test_image_folder_is_resized_centre_cropped_and_read_recursively(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a" / "wide.png")
    Image.new("L", (16, 16), 128).save(tmp_path / "a" / "b" / "small.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    dm = datamodule("image_folder", tmp_path, image_size=8, channels=3)
    dm.setup("fit")
    assert dm.train_images.shape == (2, 3, 8, 8)
    small, wide = dm.train_images  # sorted paths: a/b/small.jpg, a/wide.png
    assert wide[0].min() == 255 and wide[1:].max() == 0  # red stays red
    assert abs(int(small.float().mean()) - 128) <= 1  # grayscale becomes 3 equal channels


def test_unreadable_image_is_named_in_the_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ConfigError, match="cannot read image .*broken.png"):
        datamodule("image_folder", tmp_path, image_size=8, channels=3).setup("fit")


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "image_folder"])
def test_missing_data_folder_is_one_clear_error(tmp_path, dataset):
    with pytest.raises(ConfigError, match="does not exist: point data.root"):
        datamodule(dataset, tmp_path / "nowhere").setup("fit")


def test_missing_mnist_files_say_how_to_get_them(tmp_path):
    with pytest.raises(ConfigError, match="MNIST not found .*data.download=true"):
        datamodule("mnist", tmp_path).setup("fit")


def test_image_shape_must_match_the_config(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw")
    with pytest.raises(ConfigError, match="fix data.channels and data.image_size"):
        datamodule("mnist", tmp_path, image_size=32).setup("fit")


@pytest.mark.parametrize("random_flip", [True, False])
def test_random_flip_is_a_switch_for_training_batches(tmp_path, random_flip):
    dm = datamodule("mnist", tmp_path, random_flip=random_flip)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.training = True
    dm.trainer = trainer
    image = (torch.arange(28) * 9).to(torch.uint8).repeat(256, 1, 28, 1)  # (256, 1, 28, 28), each row dark to bright
    out = dm.on_after_batch_transfer(image, 0)
    flipped = (out[:, 0, 0, 0] > 0).sum().item()  # a flipped image starts with the bright end
    assert (80 < flipped < 176) if random_flip else flipped == 0
    trainer.testing = True  # evaluation batches are never flipped
    assert (dm.on_after_batch_transfer(image, 0)[:, 0, 0, 0] < 0).all()


def test_real_fashion_mnist_comes_from_the_debian_package(tmp_path):
    assert DEBIAN_FASHION_MNIST.is_dir(), "install it: apt-get install dataset-fashion-mnist (make test does)"
    dm = datamodule("fashion_mnist", tmp_path / "data")
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_images.shape == (60_000, 1, 28, 28) and dm.test_images.shape == (10_000, 1, 28, 28)
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    # Clothing on a black background: dark borders, bright middles.
    mean = dm.train_images.float().mean(0)[0]
    assert mean[0, 0] < 5 and mean[14, 14] > 100
