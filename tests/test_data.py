"""The dataset readers on small files written in the real on-disk formats, and on the real Fashion-MNIST; the
split evaluate.py measures the NLL on, and how metrics.json labels it."""

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ddpmlab.data import DEBIAN_FASHION_MNIST, DiffusionDataModule
from ddpmlab.errors import ConfigError
from ddpmlab.evaluation import evaluate
from ddpmlab.training import train
from tests.conftest import ROOT, compose_config


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


def luma(r, g, b) -> int:
    """ITU-R 601-2 luma, Pillow's RGB -> L."""
    return round(r * 0.299 + g * 0.587 + b * 0.114)


def paletted(index: int, transparent: int | None = None) -> Image.Image:
    img = Image.new("P", (4, 4), index)
    img.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 50])
    if transparent is not None:
        img.info["transparency"] = transparent
    return img


def half_transparent(mode: str, opaque) -> Image.Image:
    """Left half fully transparent black (the colour under it must not show), right half `opaque`."""
    img = Image.new(mode, (4, 4), (0,) * len(mode))
    img.paste(opaque, (2, 0, 4, 4))
    return img


WHITE, RED, GREY = (255, 255, 255), (255, 0, 0), (10, 20, 30)
I_40000 = (round(40000 / 257),) * 3  # 32-bit integers are read in the 16-bit range too
# mode -> (image, file suffix Pillow writes that mode to, expected RGB of the left half, of the right half)
MODES = {
    "1": (Image.new("1", (4, 4), 1), "png", WHITE, WHITE),
    "L": (Image.new("L", (4, 4), 77), "png", (77,) * 3, (77,) * 3),
    "P": (paletted(3), "png", (200, 100, 50), (200, 100, 50)),
    "P_transparent": (paletted(1, transparent=1), "png", WHITE, WHITE),
    "RGB": (Image.new("RGB", (4, 4), GREY), "png", GREY, GREY),
    "RGBA": (half_transparent("RGBA", RED + (255,)), "png", WHITE, RED),
    "LA": (half_transparent("LA", (100, 255)), "png", WHITE, (100,) * 3),
    # 16-bit grey: v * 255 / 65535 = v / 257, so 257 * k reads as k.
    "I;16": (Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)), "png", (100,) * 3, (100,) * 3),
    "I;16B": (Image.new("I;16B", (4, 4), 257 * 200), "tif", (200,) * 3, (200,) * 3),
    "I": (Image.fromarray(np.full((4, 4), 40000, np.int32)), "tif", I_40000, I_40000),
    "F": (Image.fromarray(np.full((4, 4), 0.25, np.float32)), "tif", (64,) * 3, (64,) * 3),
    "CMYK": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "tif", RED, RED),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_reads_as_its_8bit_colours(tmp_path, mode, channels):
    image, suffix, left, right = MODES[mode]
    image.save(tmp_path / f"image.{suffix}")
    with Image.open(tmp_path / f"image.{suffix}") as written:  # the file really holds that mode
        assert written.mode == image.mode and written.info.get("transparency") == image.info.get("transparency")
    dm = datamodule("image_folder", tmp_path, image_size=4, channels=channels)
    dm.setup("fit")
    expected = [[luma(*c)] if channels == 1 else list(c) for c in (left, right)]
    got = dm.train_images[0]  # (C, 4, 4)
    assert got[:, :, :2].flatten(1).T.tolist() == [expected[0]] * 8
    assert got[:, :, 2:].flatten(1).T.tolist() == [expected[1]] * 8


def test_transparency_goes_onto_the_configured_background_or_is_refused(tmp_path):
    half_transparent("RGBA", (200, 0, 0, 128)).save(tmp_path / "image.png")
    dm = datamodule("image_folder", tmp_path, image_size=4, channels=3, background="#102030")
    dm.setup("fit")
    assert dm.train_images[0, :, 0, 0].tolist() == [16, 32, 48]
    # alpha 128/255 of (200, 0, 0) over (16, 32, 48), to within Pillow's integer rounding
    over = [f * 128 / 255 + b * 127 / 255 for f, b in zip((200, 0, 0), (16, 32, 48))]
    assert all(abs(a - b) <= 1 for a, b in zip(dm.train_images[0, :, 0, 3].tolist(), over))
    with pytest.raises(ConfigError, match=r"image .*image.png has transparency \(mode RGBA\) and data.background=null"):
        datamodule("image_folder", tmp_path, image_size=4, channels=3, background=None).setup("fit")
    with pytest.raises(ConfigError, match="data.background='nocolour' is not a colour"):
        datamodule("image_folder", tmp_path, image_size=4, channels=3, background="nocolour")


