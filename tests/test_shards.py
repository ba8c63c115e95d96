"""Data beyond RAM: `python -m ddpmlab.prepare` writes litdata shards, and data=shards trains, resumes, splits
across DDP ranks and evaluates from them through the same DiffusionDataModule, never asking PyPI anything."""

import hashlib
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from PIL import Image

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.data import DiffusionDataModule, evaluation_subset, load_image, resize_crop
from ddpmlab.errors import ConfigError
from ddpmlab.evaluation import evaluate
from ddpmlab.metrics.fidelity import reference_cache_name
from ddpmlab.prepare import main as prepare
from ddpmlab.resume import check_resume
from ddpmlab.shards import ShardImages
from ddpmlab.training import train
from tests.conftest import ROOT, compose_config
from tests.test_data import write_cifar10, write_mnist_like

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
SIZE = 16


def digests(images) -> list[str]:
    return sorted(hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in images)


def write_folder(root, n_train=24, n_test=6):
    """RGB images of assorted sizes, some below nested folders, and a test/ folder: the image-folder layout."""
    rng = np.random.default_rng(0)
    for i in range(n_train + n_test):
        folder = root / "test" if i >= n_train else root / "a" / "b" if i % 3 else root
        folder.mkdir(parents=True, exist_ok=True)
        size = (20 + i % 5, 17 + i % 7)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An image folder written as 16x16 shards by the README's command (30 images, 6 of them under test/)."""
    root = tmp_path_factory.mktemp("shards")
    write_folder(root / "images")
    result = subprocess.run([sys.executable, "-m", "ddpmlab.prepare", str(root / "images"), "--out", str(root / "out"),
                             "--image-size", str(SIZE), "--workers", "2"],
                            env=ENV, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "100%" in result.stderr  # the progress bar
    return {"images": root / "images", "out": root / "out"}


def test_prepare_writes_every_image_resized_and_centre_cropped_as_uint8(shards):
    train_files = [p for p in shards["images"].rglob("*.png") if "test" not in p.parts]
    test_files = sorted((shards["images"] / "test").glob("*.png"))
    for split, files in (("train", train_files), ("test", test_files)):
        images = ShardImages(shards["out"] / split)
        assert len(images) == len(files) and images.shape == (len(files), 3, SIZE, SIZE)
        assert images[0].dtype == torch.uint8
        # the very pixels the in-memory image_folder reader gives (EXIF, 8-bit, shorter side resized, centre crop)
        assert digests(images[:]) == digests(load_image(p, SIZE, 3, (255, 255, 255)) for p in files)


def test_prepare_writes_both_splits_of_an_mnist_download_at_the_asked_size(tmp_path):
    train_images, test_images = write_mnist_like(tmp_path / "MNIST" / "raw")
    prepare([f"mnist:{tmp_path}", "--out", str(tmp_path / "out"), "--image-size", "32", "--workers", "1"])

    def resized(array):
        return [resize_crop(Image.fromarray(a.astype(np.uint8)), 32, 1) for a in array]

    assert digests(ShardImages(tmp_path / "out" / "train")[:]) == digests(resized(train_images))
    assert digests(ShardImages(tmp_path / "out" / "test")[:]) == digests(resized(test_images))


def test_prepare_reads_a_repacked_cifar10_with_its_own_switch_for_the_checksums(tmp_path):
    """A copy whose MD5 sums are not the release's: the refusal names prepare's switch (not a training key), and
    with it both splits are written."""
    expected = write_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ConfigError, match=r"not found or corrupted .* or --no-verify-checksums for a re-packed copy"):
        prepare([f"cifar10:{tmp_path}", "--out", str(tmp_path / "out"), "--image-size", "32", "--workers", "1"])
    assert not (tmp_path / "out").exists()
    prepare([f"cifar10:{tmp_path}", "--out", str(tmp_path / "out"), "--image-size", "32", "--workers", "1",
             "--no-verify-checksums"])
    assert digests(ShardImages(tmp_path / "out" / "train")[:]) == digests(torch.from_numpy(expected))
    assert len(ShardImages(tmp_path / "out" / "test")) == 4


