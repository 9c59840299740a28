"""Data sets read batch by batch: an image folder decoded lazily in DataLoader workers.

`open_dataset` lists a folder of `<class>/<image>` files and returns a DataStream
whose `batches` decode the images in worker processes as the model asks for them, so
memory holds a few batches whatever the folder's size. An .npz is read whole, as
`load_dataset` reads it (bounded by MAX_DATASET_BYTES). Preprocessing, classes,
order and errors are load_dataset's, so both give the same tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TransferFastError
from .datasets import (
    DEFAULT_IMAGE_SIZE,
    MEAN,
    STD,
    LoadedData,
    _check_options,
    _decode,
    _folder_files,
    _load_npz,
    _report_folder,
    batches,
    normalisation,
)


def default_workers() -> int:
    """Loader processes for an image folder: the CPUs this process may use, less one for
    the model, at most 8 (decoding a 224-pixel JPEG is ~2 ms; 8 keep a GPU fed)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


class ImageFolderDataset(torch.utils.data.Dataset):
    """`root/<class>/<image>` as a torch Dataset whose items are decoded when asked for.

    Item i is (x, y, file): x float32 (C, size, size) normalised, y its class index;
    for an unreadable file x is None and y the reason (a str), to be skipped by
    `collate_images`. Classes and order as `load_dataset`.
    """

    def __init__(self, root: Path, size: int, channels: int | None, mean, std):
        self.root, self.size = root, size
        self.classes, self.files = _folder_files(root)
        self.mode, c = ("L", 1) if channels == 1 else ("RGB", 3)
        self.mean, self.std = normalisation(mean, std, c)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int | str, str]:
        file, label = self.files[i]
        name = file.relative_to(self.root).as_posix()
        pixels = _decode(file, self.mode, self.size)
        if isinstance(pixels, str):
            return None, pixels, name
        x = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std), label, name


def collate_images(items) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """(x (B, C, H, W), y (B,), [(file, why) skipped]) of ImageFolderDataset items; x is
    empty (0 rows) when every file of the batch was unreadable."""
    good = [(x, y) for x, y, _ in items if x is not None]
    skipped = [(name, why) for x, why, name in items if x is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), skipped
    return (torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped)


@dataclass
class DataStream:
    """A data set read batch by batch: `classes`, `source`, `size` (the images listed,
    unreadable ones included) and, once `batches` has been iterated, `skipped`
    (file, reason) and `read` (images delivered)."""

    classes: list[str]
    source: str
    size: int
    folder: ImageFolderDataset | None = None
    loaded: LoadedData | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    read: int = 0

    def __len__(self) -> int:
        return self.size

    def batches(self, batch_size: int, *, workers: int = 0,
                pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x (B, C, H, W), y (B,)) in file order; a folder is decoded by `workers`
        DataLoader processes (0: in this one). Unreadable files are skipped, listed in
        `skipped` and summarised in a warning at the end; TransferFastError at the end
        when none could be read."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TransferFastError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise TransferFastError(f"workers must be an integer >= 0, got {workers!r}")
        if self.loaded is not None:
            return batches(self.loaded, batch_size)
        return self._stream(batch_size, workers, pin_memory)

    def _stream(self, batch_size: int, workers: int, pin_memory: bool):
        folder = self.folder
        self.skipped, self.read = [], 0
        loader = torch.utils.data.DataLoader(
            folder, batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=collate_images, pin_memory=pin_memory,
            prefetch_factor=4 if workers else None)
        counts = [0] * len(self.classes)
        for x, y, skipped in loader:
            self.skipped += skipped
            if len(y):
                self.read += len(y)
                for label in y.tolist():
                    counts[label] += 1
                yield x, y
        _report_folder(folder.root, self.classes, len(folder), counts, self.skipped)


def open_dataset(path: str | Path, *, image_size: int | None = None,
                 channels: int | None = None, mean: float | Sequence[float] = MEAN,
                 std: float | Sequence[float] = STD) -> DataStream:
    """A data set to stream: an image folder is listed now and decoded batch by batch
    (`DataStream.batches`); an .npz is read as `load_dataset` reads it. The arguments
    and errors are load_dataset's; mean/std errors come at once, unreadable images as
    the batches are read."""
    path = _check_options(path, image_size, channels)
    if path.is_dir():
        folder = ImageFolderDataset(path, image_size or DEFAULT_IMAGE_SIZE, channels, mean, std)
        return DataStream(folder.classes, str(path), len(folder), folder=folder)
    data = _load_npz(path, image_size, channels, mean, std)
    return DataStream(data.classes, str(path), len(data), loaded=data, read=len(data))
