"""Datasets as uint8 image tensors, and the LightningDataModule that feeds them as floats in [-1, 1].

Every reader returns the whole split as a uint8 tensor (N, C, H, W): the small datasets of diffusion
research fit in memory, and batches then cost one index. Data beyond RAM comes as shards (ddpmlab.shards):
the same DataModule indexes them from disk and streams training batches from them. Scaling to [-1, 1] and the random flip happen
after the batch reaches the device (`on_after_batch_transfer`).
"""

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchvision
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ddpmlab.errors import ConfigError
from ddpmlab.shards import ShardImages, read_shard_labels, read_shards, split_folder

# Where Debian's `dataset-fashion-mnist` package puts the gzipped IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
NO_HELD_OUT = "train images (no held-out split)"  # test_split's label when the NLL is on training images


def _require_root(root: Path, name: str, key: str = "data.root") -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{key}={root} is not a folder: point {key} at the folder that holds {name}")
    if not root.is_dir():
        raise ConfigError(f"{key}={root} does not exist: point {key} at the folder that holds {name}")


def _from_debian_package(root: Path) -> None:
    """Unpack the Debian package's gzipped IDX files to where torchvision's FashionMNIST reads them."""
    raw = root / "FashionMNIST" / "raw"
    for gz in sorted(DEBIAN_FASHION_MNIST.glob("*-ubyte.gz")):
        target = raw / gz.name[: -len(".gz")]
        if not target.exists():
            raw.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")  # ranks of a DDP run may race here
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(target)


def _torchvision(cls, name: str, root: Path, train: bool, download: bool, hint: str):
    """Build torchvision's dataset, turning its "not found or corrupted" RuntimeError into a ConfigError with `hint`."""
    try:
        return cls(str(root), train=train, download=download)
    except RuntimeError as err:
        if "not found" not in str(err).lower() and "corrupted" not in str(err).lower():
            raise
        raise ConfigError(f"{name} not found or corrupted under {root}: {hint}") from None


def read_fashion_mnist(root: Path, train: bool, download: bool = False, **_) -> Tensor:
    """Fashion-MNIST (Xiao et al. 2017) through torchvision, filled from the Debian package when offline."""
    if not download and DEBIAN_FASHION_MNIST.is_dir():
        _from_debian_package(root)  # creates root/FashionMNIST/raw
    _require_root(root, "Fashion-MNIST")
    hint = ("install it with `apt-get install dataset-fashion-mnist`, put the four IDX files in "
            f"{root}/FashionMNIST/raw, or set data.download=true when online")
    ds = _torchvision(torchvision.datasets.FashionMNIST, "Fashion-MNIST", root, train, download, hint)
    return ds.data.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)


def read_mnist(root: Path, train: bool, download: bool = False, **_) -> Tensor:
    """MNIST through torchvision's reader of the IDX files in root/MNIST/raw."""
    _require_root(root, "MNIST")
    hint = f"put the four IDX files in {root}/MNIST/raw or set data.download=true when online"
    return _torchvision(torchvision.datasets.MNIST, "MNIST", root, train, download, hint).data.unsqueeze(1)


