"""Class-conditional training: labels from every data source, label dropout that follows the seed and rank and
resumes exactly, the class names in the checkpoint, and nothing extra for an unconditional run."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from omegaconf import open_dict
from PIL import Image

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.data import DiffusionDataModule, evaluation_subset
from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.schedules import linear_betas
from ddpmlab.errors import ConfigError
from ddpmlab.prepare import main as prepare
from ddpmlab.training import train
from tests.conftest import ROOT, compose_config
from tests.test_data import write_cifar10, write_mnist_like

DATA = ROOT / "data"


def write_class_folders(root: Path, counts: dict[str, int], size=(12, 10), test: dict[str, int] | None = None):
    """PNG images in root/<class>/ (and root/test/<class>/): class k's images have grey level 40 k + 20."""
    for where, per_class in ((root, counts), (root / "test", test or {})):
        for k, (name, n) in enumerate(sorted(per_class.items())):
            (where / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("L", size, 40 * k + 20 + i).save(where / name / f"{i}.png")


def _pickled(folder: Path, names: list[str], key: str) -> list:
    out = []
    for name in names:
        with open(folder / name, "rb") as f:
            out += list(pickle.load(f)[key])
    return out


def test_torchvision_datasets_carry_their_own_labels_and_class_names(tmp_path):
    """Labels as the files hold them (IDX label files, the CIFAR-10 pickles' `labels`), aligned with the images."""
    write_mnist_like(tmp_path / "MNIST" / "raw", n_train=12, n_test=5)
    write_cifar10(tmp_path / "cifar-10-batches-py")
    batches = tmp_path / "cifar-10-batches-py"
    expected = {("mnist", True): list(torchvision.datasets.MNIST(str(tmp_path), train=True).targets),
                ("mnist", False): list(torchvision.datasets.MNIST(str(tmp_path), train=False).targets),
                ("cifar10", True): _pickled(batches, [f"data_batch_{i}" for i in range(1, 6)], "labels"),
                ("cifar10", False): _pickled(batches, ["test_batch"], "labels")}
    names = {"mnist": torchvision.datasets.MNIST.classes, "cifar10": [f"class{i}" for i in range(10)]}
    for dataset, size, channels in (("mnist", 28, 1), ("cifar10", 32, 3)):
        dm = DiffusionDataModule(dataset, str(tmp_path), size, channels, batch_size=4, num_classes=10,
                                 verify_checksums=False)
        dm.setup()
        for train, labels in ((True, dm.train_labels), (False, dm.test_labels)):
            assert labels.tolist() == [int(v) for v in expected[dataset, train]], (dataset, train)
        assert dm.class_names == names[dataset]
        x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
        assert x.shape == (4, channels, size, size) and y.dtype == torch.long and y.shape == (4,)


def test_an_unconditional_datamodule_reads_no_labels_and_yields_images_alone(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw", n_train=12, n_test=5)
    dm = DiffusionDataModule("mnist", str(tmp_path), 28, 1, batch_size=4)
    dm.setup()
    assert dm.train_labels is None and dm.test_labels is None and dm.class_names is None
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert isinstance(batch, torch.Tensor) and batch.shape == (4, 1, 28, 28)


def test_an_image_folder_takes_each_class_from_its_first_level_folder(tmp_path):
    """As torchvision's ImageFolder: sorted folder names are the classes, nested folders belong to theirs; a test/
    folder's images are the test split, classed by their folder below it."""
    write_class_folders(tmp_path, {"cat": 3, "dog": 2, "ant": 1}, test={"dog": 1, "cat": 1})
    (tmp_path / "dog" / "deeper").mkdir()
    Image.new("L", (12, 10), 250).save(tmp_path / "dog" / "deeper" / "x.png")
    dm = DiffusionDataModule("image_folder", str(tmp_path), 8, 1, batch_size=2, num_classes=3)
    dm.setup()
    assert dm.class_names == ["ant", "cat", "dog"]
    # read_image_folder's order is the sorted paths: ant/0, cat/0..2, dog/0, dog/1, dog/deeper/x
    assert dm.train_labels.tolist() == [0, 1, 1, 1, 2, 2, 2]
    assert dm.train_images[-1].float().mean() > 200  # dog/deeper/x.png, aligned with its label
    assert dm.test_labels.tolist() == [1, 2]
    held = DiffusionDataModule("image_folder", str(tmp_path / "split"), 8, 1, batch_size=2, num_classes=2,
                               test_fraction=0.25)
    write_class_folders(tmp_path / "split", {"a": 4, "b": 4})
    held.setup()
    for images, labels in ((held.train_images, held.train_labels), (held.test_images, held.test_labels)):
        assert ((images[:, 0, 0, 0] >= 60).long() == labels).all()  # class b's images are the brighter ones


@pytest.mark.parametrize(("layout", "num_classes", "message"), [
    ("loose", 2, "model.num_classes=2 needs class labels, and image_folder data.root={root} has none: put each "
                 "class's images in a folder of its own, data.root/<class>/"),
    ("two_classes", 5, "model.num_classes=5 but image_folder data.root={root} has 2 classes (a, b): set "
                       "model.num_classes=2"),
    ("test_only_class", 3, "class 'c' has test images and no training images"),
])
def test_labels_the_data_cannot_give_are_refused_in_one_line(tmp_path, layout, num_classes, message):
    root = tmp_path / "images"
    write_class_folders(root, {"a": 2, "b": 2}, test={"c": 1} if layout == "test_only_class" else None)
    if layout == "loose":
        Image.new("L", (8, 8)).save(root / "loose.png")
    dm = DiffusionDataModule("image_folder", str(root), 8, 1, batch_size=2, num_classes=num_classes)
    with pytest.raises(ConfigError) as err:
        dm.setup("fit")
    assert message.format(root=root) in str(err.value)


def test_prepare_writes_labels_into_the_shards_and_data_shards_reads_them_aligned(tmp_path):
    write_class_folders(tmp_path / "images", {"b": 3, "a": 2}, test={"a": 1, "b": 1})
    prepare([str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--image-size", "8", "--workers", "1"])
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["a", "b"]
    shards = DiffusionDataModule("shards", str(tmp_path), 8, 1, batch_size=2, path=str(tmp_path / "out"), num_classes=2)
    folder = DiffusionDataModule("image_folder", str(tmp_path / "images"), 8, 1, batch_size=2, num_classes=2)
    shards.setup()
    folder.setup()
    assert shards.class_names == folder.class_names == ["a", "b"]
    for split in ("train", "test"):
        images, labels = getattr(shards, f"{split}_images"), getattr(shards, f"{split}_labels")
        assert torch.equal(images[:], getattr(folder, f"{split}_images")) and torch.equal(labels[:], getattr(folder, f"{split}_labels"))
        # the FID reference's and the NLL's subsets: the labels stay with their images
        sub_images, sub_labels = evaluation_subset(images, 3), evaluation_subset(labels, 3)
        assert torch.equal(sub_labels[:], evaluation_subset(getattr(folder, f"{split}_labels"), 3))
        assert torch.equal(sub_images[:], evaluation_subset(getattr(folder, f"{split}_images"), 3))
    x, y = shards.on_after_batch_transfer(next(iter(shards.train_dataloader())), 0)
    assert x.shape == (2, 1, 8, 8) and y.shape == (2,)
    prepare([f"mnist:{_mnist(tmp_path)}", "--out", str(tmp_path / "mnist"), "--image-size", "28", "--workers", "1"])
    mnist = DiffusionDataModule("shards", str(tmp_path), 28, 1, batch_size=2, path=str(tmp_path / "mnist"), num_classes=10)
    mnist.setup("fit")
    assert mnist.train_labels[:].tolist() == list(torchvision.datasets.MNIST(_mnist(tmp_path), train=True).targets)
    assert mnist.class_names == torchvision.datasets.MNIST(_mnist(tmp_path), train=True).classes


def _mnist(tmp_path: Path) -> str:
    if not (tmp_path / "m" / "MNIST").is_dir():
        write_mnist_like(tmp_path / "m" / "MNIST" / "raw", n_train=9, n_test=3)
    return str(tmp_path / "m")


def test_label_dropout_replaces_that_share_by_no_class_from_the_global_rng():
    diffusion = GaussianDiffusion(linear_betas(10), cond_drop_prob=0.2)
    y = torch.arange(100_000) % 7
    torch.manual_seed(3)
    dropped = diffusion.drop_labels(y, 7)
    assert (dropped == 7).float().mean().item() == pytest.approx(0.2, abs=0.005)  # 6 standard errors
    assert torch.equal(dropped[dropped != 7], y[dropped != 7])
    torch.manual_seed(3)
    assert torch.equal(diffusion.drop_labels(y, 7), dropped)  # the seed decides which
    state = torch.get_rng_state()
    assert diffusion.drop_labels(None, 7) is None and torch.equal(torch.get_rng_state(), state)  # no labels: no draw
    with pytest.raises(ConfigError, match=r"diffusion.cond_drop_prob must be in \[0, 1\), got 1"):
        GaussianDiffusion(linear_betas(10), cond_drop_prob=1)


class RecordLabels(L.Callback):
    """Per step, the labels the network saw in the loss's call (after the dropout), and the batch's own."""

    seen: list = []

    def on_train_start(self, trainer, pl_module):
        self.first = True

        def record(module, args, kwargs):
            if self.first and kwargs.get("y") is not None:
                RecordLabels.seen.append((trainer.global_rank, trainer.global_step, kwargs["y"].tolist(), self.batch))
                self.first = False

        pl_module.model.register_forward_pre_hook(record, with_kwargs=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first, self.batch = True, batch[1].tolist()


def _with(cfg, **callbacks):
    with open_dict(cfg):
        for name, target in callbacks.items():
            cfg.callbacks[name] = {"_target_": target}
    return cfg


def test_a_conditional_run_resumes_bit_for_bit_with_the_same_label_dropout(tmp_path):
    """8 steps in one go == 4, stop, resume for 4: the labels dropped at each step, weights (the class embedding
    too), EMA and Adam; the class names are in the checkpoint's config."""
    common = ["experiment=smoke", "model.num_classes=10", "diffusion.cond_drop_prob=0.5", "trainer.deterministic=true",
              "callbacks.checkpoint.every_n_train_steps=4", "data.batch_size=6", "callbacks.sample_grid=null"]

    def run(name, *extra):
        cfg = compose_config(*common, *extra, output_dir=tmp_path / name)
        train(_with(cfg, labels=f"{__name__}.RecordLabels"))
        return tmp_path / name / "checkpoints" / "last.ckpt"

    RecordLabels.seen = []
    whole = load_checkpoint(run("whole", "trainer.max_steps=8"))
    uninterrupted = RecordLabels.seen
    RecordLabels.seen = []
    half = run("half", "trainer.max_steps=4")
    RecordLabels.seen = []
    resumed = load_checkpoint(run("resumed", "trainer.max_steps=8", f"ckpt_path={half}"))
    assert RecordLabels.seen == uninterrupted[4:]
    dropped = [(seen, batch) for _, _, seen, batch in uninterrupted]
    assert any(10 in seen for seen, _ in dropped) and any(s != 10 for seen, _ in dropped for s in seen)
    assert all(s in (10, b) for seen, batch in dropped for s, b in zip(seen, batch))  # a label, or "no class"
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert "model.label_emb.weight" in whole["state_dict"]
    for index, state in whole["optimizer_states"][0]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, resumed["optimizer_states"][0]["state"][index][name]), (index, name)
    assert whole["config"]["data"]["class_names"][0] == "T-shirt/top" and len(whole["config"]["data"]["class_names"]) == 10


def test_a_resume_on_data_with_other_classes_is_refused(tmp_path):
    write_class_folders(tmp_path / "a", {"cat": 4, "dog": 4})
    write_class_folders(tmp_path / "b", {"cat": 4, "emu": 4})
    common = ["experiment=smoke", "data=image_folder", "data.channels=1", "data.image_size=8", "model.num_classes=2",
              "model.attn_resolutions=[4]", "data.batch_size=4", "callbacks.sample_grid=null", "val.num_images=0",
              "optimized_metric=null", "trainer.max_steps=2"]
    train(compose_config(*common, f"data.root={tmp_path / 'a'}", output_dir=tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"data.root=.*/b has the classes \['cat', 'emu'\], and the checkpoint was "
                                          r"trained on \['cat', 'dog'\]"):
        train(compose_config(*common, f"data.root={tmp_path / 'b'}", "trainer.max_steps=4",
                             f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", output_dir=tmp_path / "again"))


def test_an_unconditional_run_draws_and_moves_no_labels(tmp_path):
    """The default run's batches are images alone, the network gets no label, and its steps draw from the RNG
    exactly what they drew before conditioning existed: t, eps (same values with cond_drop_prob 0 and 0.5)."""
    def final_weights(drop):
        cfg = compose_config("experiment=smoke", f"diffusion.cond_drop_prob={drop}", "trainer.max_steps=3",
                             "callbacks.sample_grid=null", "trainer.deterministic=true", output_dir=tmp_path / str(drop))
        train(cfg)
        return load_checkpoint(tmp_path / str(drop) / "checkpoints" / "last.ckpt")

    a, b = final_weights(0.0), final_weights(0.5)
    assert "model.label_emb.weight" not in a["state_dict"] and "class_names" not in a["config"]["data"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert torch.equal(a["rng_states"]["torch"], b["rng_states"]["torch"])


DDP = ["experiment=smoke", "model.num_classes=10", "diffusion.cond_drop_prob=0.5", "trainer.accelerator=cpu",
       "trainer.devices=2", "trainer.strategy=ddp", "callbacks.sample_grid=null", "trainer.max_steps=3",
       f"+callbacks.labels._target_={__name__}.SaveLabels"]


class SaveLabels(RecordLabels):
    def teardown(self, trainer, pl_module, stage):
        mine = [s for s in RecordLabels.seen if s[0] == trainer.global_rank]
        torch.save(mine, Path(os.environ["LABELS_DIR"]) / f"rank_{trainer.global_rank}.pt")


@pytest.mark.slow
def test_the_two_ranks_of_a_ddp_run_drop_different_labels(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "LABELS_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *DDP, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank_{r}.pt") for r in (0, 1)]
    assert [s[1] for s in ranks[0]] == [s[1] for s in ranks[1]] == [0, 1, 2]
    drops = [[[s == 10 for s in seen] for _, _, seen, _ in rank] for rank in ranks]
    assert drops[0] != drops[1]  # each rank its own draws (8 labels a step at 1/2: equal by chance 2^-24)


@pytest.mark.slow
def test_an_optuna_search_takes_the_label_dropout_as_a_search_dimension(tmp_path):
    """`python train.py -m hparams_search=optuna_cpu model.num_classes=10 'diffusion.cond_drop_prob=choice(0.1,0.3)'`:
    Hydra's Optuna sweeper reads a sweep override as one more dimension; each trial trains with the value it drew."""
    from tests.test_search import search

    done = search(tmp_path, "model.num_classes=10", "diffusion.cond_drop_prob=choice(0.1,0.3)", "hydra.sweeper.n_trials=2")
    assert done.returncode == 0, done.stderr[-3000:]
    drawn = []
    for trial in ("0", "1"):
        config = load_checkpoint(tmp_path / "sweep" / trial / "checkpoints" / "last.ckpt")["config"]
        assert config["model"]["num_classes"] == 10 and len(config["data"]["class_names"]) == 10
        drawn.append(config["diffusion"]["cond_drop_prob"])
    assert set(drawn) <= {0.1, 0.3}
