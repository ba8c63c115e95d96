"""python -m ddpmlab.prepare SRC --out DIR --image-size N: write a dataset as litdata shards for `data=shards`.

Each image is stored as uint8 (C, N, N), its shorter side resized to N (bicubic) and centre-cropped, as Ho et al.
prepared CelebA-HQ and LSUN (appendix B). DIR/train holds the training split; DIR/test the test split when the
source has one (CIFAR-10, MNIST, Fashion-MNIST, an image folder with a test/ folder or --test-fraction). SRC:

    PATH                  an image folder, searched at any depth, read as data=image_folder reads it
    cifar10:ROOT          CIFAR-10's python pickles under ROOT/cifar-10-batches-py
    mnist:ROOT            MNIST's IDX files under ROOT/MNIST/raw
    fashion_mnist:ROOT    Fashion-MNIST under ROOT/FashionMNIST/raw (or Debian's dataset-fashion-mnist)
    lsun:PATH             LSUN's LMDB export (e.g. church_outdoor_train_lmdb); needs `pip install lmdb`

A labelled source (the three datasets, an image folder whose images lie in class folders, SRC/<class>/...) is
written with each image's class index beside it and the class names in DIR/classes.json, for class-conditional
training (model.num_classes) from the shards.

Bad arguments print one line and exit 2 before anything is written; DIR must not exist or be empty.
"""

import argparse
import ctypes
import io
import json
import multiprocessing
import os
import re
import signal
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image, ImageColor

from ddpmlab.data import (
    READERS, folder_labels, image_files, image_folder_split, load_image, read_cifar10, read_fashion_mnist, read_mnist,
    resize_crop, torchvision_labels,
)
from ddpmlab.errors import ConfigError, OneLineParser
from ddpmlab.progress import track
from ddpmlab.shards import CLASSES, TEST, TRAIN, litdata

DATASETS = {"cifar10": read_cifar10, "mnist": read_mnist, "fashion_mnist": read_fashion_mnist}
CHANNELS = {"cifar10": 3, "mnist": 1, "fashion_mnist": 1, "lsun": 3}  # a folder: its images' (folder_channels)
assert set(DATASETS) <= set(READERS)  # the same readers as training's in-memory path


def _item(image: torch.Tensor, labels, index: int):
    """What a shard stores: the image, or {"image", "label"} from a labelled source."""
    return image if labels is None else {"image": image, "label": int(labels[index])}


class FromFiles:
    """Index -> uint8 (C, S, S) of that image file (or LMDB key) through data.load_image: EXIF, 8-bit,
    transparency, resize; with `labels` (one per item), {"image": ..., "label": ...}.

    litdata gets indices, not paths: given paths it starts processes that copy the files to a cache first,
    and a failing image then leaves them orphaned, holding our stderr open.
    """

    def __init__(self, items: list, image_size: int, channels: int, background, lmdb_path: str | None = None,
                 labels: list[int] | None = None):
        self.items, self.image_size, self.channels, self.background = items, image_size, channels, background
        self.lmdb_path, self.env, self.labels = lmdb_path, None, labels

    def __call__(self, index: int):
        item = self.items[index]
        if self.lmdb_path is None:
            return _item(load_image(Path(item), self.image_size, self.channels, self.background), self.labels, index)
        if self.env is None:  # opened in the worker process that reads (LMDB handles do not cross a fork)
            import lmdb

            self.env = lmdb.open(self.lmdb_path, readonly=True, lock=False, readahead=False, max_readers=64)
        with self.env.begin() as txn:
            return load_image(io.BytesIO(txn.get(item)), self.image_size, self.channels, self.background)


class FromTensor:
    """Index -> uint8 (C, S, S) from a split held as a uint8 (N, C, H, W) tensor (the small torchvision datasets),
    with its label (the labels (N,)) as FromFiles gives it."""

    def __init__(self, images: torch.Tensor, image_size: int, channels: int, labels: torch.Tensor | None = None):
        self.images, self.image_size, self.channels, self.labels = images, image_size, channels, labels

    def __call__(self, index: int):
        array = self.images[index].permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
        img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        image = resize_crop(img.convert("L" if self.channels == 1 else "RGB"), self.image_size, self.channels)
        return _item(image, self.labels, index)