class _CIFAR10Unverified(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 reader that checks the pickles exist instead of their MD5 sums."""

    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}  # check_integrity(path, None): existence only

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)


def read_cifar10(root: Path, train: bool, download: bool = False, verify_checksums: bool = True,
                 unverified: str = "data.verify_checksums=false", **_) -> Tensor:
    """CIFAR-10 through torchvision's reader of the python pickles in root/cifar-10-batches-py; `unverified`: the
    switch that skips the MD5 check, as the caller (training, prepare) spells it."""
    _require_root(root, "CIFAR-10")
    cls = torchvision.datasets.CIFAR10 if verify_checksums else _CIFAR10Unverified
    hint = (f"put the python pickles (data_batch_1..5, test_batch, batches.meta) in {root}/cifar-10-batches-py, "
            f"set data.download=true when online, or {unverified} for a re-packed copy")
    ds = _torchvision(cls, "CIFAR-10", root, train, download, hint)
    return torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW


# Modes with an alpha band (RGBa: TIFF's premultiplied alpha); palette and colour-key transparency is in img.info.
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}


def _to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """High-bit-depth grey -> L over the full 8-bit range: v * 255 / full, rounded.

    Pillow's convert("L") clips instead (a 16-bit image at 50% grey becomes all 255). I;16* and I (32-bit
    integers, where Pillow keeps 16-bit data) are read as 0..65535, F as floats in [0, 1]; values outside are
    refused, as no per-image rescaling would keep one scale across a dataset.
    """
    if img.mode.startswith("I"):
        full = 65535
    elif img.mode == "F":
        full = 1
    else:
        return img
    values = np.asarray(img, dtype=np.float64)
    if not (np.isfinite(values).all() and 0 <= values.min() and values.max() <= full):
        raise ConfigError(f"image {path} (mode {img.mode}) has values from {values.min():g} to {values.max():g}, "
                          f"outside the 0..{full} it is read as: rescale it to 0..{full}, or save it as 8-bit")
    return Image.fromarray(np.rint(values * (255 / full)).astype(np.uint8))


def _composite(img: Image.Image, background: tuple[int, int, int] | None, path: Path) -> Image.Image:
    """Transparent pixels over an opaque `background` (alpha compositing), so no hidden colour shows through."""
    if img.mode not in ALPHA_MODES and "transparency" not in img.info:
        return img
    if background is None:
        raise ConfigError(f"image {path} has transparency (mode {img.mode}) and data.background=null: "
                          "set data.background=white (or any colour) to composite it onto that colour")
    return Image.alpha_composite(Image.new("RGBA", img.size, (*background, 255)), img.convert("RGBA"))


def load_image(path: Path, image_size: int, channels: int, background: tuple[int, int, int] | None) -> Tensor:
    """One image file as uint8 (C, S, S): upright by its EXIF orientation, 8-bit, transparency composited onto
    `background`, shorter side resized to image_size, centre-cropped."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # decodes; phone photos store the rotation in a tag
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"cannot read image {path} ({err.__class__.__name__}): remove or replace that file") from None
    img = _composite(_to_8bit(img, path), background, path)
    try:  # 1 -> 0/255, P -> its palette's colours, CMYK -> Pillow's RGB, RGB -> L by ITU-R 601-2 luma
        img = img.convert("L" if channels == 1 else "RGB")
    except ValueError as err:
        raise ConfigError(f"cannot convert image {path} ({err}): save it as RGB or grayscale") from None
    return resize_crop(img, image_size, channels)