@pytest.mark.parametrize(("mode", "value", "bound"), [("I", 70000, "65535"), ("F", 1.5, "1")])
def test_high_bit_depth_values_outside_their_range_are_refused(tmp_path, mode, value, bound):
    Image.fromarray(np.full((4, 4), value, np.int32 if mode == "I" else np.float32)).save(tmp_path / "image.tif")
    with pytest.raises(ConfigError, match=rf"image .*image.tif \(mode {mode}\) has values .* outside the 0..{bound}"):
        datamodule("image_folder", tmp_path, image_size=4, channels=1).setup("fit")


@pytest.mark.parametrize(("orientation", "dark"), [(6, "top"), (8, "bottom")])
def test_exif_orientation_turns_the_photo_upright(tmp_path, orientation, dark):
    """Stored 64x32 with the left half black; tag 6 displays it turned 90 degrees clockwise, 8 anticlockwise."""
    stored = Image.new("L", (64, 32), 255)
    stored.paste(0, (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    dm = datamodule("image_folder", tmp_path, image_size=8, channels=1)
    dm.setup("fit")
    image = dm.train_images[0, 0].float()  # upright 32x64 -> 8x16 -> its middle 8 rows
    top, bottom = image[:3].mean().item(), image[-3:].mean().item()
    assert (top, bottom) == pytest.approx((0, 255) if dark == "top" else (255, 0), abs=8)
    assert (image[:, 0] - image[:, -1]).abs().max() <= 8  # no left-right difference left


def test_held_out_fraction_is_disjoint_seeded_and_labelled(tmp_path):
    for i in range(20):
        Image.new("L", (4, 4), i * 10).save(tmp_path / f"{i:02d}.png")
    dm = datamodule("image_folder", tmp_path, image_size=4, channels=1, test_fraction=0.2, split_seed=3)
    dm.setup()
    train, test = ({int(v) for v in images[:, 0, 0, 0]} for images in (dm.train_images, dm.test_images))
    assert len(test) == 4 and len(train) == 16 and not train & test
    assert dm.test_split == "held-out 20% (data.split_seed=3)"
    again = datamodule("image_folder", tmp_path, image_size=4, channels=1, test_fraction=0.2, split_seed=3)
    again.setup("test")
    assert torch.equal(again.test_images, dm.test_images)  # the same seed holds out the same images
    other = datamodule("image_folder", tmp_path, image_size=4, channels=1, test_fraction=0.2, split_seed=4)
    other.setup("test")
    assert not torch.equal(other.test_images, dm.test_images)


def test_a_test_folder_is_the_test_split_and_the_rest_train(tmp_path):
    (tmp_path / "train" / "cats").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    for value in (10, 20, 30):
        Image.new("L", (4, 4), value).save(tmp_path / "train" / "cats" / f"{value}.png")
    Image.new("L", (4, 4), 40).save(tmp_path / "beside.png")
    Image.new("L", (4, 4), 200).save(tmp_path / "test" / "held.png")
    dm = datamodule("image_folder", tmp_path, image_size=4, channels=1)
    dm.setup()
    assert sorted(dm.train_images[:, 0, 0, 0].tolist()) == [10, 20, 30, 40]
    assert dm.test_images[:, 0, 0, 0].tolist() == [200]
    assert dm.test_split == "test (the images under data.root/test)"
    with pytest.raises(ConfigError, match="data.test_fraction=0.1 but .*test exists and is the test split"):
        datamodule("image_folder", tmp_path, image_size=4, channels=1, test_fraction=0.1).setup("fit")


def test_without_a_held_out_split_the_test_images_are_labelled_train(tmp_path):
    Image.new("L", (4, 4), 9).save(tmp_path / "only.png")
    dm = datamodule("image_folder", tmp_path, image_size=4, channels=1)
    dm.setup()
    assert torch.equal(dm.train_images, dm.test_images) and dm.test_split == "train images (no held-out split)"
    with pytest.raises(ConfigError, match="gives 0 training and 1 test images"):
        datamodule("image_folder", tmp_path, image_size=4, channels=1, test_fraction=0.5).setup("fit")
    assert datamodule("mnist", tmp_path).test_split == "test"


@pytest.fixture(scope="module")
def image_folder_run(tmp_path_factory):
    """A smoke checkpoint trained on 12 grayscale 28x28 images in a folder with no held-out split."""
    root = tmp_path_factory.mktemp("image_folder")
    (root / "images").mkdir()
    for i in range(12):
        Image.new("L", (28, 28), i * 20).save(root / "images" / f"{i:02d}.png")
    train(compose_config("experiment=smoke", "data=image_folder", f"data.root={root / 'images'}", "data.channels=1",
                         "data.image_size=28", output_dir=root / "run"))
    return {"ckpt": root / "run" / "checkpoints" / "last.ckpt", "images": root / "images"}


def nll_rows(ckpt, out, *overrides) -> list[dict]:
    from tests.test_evaluate import compose_eval  # that module imports this one

    evaluate(compose_eval(f"ckpt={ckpt}", "metrics=[nll_estimate]", "nll_estimate.timesteps=2", *overrides,
                          output_dir=out))
    return json.loads((out / "metrics.json").read_text())["results"]


def test_metrics_json_labels_a_held_out_split_and_a_test_folder(image_folder_run, tmp_path):
    # The same run, as if trained with data.test_fraction=0.25 (the label reads only the stored data config).
    checkpoint = torch.load(image_folder_run["ckpt"], weights_only=True)
    checkpoint["config"]["data"]["test_fraction"] = 0.25
    torch.save(checkpoint, tmp_path / "held_out.ckpt")
    [row] = nll_rows(tmp_path / "held_out.ckpt", tmp_path / "fraction")
    assert row["split"] == "held-out 25% (data.split_seed=0)" and row["test_images"] == 3

    shutil.copytree(image_folder_run["images"], tmp_path / "with_test")
    (tmp_path / "with_test" / "test").mkdir()
    for name in ("00.png", "05.png"):
        (tmp_path / "with_test" / name).rename(tmp_path / "with_test" / "test" / name)
    [row] = nll_rows(image_folder_run["ckpt"], tmp_path / "folder", f"data_root={tmp_path / 'with_test'}")
    assert row["split"] == "test (the images under data.root/test)" and row["test_images"] == 2


@pytest.mark.slow
def test_evaluate_without_a_held_out_split_says_the_nll_is_on_training_images(image_folder_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"ckpt={image_folder_run['ckpt']}",
                             "metrics=[nll_estimate]", "nll_estimate.timesteps=2", f"hydra.run.dir={tmp_path}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-800:]
    [row] = json.loads((tmp_path / "metrics.json").read_text())["results"]
    assert row["split"] == "train images (no held-out split)" and row["test_images"] == 12
    assert "split=train images (no held-out split)" in result.stdout
    assert "warning: the NLL above is on training images" in result.stderr


@pytest.mark.slow
def test_a_sweep_without_a_held_out_split_says_val_bpd_is_on_training_images(image_folder_run, tmp_path):
    """As evaluate.py labels its NLL: each run's log and val/bpd line say it, and so does the sweep's summary."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", "data=image_folder",
                             f"data.root={image_folder_run['images']}", "data.channels=1", "data.image_size=28",
                             "optim.lr=1e-3,2e-3", "trainer.max_steps=2", "callbacks.sample_grid=null",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("split: train images (no held-out split)") == 2
    assert (result.stdout + result.stderr).count("val/bpd is measured on training images: data.root=") == 2
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "val/bpd of runs 0, 1 is measured on training images (the data has no held-out split)" in summary


def test_a_part_of_a_split_is_a_fixed_random_subset_that_spans_a_class_sorted_split():
    """evaluation_subset: 100 of 1000 images stored as 10 classes in order (an image folder's <class>/ order)
    hold every class, not the first one alone; the same every time; a smaller part is a prefix of a larger; the
    whole split (or null) is the split itself."""
    from ddpmlab.data import evaluation_subset

    images = torch.arange(1000).repeat_interleave(3 * 2 * 2).reshape(1000, 3, 2, 2)  # image i holds the value i
    part = evaluation_subset(images, 100)
    assert part.shape == (100, 3, 2, 2) and len(set(part[:, 0, 0, 0].tolist())) == 100
    assert set((part[:, 0, 0, 0] // 100).tolist()) == set(range(10))  # class = i // 100
    assert torch.equal(part, evaluation_subset(images, 100))
    assert torch.equal(evaluation_subset(images, 30), part[:30])
    assert evaluation_subset(images, 1000) is images and evaluation_subset(images, None) is images