def splits(src: str, args) -> tuple[dict[str, tuple], list[str] | None]:
    """({split: (fn, inputs)}, the class names or None) for SRC; every check that can fail runs here, before
    anything is written."""
    kind, _, rest = src.partition(":")
    channels = args.channels or CHANNELS.get(kind, 3)
    if rest and kind in DATASETS:
        if args.test_fraction:
            raise ConfigError(f"--test-fraction={args.test_fraction} is for image folders: {kind} has a test split")
        read = lambda train: DATASETS[kind](Path(rest).expanduser(), train=train,  # noqa: E731
                                            verify_checksums=args.verify_checksums, unverified="--no-verify-checksums")
        labelled = {name: (read(train), *torchvision_labels(Path(rest).expanduser(), train, kind))
                    for name, train in ((TRAIN, True), (TEST, False))}
        return ({name: (FromTensor(images, args.image_size, channels, labels), list(range(len(images))))
                 for name, (images, labels, _) in labelled.items()}, labelled[TRAIN][2])
    if rest and kind == "lsun":
        return {TRAIN: _lsun(Path(rest).expanduser(), args.image_size, channels, args.background)}, None
    if rest and not Path(src).exists():
        raise ConfigError(f"SRC={src} is no folder and no known source: use a folder of images, "
                          f"{', '.join(f'{k}:ROOT' for k in DATASETS)} or lsun:PATH")
    root = Path(src).expanduser()
    files = image_files(root, key="SRC")
    if not args.channels:
        channels = folder_channels(files)
        print(f"channels: {channels} ({'every image is grayscale' if channels == 1 else 'some images have colour'}; "
              f"--channels {4 - channels} to store {'RGB' if channels == 1 else 'grayscale'})", file=sys.stderr)
    train, test = image_folder_split(root, files, args.test_fraction, args.split_seed)
    labels, names = folder_labels(root, files, train)
    of = dict(zip(files, labels)) if labels is not None else None
    out = {TRAIN: train} | ({TEST: test} if train is not test else {})  # test: a held-out split exists
    return ({name: (FromFiles(split, args.image_size, channels, args.background,
                              labels=None if of is None else [of[p] for p in split]), list(range(len(split))))
             for name, split in out.items()}, names)


# Pillow's modes of one grey band (with or without alpha, any bit depth); a palette image is grey when its palette is.
GREY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


def folder_channels(files: list[Path]) -> int:
    """1 when every image is grayscale (its mode, or a palette of greys: only the headers are read), else 3."""
    for path in track(files, total=len(files), desc="reading image modes", leave=False):
        try:
            with Image.open(path) as img:
                palette = img.getpalette() if img.mode in ("P", "PA") else None
                grey = img.mode in GREY_MODES or (palette is not None and palette[0::3] == palette[1::3] == palette[2::3])
        except (OSError, ValueError):  # unreadable: load_image names it when the image is written
            continue
        if not grey:
            return 3
    return 1