@pytest.mark.parametrize(("modes", "channels_arg", "channels"), [
    (["L", "L", "P-grey", "I;16"], [], 1), (["L", "RGB", "L"], [], 3), (["L", "L"], ["--channels", "3"], 3),
])
def test_prepare_stores_a_grayscale_folder_as_one_channel_unless_told(tmp_path, modes, channels_arg, channels):
    for i, mode in enumerate(modes):
        if mode == "P-grey":  # a palette of greys only
            image = Image.new("P", (12, 12), 3)
            image.putpalette([v for g in range(256) for v in (g, g, g)])
        else:
            image = Image.new(mode, (12, 12), 40 * (i + 1) if mode != "RGB" else (200, 10, 10))
        image.save(tmp_path / f"{i}.png")
    prepare([str(tmp_path), "--out", str(tmp_path / "out"), "--image-size", "8", "--workers", "1", *channels_arg])
    assert ShardImages(tmp_path / "out" / "train").shape == (len(modes), channels, 8, 8)


def test_prepare_reads_lsuns_lmdb_export(tmp_path):
    """LSUN's export: an LMDB of encoded images (webp in the release) keyed by image id."""
    lmdb = pytest.importorskip("lmdb")
    rng, encoded = np.random.default_rng(1), []
    for i in range(5):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (30 + i, 24, 3), dtype=np.uint8)).save(buffer, "WEBP", lossless=True)
        encoded.append(buffer.getvalue())
    with lmdb.open(str(tmp_path / "church_outdoor_train_lmdb"), map_size=2**24) as env, env.begin(write=True) as txn:
        for i, data in enumerate(encoded):
            txn.put(f"{i:040x}".encode(), data)
    prepare([f"lsun:{tmp_path / 'church_outdoor_train_lmdb'}", "--out", str(tmp_path / "out"), "--image-size", "16",
             "--workers", "1"])
    assert not (tmp_path / "out" / "test").exists()
    assert digests(ShardImages(tmp_path / "out" / "train")[:]) == digests(
        load_image(io.BytesIO(data), 16, 3, (255, 255, 255)) for data in encoded)