def resize_crop(img: Image.Image, image_size: int, channels: int) -> Tensor:
    """An 8-bit L or RGB image -> uint8 (C, S, S): the shorter side resized to S (bicubic), then centre-cropped."""
    scale = image_size / min(img.size)
    img = img.resize((max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def image_folder_split(root: Path, files: list[Path], test_fraction: float, split_seed: int):
    """(train, test) files. With a folder root/test, its images are the test split and all others train; else
    round(test_fraction * N) images are held out, those whose sha256 of (split_seed, path below root) ranks
    lowest, so the split depends on neither the listing order nor the run's seed; with neither, both are all."""
    test_dir = root / "test"
    if test_dir.is_dir():
        if test_fraction:
            raise ConfigError(f"data.test_fraction={test_fraction} but {test_dir} exists and is the test split: "
                              "set data.test_fraction=0, or move that folder")
        held = {p for p in files if test_dir in p.parents}
    elif test_fraction:
        key = lambda p: hashlib.sha256(f"{split_seed}:{p.relative_to(root).as_posix()}".encode()).digest()  # noqa: E731
        held = set(sorted(files, key=key)[: max(1, round(test_fraction * len(files)))])
    else:
        return files, files
    train, test = [p for p in files if p not in held], [p for p in files if p in held]
    if not train or not test:
        raise ConfigError(f"data.root={root} gives {len(train)} training and {len(test)} test images: each split "
                          f"needs one at least; add images{' to ' + str(test_dir) if test_dir.is_dir() else ''}, "
                          "or lower data.test_fraction")
    return train, test


def image_files(root: Path, key: str = "data.root") -> list[Path]:
    """Every image file below root, at any depth, sorted; `key` names the setting in the error messages."""
    _require_root(root, "your images", key)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{key}={root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): point {key} at your images")
    return files


def read_image_folder(root: Path, train: bool, image_size: int = 32, channels: int = 3, test_fraction: float = 0.0,
                      split_seed: int = 0, background: tuple[int, int, int] | None = (255, 255, 255), **_) -> Tensor:
    """The images of one split (image_folder_split) under root, searched recursively, resized and centre-cropped."""
    train_files, test_files = image_folder_split(root, image_files(root), test_fraction, split_seed)
    return torch.stack([load_image(p, image_size, channels, background)
                        for p in (train_files if train else test_files)])


def _torchvision_class(dataset: str):
    classes = {"fashion_mnist": torchvision.datasets.FashionMNIST, "mnist": torchvision.datasets.MNIST,
               "cifar10": _CIFAR10Unverified}
    if dataset not in classes:
        raise ConfigError(f"data.dataset={dataset!r} has no class labels: the domain classifier needs one of "
                          f"{', '.join(classes)}")
    return classes[dataset]


def labels_of(dataset: str, root: Path, train: bool) -> Tensor:
    """Class labels (N,) int64 of a torchvision dataset's split, in the order its reader returns the images."""
    return torch.as_tensor(_torchvision_class(dataset)(str(root), train=train).targets, dtype=torch.long)


def torchvision_labels(root: Path, train: bool, dataset: str, **_) -> tuple[Tensor, list[str]]:
    """A torchvision dataset's labels (its targets, aligned with its reader's images) and class names."""
    ds = _torchvision_class(dataset)(str(root), train=train)
    return torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes)


def folder_labels(root: Path, files: list[Path], train_files: list[Path]) -> tuple[list[int], list[str]] | tuple[None, None]:
    """Each file's class index and the class names, as torchvision's ImageFolder takes them: a file's class is its
    first-level folder below root (below root/test for the test split's images); the names are those folders
    sorted, over both splits so that both index alike. (None, None) when an image lies directly in root (or
    root/test): the folder has no class labels. A class without training images is refused."""
    test_dir = root / "test"
    classes = []
    for path in files:
        parts = path.relative_to(test_dir if test_dir.is_dir() and test_dir in path.parents else root).parts
        if len(parts) < 2:
            return None, None
        classes.append(parts[0])
    names, train_files = sorted(set(classes)), set(train_files)
    trained = {c for p, c in zip(files, classes) if p in train_files}
    missing = [name for name in names if name not in trained]
    if missing:
        raise ConfigError(f"{root}: class {missing[0]!r} has test images and no training images: add training "
                          f"images to its folder, or remove its test images")
    index = {name: i for i, name in enumerate(names)}
    return [index[c] for c in classes], names


def image_folder_labels(root: Path, train: bool, test_fraction: float = 0.0, split_seed: int = 0,
                        **_) -> tuple[Tensor, list[str]] | tuple[None, None]:
    """The class index of each image of a split, in read_image_folder's order, and the class names (folder_labels)."""
    files = image_files(root)
    train_files, test_files = image_folder_split(root, files, test_fraction, split_seed)
    labels, names = folder_labels(root, files, train_files)
    if labels is None:
        return None, None
    of = dict(zip(files, labels))
    return torch.tensor([of[p] for p in (train_files if train else test_files)], dtype=torch.long), names


READERS = {
    "fashion_mnist": read_fashion_mnist,
    "mnist": read_mnist,
    "cifar10": read_cifar10,
    "image_folder": read_image_folder,
    "shards": read_shards,  # `python -m ddpmlab.prepare`'s output, streamed from disk (ddpmlab.shards)
}


# Class labels of each reader's split, aligned with its images: (labels (N,) int64, class names), (None, None) when
# the data has none. Read only for a class-conditional model (model.num_classes): unconditional runs read no labels.
LABEL_READERS = {
    "fashion_mnist": torchvision_labels,
    "mnist": torchvision_labels,
    "cifar10": torchvision_labels,
    "image_folder": image_folder_labels,
    "shards": read_shard_labels,
}
# How to give each data source labels, for the refusal of a conditional model on unlabelled data.
LABEL_HINTS = {
    "image_folder": "put each class's images in a folder of its own, data.root/<class>/ (as torchvision's "
                    "ImageFolder reads them)",
    "shards": "write the shards from a labelled source (an image folder of class folders, mnist:, fashion_mnist:, "
              "cifar10:) with `python -m ddpmlab.prepare`",
}


def evaluation_subset(images, n: int | None):
    """The images of a split that a measurement on n of them uses (val/bpd, the NLL, the FID reference): all of
    them when n is None or covers the split, else the first n of a fixed random permutation of it (seed 0).
    The split's labels give the same subset's labels, aligned.

    Not the first n in storage order: an image folder's and its shards' order is the sorted paths', so a split
    kept as <class>/ folders would be measured on its first classes alone. A smaller n is a prefix of a larger
    one, and a tensor's images and the same images as shards give the same subset. A tensor gives a copy of the
    n images, ShardImages a view that reads them on access.
    """
    total = len(images)
    if n is None or n >= total:
        return images
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n]
    return images.index_select(0, order)