def _lsun(path: Path, image_size: int, channels: int, background):
    try:
        import lmdb
    except ImportError:
        raise ConfigError("SRC=lsun:... needs the lmdb package: `pip install lmdb` (or `pip install ddpmlab[lsun]`)") from None
    if not (path / "data.mdb").is_file():
        raise ConfigError(f"SRC=lsun:{path} holds no data.mdb: point it at LSUN's exported *_lmdb folder")
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        keys = list(txn.cursor().iternext(values=False))
    if not keys:
        raise ConfigError(f"SRC=lsun:{path} holds no images")
    return FromFiles(keys, image_size, channels, background, lmdb_path=str(path)), list(range(len(keys)))


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m ddpmlab.prepare", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("src", metavar="SRC")
    parser.add_argument("--out", required=True, type=Path, help="the new folder: data.path of data=shards")
    parser.add_argument("--image-size", required=True, type=int, help="N: the images' side after resizing")
    parser.add_argument("--channels", type=int, choices=[1, 3], help="1 (L) or 3 (RGB); default: the source's (a "
                        "folder: 1 when every image is grayscale, else 3)")
    parser.add_argument("--no-verify-checksums", dest="verify_checksums", action="store_false",
                        help="cifar10: read a re-packed copy whose MD5 sums differ from the release's")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="image folders: the share held out as test")
    parser.add_argument("--split-seed", type=int, default=0, help="image folders: which images --test-fraction holds out")
    parser.add_argument("--background", default="white", help="the colour transparent pixels are composited onto")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes that encode images")
    parser.add_argument("--chunk-bytes", default="64MB", help="the size of one shard file (litdata's chunk_bytes)")
    args = parser.parse_args(argv)
    if args.image_size < 1:
        raise ConfigError(f"--image-size={args.image_size} must be at least 1: the side in pixels, e.g. 64")
    if args.workers < 1:
        raise ConfigError(f"--workers={args.workers} must be at least 1")
    if not 0 <= args.test_fraction < 1:
        raise ConfigError(f"--test-fraction={args.test_fraction} must be in [0, 1): 0.1 holds out a tenth")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ConfigError(f"--out={args.out} exists and is not an empty folder: choose a new folder (nothing is overwritten)")
    try:
        args.background = ImageColor.getrgb(args.background)[:3]
    except ValueError:
        raise ConfigError(f"--background={args.background!r} is not a colour: use a name (white) or #rrggbb") from None
    work, class_names = splits(args.src, args)
    print(f"labels: {len(class_names)} classes ({', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''})"
          if class_names else "labels: none (a folder: not every image lies in a class folder, SRC/<class>/...)", file=sys.stderr)
    # Written beside --out and renamed into place when whole, so a failure leaves no half-written --out that
    # every rerun would refuse; the temporary folder is ours, removed on failure.
    partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        for name, (fn, inputs) in work.items():
            print(f"{name}: {len(inputs)} images -> {args.out / name}", file=sys.stderr)
            optimize(fn, inputs, partial / name, min(args.workers, len(inputs)), args.chunk_bytes)
        if class_names:
            (partial / CLASSES).write_text(json.dumps(class_names))
        if args.out.exists():
            args.out.rmdir()  # empty, checked above
        partial.rename(args.out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def optimize(fn, inputs: list, out: Path, workers: int, chunk_bytes: str) -> None:
    """litdata's optimize; an image that fails to load in a worker (ConfigError there) is one ConfigError here.

    litdata reports a worker's exception as a RuntimeError holding its traceback's text, whose last line
    with ddpmlab's ConfigError is the message that names the file.
    """
    if sys.platform == "linux":  # orphans of our processes become our children (PR_SET_CHILD_SUBREAPER)
        ctypes.CDLL(None).prctl(36, 1)
    try:
        litdata().optimize(fn=fn, inputs=inputs, output_dir=str(out), chunk_bytes=chunk_bytes, num_workers=workers,
                           keep_data_ordered=True, start_method="fork")
    except RuntimeError as err:
        _end_orphans()
        found = re.findall(rf"^{ConfigError.__module__}\.ConfigError: (.+)$", str(err), re.MULTILINE)
        if not found:
            raise
        raise ConfigError(found[-1]) from None



def _end_orphans() -> None:
    """End what litdata's terminated workers leave behind: each worker's remover process waits on its queue for
    ever, holding our stderr open (a caller reading it would wait too). Adopted as the subreaper's children
    once the workers, which litdata terminates without waiting, are gone."""
    for child in multiprocessing.active_children():
        child.join(10)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == os.getpid():
            os.kill(int(stat.parent.name), signal.SIGTERM)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