@pytest.mark.parametrize(("args", "message"), [
    (["{images}", "--out", "{out}", "--image-size", "0"], "--image-size=0 must be at least 1"),
    (["{images}", "--out", "{full}", "--image-size", "8"], "--out={full} exists and is not an empty folder"),
    (["{images}/nowhere", "--out", "{out}", "--image-size", "8"], "SRC={images}/nowhere does not exist"),
    (["imagenet:{images}", "--out", "{out}", "--image-size", "8"], "SRC=imagenet:{images} is no folder"),
    ([f"cifar10:{ROOT}", "--out", "{out}", "--image-size", "8"], f"CIFAR-10 not found or corrupted under {ROOT}"),
])
def test_bad_arguments_name_the_problem_and_write_nothing(shards, tmp_path, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    where = {"images": shards["images"], "out": tmp_path / "out", "full": tmp_path / "full"}
    with pytest.raises(ConfigError) as raised:
        prepare([a.format(**where) for a in args])
    assert str(raised.value).startswith(message.format(**where))
    assert not (tmp_path / "out").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_the_command_prints_a_bad_argument_in_one_line_and_exits_2(shards, tmp_path):
    result = subprocess.run([sys.executable, "-m", "ddpmlab.prepare", str(shards["images"]), "--out",
                             str(tmp_path / "out"), "--image-size", "0"], env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and result.stderr == "error: --image-size=0 must be at least 1: the side in pixels, e.g. 64\n"
    assert not (tmp_path / "out").exists()
    for args, says in ((["--image-size", "8"], "the following arguments are required: --out"),  # argparse's own
                       (["--out", str(tmp_path / "out"), "--image-size", "8px"], "argument --image-size: invalid int")):
        result = subprocess.run([sys.executable, "-m", "ddpmlab.prepare", str(shards["images"]), *args], env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {says}") and result.stderr.count("\n") == 1
        assert result.stderr.endswith("(see python -m ddpmlab.prepare --help)\n") and not (tmp_path / "out").exists()


def test_a_corrupt_image_is_one_line_exit_2_and_leaves_no_out_folder_so_a_rerun_works(shards, tmp_path):
    """The image fails in a litdata worker, partway through: --out appears only once every image is written."""
    shutil.copytree(shards["images"] / "test", tmp_path / "images")
    corrupt = sorted((tmp_path / "images").glob("*.png"))[3]
    good = corrupt.read_bytes()
    corrupt.write_bytes(b"not a png")
    command = [sys.executable, "-m", "ddpmlab.prepare", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
               "--image-size", "8", "--workers", "2"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("error: ") == 1 and (f"error: cannot read image {corrupt} (UnidentifiedImageError): "
                                                    "remove or replace that file\n") in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["images"]
    corrupt.write_bytes(good)
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"] and len(ShardImages(tmp_path / "out" / "train")) == 6


class CountReads:
    """litdata's dataset, recording the index of every image read through it."""

    def __init__(self, dataset):
        self.dataset, self.read = dataset, []

    def __getitem__(self, index):
        self.read.append(index)
        return self.dataset[index]


def test_the_fid_reference_reads_its_shard_images_one_at_a_time_and_no_others(shards, tmp_path):
    """evaluation's reference is evaluation_subset(train_images, n): on shards a view, read image by image by the
    cache digest and the features (so memory does not grow with n), the same images and cache name as the
    tensor's subset."""
    images = ShardImages(shards["out"] / "train")
    in_memory = images[:]  # (24, C, S, S): the in-memory path's split
    images.dataset = counted = CountReads(images.dataset)
    reference = evaluation_subset(images, 5)
    assert counted.read == [] and reference.shape == (5, 3, SIZE, SIZE)
    assert reference_cache_name(reference, "inception", "w", "x") == reference_cache_name(
        evaluation_subset(in_memory, 5), "inception", "w", "x")
    chosen = counted.read[:5]
    assert counted.read == chosen and len(set(chosen)) == 5 and chosen != [0, 1, 2, 3, 4]
    assert torch.equal(torch.stack([reference[i] for i in range(5)]), in_memory[chosen])


def write_sorted_classes(root, classes=8, per_class=40):
    """ImageNet's layout, root/train/<class>/, each class's images sorted together; the class is the red value
    (class x 30), which the 16x16 round trip keeps exactly."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / "train" / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            pixels[..., 0] = 30 * c
            Image.fromarray(pixels).save(root / "train" / f"n{c:08d}" / f"{i:03d}.png")


def batch_classes(dm, epochs=3):
    """The classes in each training batch of `epochs` epochs, as the DataModule's loader gives them."""
    dm.setup("fit")
    return [sorted((x[:, 0, 0, 0] // 30).tolist()) for _ in range(epochs) for x in dm.train_dataloader()]


def test_shards_of_a_class_sorted_source_give_the_in_memory_paths_batches_for_any_worker_count(tmp_path):
    """8 classes x 40 images written in class order by the README's command: each batch of 16 from the shards
    holds the classes the in-memory image_folder path's batch holds (litdata's loader, which shuffles chunks and
    then only within a chunk, gave 1-3 classes a batch), about 7.3 of 8 on average as a random draw does, and
    the order is the same with 0 or 2 loader workers."""
    write_sorted_classes(tmp_path / "images")
    prepared = subprocess.run([sys.executable, "-m", "ddpmlab.prepare", str(tmp_path / "images" / "train"), "--out",
                               str(tmp_path / "out"), "--image-size", str(SIZE), "--workers", "1"],
                              env=ENV, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    in_memory = batch_classes(DiffusionDataModule("image_folder", str(tmp_path / "images" / "train"), SIZE, 3,
                                                  batch_size=16, seed=3))
    from_shards = {workers: batch_classes(DiffusionDataModule("shards", str(tmp_path), SIZE, 3, batch_size=16, seed=3,
                                                              num_workers=workers, path=str(tmp_path / "out")))
                   for workers in (0, 2)}
    assert from_shards[0] == from_shards[2] == in_memory
    mean = np.mean([len(set(classes)) for classes in from_shards[0]])
    expected = 8 * (1 - math.comb(320 - 40, 16) / math.comb(320, 16))  # a batch drawn at random: 7.34
    assert abs(mean - expected) < 0.05 * expected, (mean, expected)


def test_changing_num_workers_keeps_exact_resume_on_shards_and_in_memory(shards, tmp_path):
    """The batch order is a function of (data.seed, step) alone on every source: no note, on shards either."""
    for cfg in (shards_config(shards["out"], tmp_path), compose_config("experiment=smoke", output_dir=tmp_path)):
        stored = OmegaConf.to_container(cfg, resolve=True)
        config = {**stored, "data": {**stored["data"], "num_workers": stored["data"]["num_workers"] + 2}}
        assert check_resume(stored, config, cfg, "last.ckpt") == ([], [])


class Proxy:
    """A loopback 'HTTPS proxy' that counts the connections made to it and closes each at once."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url, self.connections = f"http://127.0.0.1:{self.server.getsockname()[1]}", 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            connection, _ = self.server.accept()
            self.connections += 1
            connection.close()


def test_no_pypi_version_check_even_where_litdata_would_make_one(shards, tmp_path):
    """litdata asks pypi.org for a newer version when a dataset or optimize() starts, by default in the versions
    pyproject allows before 0.2.7x and with LITDATA_CHECK_UPDATES=1 after: every request would reach the proxy."""
    proxy = Proxy()
    env = {**ENV, "LITDATA_CHECK_UPDATES": "1", "LITDATA_DISABLE_VERSION_CHECK": "0", "NO_PROXY": "", "no_proxy": "",
           "HTTPS_PROXY": proxy.url, "https_proxy": proxy.url, "HTTP_PROXY": proxy.url, "http_proxy": proxy.url}
    prepared = subprocess.run([sys.executable, "-m", "ddpmlab.prepare", str(shards["images"] / "test"), "--out",
                               str(tmp_path / "out"), "--image-size", "8", "--workers", "1"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    read = ("from ddpmlab.data import DiffusionDataModule as D; d = D('shards', '.', 8, 3, batch_size=2, "
            f"path={str(tmp_path / 'out')!r}); d.setup(); print(next(iter(d.train_dataloader())).shape)")
    trained = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=300)
    assert trained.stdout.strip() == "torch.Size([2, 3, 8, 8])", trained.stderr[-2000:]
    assert proxy.connections == 0


class RecordBatches(L.Callback):
    """The checksum of every training batch, in order (class-level: train() builds the instance)."""

    seen: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        RecordBatches.seen.append(hashlib.sha256(batch.cpu().numpy().tobytes()).hexdigest())


def shards_config(out, output_dir, *overrides):
    return compose_config("experiment=smoke", "data=shards", f"data.path={out}", f"data.image_size={SIZE}",
                          "model.attn_resolutions=[8]", "data.batch_size=4", "val.num_images=2",
                          "callbacks.sample_grid=null", "trainer.deterministic=true", *overrides, output_dir=output_dir)


def run(out, output_dir, *overrides):
    cfg = shards_config(out, output_dir, "callbacks.checkpoint.every_n_train_steps=4", *overrides)
    with open_dict(cfg):
        cfg.callbacks.batches = {"_target_": f"{__name__}.RecordBatches"}
    RecordBatches.seen = []
    train(cfg)
    return output_dir / "checkpoints" / "last.ckpt", RecordBatches.seen


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    """14 steps in one go: 6 batches of 4 an epoch, so 2 epochs and a part, each in its own (seed, epoch) order."""
    last, seen = run(shards["out"], tmp_path_factory.mktemp("whole"), "trainer.max_steps=14")
    return load_checkpoint(last), seen


@pytest.mark.parametrize("stop", [8, 6])  # within the second epoch; at the end of the first
def test_stopping_and_resuming_streams_the_uninterrupted_run_bit_for_bit(shards, uninterrupted, tmp_path, stop):
    whole, seen = uninterrupted
    assert len(set(seen)) == 14 and len(set(seen[:6]) & set(seen[6:12])) == 0
    half, _ = run(shards["out"], tmp_path / "half", f"trainer.max_steps={stop}")
    last, resumed_seen = run(shards["out"], tmp_path / "resumed", "trainer.max_steps=14", f"ckpt_path={half}")
    assert resumed_seen == seen[stop:]
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == 14
    for key, value in whole["state_dict"].items():  # model, ema_model
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_evaluation_takes_the_nll_split_and_the_fid_reference_from_the_shards(shards, uninterrupted, tmp_path):
    from tests.test_evaluate import compose_eval

    dm = DiffusionDataModule("shards", str(tmp_path), SIZE, 3, path=str(shards["out"]))
    dm.setup()
    assert isinstance(dm.train_images, ShardImages) and len(dm.train_images) == 24 and len(dm.test_images) == 6
    assert dm.test_split == "test"
    ckpt = tmp_path / "run.ckpt"
    torch.save(uninterrupted[0], ckpt)
    evaluate(compose_eval(f"ckpt={ckpt}", "metrics=[nll_estimate,fid]", "nll_estimate.timesteps=2", "num_samples=4",
                          "sampler=ddim", "sampling_steps=2", "reference_images=5", f"data_root={tmp_path}",
                          output_dir=tmp_path / "eval"))
    rows = {row["metric"]: row for row in json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"]}
    assert rows["nll_estimate (bits/dim)"]["split"] == "test" and rows["nll_estimate (bits/dim)"]["test_images"] == 6
    assert rows["fid"]["reference_images"] == 5 and rows["fid"]["value"] > 0


def test_missing_shards_or_another_image_size_is_one_clear_error(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"data.path=.* holds no shards .*python -m ddpmlab.prepare SRC --out"):
        DiffusionDataModule("shards", str(tmp_path), SIZE, 3, path=str(tmp_path)).setup("fit")
    with pytest.raises(ConfigError, match=r"shards images are \(3, 16, 16\) \(C, H, W\) but the config says "
                                          r"channels=3 image_size=32"):
        DiffusionDataModule("shards", str(tmp_path), 32, 3, path=str(shards["out"])).setup("fit")


class RecordImagesToFile(L.Callback):
    """Each rank's training images, one digest a line, in $RECORD_DIR/rank<r>.txt."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(os.path.join(os.environ["RECORD_DIR"], f"rank{trainer.global_rank}.txt"), "a") as f:
            f.writelines(hashlib.sha256(image.cpu().numpy().tobytes()).hexdigest() + "\n" for image in batch)


@pytest.mark.slow
def test_ddp_ranks_stream_disjoint_images_that_cover_the_epoch(shards, tmp_path):
    """2 gloo processes, batch 4 each: 3 steps are one epoch of the 24 training images, each seen exactly once."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "data=shards", f"data.path={shards['out']}",
         f"data.image_size={SIZE}", "model.attn_resolutions=[8]", "data.batch_size=4", "data.random_flip=false",
         "val.num_images=2", "callbacks.sample_grid=null", "trainer.max_steps=3", "trainer.accelerator=cpu",
         "trainer.devices=2", "trainer.strategy=ddp", f"paths.log_dir={tmp_path}",
         f"+callbacks.record._target_={__name__}.RecordImagesToFile"],
        cwd=tmp_path, env={**ENV, "RECORD_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12 and not set(ranks[0]) & set(ranks[1])
    to_float = lambda x: x.float() / 127.5 - 1.0  # noqa: E731  the batches the callback sees are in [-1, 1]
    expected = [hashlib.sha256(to_float(image).numpy().tobytes()).hexdigest() for image in
                ShardImages(shards["out"] / "train")[:]]
    assert sorted(ranks[0] + ranks[1]) == sorted(expected)