def to_model_range(images: Tensor) -> Tensor:
    """uint8 pixels {0..255} -> float32 in [-1, 1], the range the diffusion models (Ho et al. section 3.3)."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] -> uint8 pixels, rounded to the nearest of the 256 levels."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ImageTensorDataset(Dataset):
    """Index into a uint8 (N, C, H, W) tensor: image i, or (image i, its label) when `labels` (N,) are given."""

    def __init__(self, images: Tensor, labels: Tensor | None = None):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i] if self.labels is None else (self.images[i], self.labels[i])


class StepBatchSampler(Sampler[list[int]]):
    """Training batches whose order is a function of (seed, batch number) alone, so that a run resumed at any
    step sees exactly the batches the uninterrupted run would have seen.

    Epoch e is the permutation drawn by a generator seeded with (seed, e); batch k of the run is batch
    k mod per_epoch of epoch k // per_epoch (incomplete last batches are dropped). Each `iter()` yields from
    the current batch to the end of its epoch. Under DDP, rank r takes every world_size-th example of a
    global batch of world_size x batch_size, so the ranks split one global order.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = min(batch_size * world_size, num_examples)
        self.per_epoch = max(1, num_examples // self.global_batch)
        self.next_batch = start

    def __len__(self) -> int:
        return self.per_epoch

    def permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self):
        epoch, position = divmod(self.next_batch, self.per_epoch)
        order = self.permutation(epoch)
        for k in range(position, self.per_epoch):
            self.next_batch += 1
            batch = order[k * self.global_batch:(k + 1) * self.global_batch]
            yield batch[self.rank::self.world_size].tolist()


def test_split_label(dataset: str, root, test_fraction: float = 0.0, split_seed: int = 0, path: str | None = None) -> str:
    """What the test split of data.* is, for the labels of numbers measured on it (val/bpd, the NLL): NO_HELD_OUT
    where the data has none and the "test" images are the training images."""
    if dataset == "shards":
        return "test" if split_folder(Path(path).expanduser(), train=False).name == "test" else NO_HELD_OUT
    if dataset != "image_folder":
        return "test"
    if (Path(root).expanduser() / "test").is_dir():
        return "test (the images under data.root/test)"
    if test_fraction:
        return f"held-out {test_fraction * 100:g}% (data.split_seed={split_seed})"
    return NO_HELD_OUT


