"""Shards written by `python -m ddpmlab.prepare`: litdata's chunked format, read from disk as batches are needed.

DIR/train (and DIR/test when the source has a test split) each hold litdata's index.json and chunk-*.bin files
of uint8 (C, S, S) images; from a labelled source each item is {"image": ..., "label": class index} and
DIR/classes.json holds the class names (index i: classes[i]). Both splits are indexed as ShardImages, read image by image from disk, so neither is
ever held in memory whole. Training draws its batches as the in-memory path does (data.StepBatchSampler: a
permutation of the whole split per epoch), not through litdata's StreamingDataLoader: that shuffles the order
of chunks and then images only within each chunk, so from a source written in class order (ImageNet's
train/<class>/ folders) a batch of 32 held 1.7 classes of 10 where a random batch holds 9.7; and its order
depended on the worker count.
"""

import copy
import inspect
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ddpmlab.errors import ConfigError

TRAIN, TEST = "train", "test"
CLASSES = "classes.json"


def litdata():
    """The litdata module, imported with its PyPI version check off.

    litdata asks pypi.org for a newer version of itself whenever a StreamingDataset or optimize() starts
    (requests with a 30 s timeout), unless LITDATA_DISABLE_VERSION_CHECK=1 when it is first imported: on a
    compute node without internet every start would wait on that. Every use of litdata here comes through this.
    """
    # Forced, not a default: a LITDATA_CHECK_UPDATES=1 or LITDATA_DISABLE_VERSION_CHECK=0 in the environment
    # (litdata's own switches) would bring the stall back, so neither turns the check on through ddpmlab.
    os.environ["LITDATA_DISABLE_VERSION_CHECK"] = "1"
    import litdata as ld

    return ld


def split_folder(path: Path, train: bool) -> Path:
    """The folder of a split: DIR/train; DIR/test, or DIR/train when the shards have no test split."""
    if not (path / TRAIN / "index.json").is_file():
        raise ConfigError(f"data.path={path} holds no shards ({path / TRAIN / 'index.json'} is missing): write them with "
                          f"`python -m ddpmlab.prepare SRC --out {path} --image-size N`")
    return path / TRAIN if train or not (path / TEST / "index.json").is_file() else path / TEST


def _indexed_dataset(folder: Path):
    """litdata's StreamingDataset over `folder`, for reads by index in any order.

    From 0.2.7x litdata decodes a window of about 32 neighbouring images around each one read (it expects
    reads in order): in a random order that decodes 32 images per image, 400 us a 16x16 image here against 45 us
    with batch_decode=0 (one at a time), which the versions that have the setting get.
    """
    dataset_class = litdata().StreamingDataset
    one_at_a_time = {"batch_decode": 0} if "batch_decode" in inspect.signature(dataset_class).parameters else {}
    return dataset_class(str(folder), **one_at_a_time)


class ShardImages:
    """One split of the shards as a read-only sequence of uint8 images, read from disk on access.

    images[i] is (C, S, S); images[[i, j, ...]] and images[a:b] are (N, C, S, S), as the in-memory path's tensor
    indexes. images.narrow(0, start, n) and images.index_select(0, indices) are views that read nothing until
    indexed (a tensor's index_select copies): evaluation's subsets of a split that may not fit in memory.
    field="label" gives the items' class labels instead, int64 () each (N,) together; "example" gives
    (image, label) pairs, one read each: training's examples of a labelled split.
    """

    def __init__(self, folder: Path, field: str = "image"):
        self.folder, self.field = folder, field
        self.dataset = _indexed_dataset(folder)
        self.dtype = torch.long if field == "label" else torch.uint8
        # The whole split's size: len(StreamingDataset) is one DDP rank's share.
        self.order = range(sum(chunk["chunk_size"] for chunk in json.loads((folder / "index.json").read_text())["chunks"]))
        self.image_shape = tuple(self._read(0).shape) if self.order and field != "example" else ()  # read once

    def _read(self, k: int):
        item = self.dataset[k]
        if not isinstance(item, dict):  # written without labels: the image itself
            return item
        label = torch.tensor(item["label"], dtype=torch.long)
        return {"image": item["image"], "label": label, "example": (item["image"], label)}[self.field]

    def narrow(self, dim: int, start: int, length: int) -> "ShardImages":
        assert dim == 0 and 0 <= start and 0 <= length and start + length <= len(self), (dim, start, length)
        return self._view(self.order[start:start + length])

    def index_select(self, dim: int, indices) -> "ShardImages":
        assert dim == 0, dim
        return self._view([self.order[int(i)] for i in indices])

    def with_field(self, field: str) -> "ShardImages":
        """The same items read as another field (image, label, example)."""
        view = copy.copy(self)
        view.field = field
        view.dtype = torch.long if field == "label" else torch.uint8
        return view

    def _view(self, order) -> "ShardImages":
        view = copy.copy(self)
        view.order = order
        return view

    def __len__(self) -> int:
        return len(self.order)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.image_shape)

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        if isinstance(index, int):
            return self._read(self.order[index])  # IndexError out of range, as a tensor's
        return torch.stack([self[int(i)] for i in index])


def read_shards(root: Path, train: bool, path: str | None = None, **_) -> ShardImages:
    """A split of the shards under data.path (data.root keeps the FID statistics' cache and classifier)."""
    if not path:
        raise ConfigError("data.path is unset: data=shards needs data.path=DIR, the --out of `python -m ddpmlab.prepare`")
    return ShardImages(split_folder(Path(path).expanduser(), train))


def read_shard_labels(root: Path, train: bool, path: str | None = None, **_) -> tuple[ShardImages, list[str]] | tuple[None, None]:
    """A split's labels, read from its items on access, and the class names (DIR/classes.json); (None, None) for
    shards written from a source without labels."""
    folder = Path(path).expanduser()
    if not (folder / CLASSES).is_file():
        return None, None
    return ShardImages(split_folder(folder, train), field="label"), json.loads((folder / CLASSES).read_text())
