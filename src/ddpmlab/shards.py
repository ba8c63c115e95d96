"""Shards written by `python -m ddpmlab.prepare`: litdata's chunked format, read from disk as batches are needed.

DIR/train (and DIR/test when the source has a test split) each hold litdata's index.json and chunk-*.bin files
of uint8 (C, S, S) images. Training streams DIR/train through litdata's StreamingDataLoader, which shuffles
chunks and the images within them by (seed, epoch) and gives each DDP rank its own chunks; evaluation indexes
both splits as ShardImages, so neither split is ever held in memory whole.
"""

import copy
import functools
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ddpmlab.errors import ConfigError

TRAIN, TEST = "train", "test"


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


class ShardImages:
    """One split of the shards as a read-only sequence of uint8 images, read from disk on access.

    images[i] is (C, S, S); images[[i, j, ...]] and images[a:b] are (N, C, S, S), as the in-memory path's tensor
    indexes (evaluation takes the NLL's test images by index). images.narrow(0, start, n) is, as a tensor's, a
    view that reads nothing until indexed: the FID reference, the first n of a split that may not fit in memory.
    """

    dtype = torch.uint8

    def __init__(self, folder: Path):
        self.folder = folder
        self.dataset = litdata().StreamingDataset(str(folder))
        # The whole split's size: len(StreamingDataset) is one DDP rank's share.
        self.start, self.length = 0, sum(
            chunk["chunk_size"] for chunk in json.loads((folder / "index.json").read_text())["chunks"])
        self.image_shape = tuple(self.dataset[0].shape) if self.length else ()  # read once; views share it

    def narrow(self, dim: int, start: int, length: int) -> "ShardImages":
        assert dim == 0 and 0 <= start and 0 <= length and start + length <= self.length, (dim, start, length)
        view = copy.copy(self)
        view.start, view.length = self.start + start, length
        return view

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.length, *self.image_shape)

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, slice):
            index = range(*index.indices(self.length))
        if isinstance(index, int):
            if not -self.length <= index < self.length:
                raise IndexError(f"index {index} is out of range for {self.length} images")
            return self.dataset[self.start + index % self.length]
        return torch.stack([self[int(i)] for i in index])


def read_shards(root: Path, train: bool, path: str | None = None, **_) -> ShardImages:
    """A split of the shards under data.path (data.root keeps the FID statistics' cache and classifier)."""
    if not path:
        raise ConfigError("data.path is unset: data=shards needs data.path=DIR, the --out of `python -m ddpmlab.prepare`")
    return ShardImages(split_folder(Path(path).expanduser(), train))


@functools.cache
def _loader_class():
    class StreamingLoader(litdata().StreamingDataLoader):
        """litdata's loader whose every iter() starts where the run is: after `taken()` batches of the run.

        The position is a function of the step, as StepBatchSampler's, so a resume is exact with no state of its
        own. litdata's state_dict would not do under Lightning: Lightning saves it after prefetching the next
        batch (one batch, at an epoch's end one epoch, ahead of the checkpoint), and drops iterators part-way (a
        resumed epoch ends after its remaining batches; a run resumed at an epoch's end first finishes the old
        epoch with one batch), after which litdata's next iter() starts a new epoch or replays the old one's tail.
        So Lightning's copy of the state is empty, and iter() restores litdata's state for the run's position.
        """

        def __init__(self, *args, taken, **kwargs):
            super().__init__(*args, **kwargs)
            self.taken = taken
            self.batches_per_epoch = len(self)  # this rank's
            self.initial = self.dataset.state_dict(0, self.num_workers, self.batch_size)

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

        def __iter__(self):
            if self.taken is None:  # no Trainer: litdata's own epochs, one per iter()
                return super().__iter__()
            epoch, within = divmod(self.taken(), self.batches_per_epoch)  # litdata counts epochs from 1
            self.restore, self._worker_idx = False, None
            if within:
                n = within * self.batch_size  # samples this rank has yielded in the epoch
                dataset = {**self.initial, "current_epoch": epoch + 1, "num_samples_yielded": n,
                           "sample_in_epoch": n * self.initial["world_size"]}
                super().load_state_dict({"dataset": dataset, "current_epoch": epoch + 1, "num_samples_yielded": n,
                                         "latest_worker_idx": (within - 1) % max(1, self.num_workers)})
            else:  # at an epoch's start: iter() begins epoch current_epoch + 1
                self.current_epoch = epoch
            return super().__iter__()

    return StreamingLoader


def train_loader(images: ShardImages, batch_size: int, num_workers: int, seed: int, taken):
    """litdata's StreamingDataLoader over the training shards, each iter() starting after `taken()` batches
    (taken=None: each iter() the next epoch).

    Shuffled by (seed, epoch); incomplete batches dropped, so every DDP rank takes the same number of steps.
    """
    dataset = litdata().StreamingDataset(str(images.folder), shuffle=True, drop_last=True, seed=seed)
    # Its own generator: creating an iterator must not draw from the global RNG (which draws t, eps and flips).
    return _loader_class()(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=True, taken=taken,
                           generator=torch.Generator().manual_seed(seed))