class DiffusionDataModule(L.LightningDataModule):
    """Batches of images in [-1, 1], (B, C, H, W) float32, with an optional random horizontal flip.

    Args:
        dataset: one of READERS' names.
        root: folder holding the dataset (for Fashion-MNIST, filled from the Debian package when empty).
        image_size, channels: what the model expects; checked against the data.
        random_flip: flip each training image left-right with probability 1/2 (Ho et al. use it for CIFAR-10).
        download: let torchvision download the dataset (needs internet).
        verify_checksums: CIFAR-10 only: check torchvision's MD5 sums of the pickles.
        seed: seeds the order of training batches (StepBatchSampler), which resumes exactly.
        test_fraction, split_seed: image_folder only: the share of images held out as the test split when
            root has no test/ folder, and the seed of which (image_folder_split).
        background: image_folder only: the colour (a Pillow name or #rrggbb) that transparent pixels are
            composited onto; None refuses images with transparency.
        path: shards only: the folder `python -m ddpmlab.prepare` wrote; its splits are read from disk as
            needed (ShardImages) and training streams them (ddpmlab.shards).
        num_classes: a class-conditional model's model.num_classes: the labels are read (LABEL_READERS), must
            number that many classes, and batches are (images, labels). None (unconditional): batches are the
            images alone and no label is read.
        class_names: the classes a checkpoint was trained on (stored in its config): the data's must be these.
    """

    def __init__(
        self,
        dataset: str,
        root: str,
        image_size: int,
        channels: int,
        batch_size: int = 64,
        num_workers: int = 0,
        random_flip: bool = False,
        download: bool = False,
        verify_checksums: bool = True,
        seed: int = 0,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        background: str | None = "white",
        path: str | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        if dataset not in READERS:
            raise ConfigError(f"data.dataset={dataset!r} is unknown: choose one of {', '.join(READERS)}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {batch_size}")
        if not 0 <= test_fraction < 1:
            raise ConfigError(f"data.test_fraction must be in [0, 1), got {test_fraction}: 0.1 holds out a tenth")
        if test_fraction and dataset != "image_folder":
            raise ConfigError(f"data.test_fraction={test_fraction} is for image_folder: {dataset} has a test split")
        try:
            self.background = None if background is None else ImageColor.getrgb(str(background))[:3]
        except ValueError:
            raise ConfigError(f"data.background={background!r} is not a colour: use a name (white), #rrggbb, "
                              "or null to refuse images with transparency") from None
        self.test_fraction, self.split_seed = test_fraction, split_seed
        self.dataset, self.root = dataset, Path(root).expanduser()
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.random_flip, self.download, self.verify_checksums = random_flip, download, verify_checksums
        self.seed, self.path = seed, path
        self.num_classes, self.class_names = num_classes, None if class_names is None else list(class_names)
        self.train_images: Tensor | ShardImages | None = None
        self.test_images: Tensor | ShardImages | None = None
        self.train_labels: Tensor | ShardImages | None = None  # (N,) int64, with num_classes only
        self.test_labels: Tensor | ShardImages | None = None

    def read(self, train: bool) -> Tensor:
        """The whole split as uint8 (N, C, H, W), checked against image_size and channels."""
        images = READERS[self.dataset](
            self.root, train=train, download=self.download, image_size=self.image_size, channels=self.channels,
            verify_checksums=self.verify_checksums, test_fraction=self.test_fraction, split_seed=self.split_seed,
            background=self.background, path=self.path,
        )
        if tuple(images.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise ConfigError(
                f"data: {self.dataset} images are {tuple(images.shape[1:])} (C, H, W) but the config says "
                f"channels={self.channels} image_size={self.image_size}: fix data.channels and data.image_size"
            )
        return images

    def read_labels(self, train: bool, images) -> Tensor | ShardImages:
        """The split's class labels (N,), aligned with `images`; the class names become self.class_names. Refused
        in one line: data without labels, another number of classes than model.num_classes, or other classes
        than the checkpoint's."""
        labels, names = LABEL_READERS[self.dataset](
            self.root, train=train, dataset=self.dataset, test_fraction=self.test_fraction, split_seed=self.split_seed,
            path=self.path)
        n = self.num_classes
        if labels is None:
            raise ConfigError(f"model.num_classes={n} needs class labels, and {self.dataset} {self.source} has none: "
                              f"{LABEL_HINTS[self.dataset]}; or set model.num_classes=null")
        if len(names) != n:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(f"model.num_classes={n} but {self.dataset} {self.source} has {len(names)} classes "
                              f"({shown}): set model.num_classes={len(names)}")
        if self.class_names is not None and names != self.class_names:
            raise ConfigError(f"{self.source} has the classes {names}, and the checkpoint was trained on "
                              f"{self.class_names}: point it at the data the checkpoint was trained on")
        assert len(labels) == len(images), (len(labels), len(images))
        self.class_names = names
        return labels

    @property
    def source(self) -> str:
        """Where the images are read from, for messages: data.path=... (shards) or data.root=..."""
        return f"data.path={self.path}" if self.dataset == "shards" else f"data.root={self.root}"

    @property
    def test_split(self) -> str:
        """What test_images are, for the labels of the numbers measured on them."""
        return test_split_label(self.dataset, self.root, self.test_fraction, self.split_seed, self.path)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_images is None:
            self.train_images = self.read(train=True)
            if self.num_classes is not None:
                self.train_labels = self.read_labels(True, self.train_images)
        if stage in (None, "test", "validate", "predict") and self.test_images is None:
            self.test_images = self.read(train=False)
            if self.num_classes is not None:
                self.test_labels = self.read_labels(False, self.test_images)

    def examples(self, train: bool) -> Dataset:
        """A split as a Dataset of images, or of (image, label) pairs for a conditional model (shards: one read each)."""
        images, labels = (self.train_images, self.train_labels) if train else (self.test_images, self.test_labels)
        if isinstance(images, ShardImages):
            return images if labels is None else images.with_field("example")
        return ImageTensorDataset(images, labels)

    def train_dataloader(self) -> DataLoader:
        """Batches in StepBatchSampler's order, from memory or from the shards alike: the order is a function of
        (data.seed, batch number) only, so the same for any worker count, exact on resume, disjoint across ranks,
        and drawn from the whole split (a shard's images reach the batches as mixed as a tensor's)."""
        trainer = self.trainer
        # A resumed fit asks for its loader after the checkpoint is restored: start at the next batch.
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = StepBatchSampler(len(self.train_images), self.batch_size, self.seed, start, rank, world)
        # Its own generator: creating an iterator must not draw from the global RNG (resumes stay exact).
        return DataLoader(self.examples(train=True), batch_sampler=batches, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.examples(train=False), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 images -> [-1, 1] (flipped at random in training); labels, if any, pass through: (x, y)."""
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        x = to_model_range(images)
        if self.random_flip and self.trainer is not None and self.trainer.training:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x if labels is None else (x, labels)
