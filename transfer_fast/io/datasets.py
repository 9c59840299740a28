"""Downstream data sets for the domain gap: an image folder or an .npz.

Both become normalised float32 images (N, C, H, W) and int64 labels (N,), by default
with the paper's preprocessing (PAPER.md section 4): pixels in [0, 1], then
(x - 0.5) / 0.225 per channel (`mean`/`std` choose others, per channel).

`load_dataset` holds the whole set as one tensor (small sets, the experiment's
tasks); `io.data_stream.open_dataset` streams an image folder instead, decoding it in
DataLoader workers, so a large folder never sits in memory.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..errors import TransferFastError, first_few

MEAN, STD = 0.5, 0.225  # the paper's, for every channel
DEFAULT_IMAGE_SIZE = 224  # the paper's input size for folders of images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Pillow's "L" conversion (ITU-R 601-2 luma), so npz and folder data turn grey alike.
_LUMA = (0.299, 0.587, 0.114)
_CHUNK = 256  # images converted at a time: bounds the float temporaries of an .npz
# Sizes taken from a file are checked against these before anything is allocated:
# a single label of 10**9 would otherwise ask for a list of 10**9 class names, and an
# .npz header can declare an array far larger than the file holds.
MAX_CLASSES = 100_000  # labels must lie in [0, MAX_CLASSES); ImageNet-21k has 21,841
MAX_IMAGE_SIDE = 4096  # image_size, and the side of the images an .npz holds
MAX_DATASET_BYTES = 64 << 30  # the float32 images (N, C, H, W) held in memory
_NPZ_ARRAYS = ("x", "y", "classes")  # the only arrays read; others stay in the file


@dataclass
class LoadedData:
    """x: float32 (N, C, H, W), normalised; y: int64 (N,) indices into `classes`.

    `skipped` lists (file relative to the folder, reason) for unreadable images;
    `source` is the path read.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.y)


def load_dataset(path: str | Path, *, image_size: int | None = None,
                 channels: int | None = None, mean: float | Sequence[float] = MEAN,
                 std: float | Sequence[float] = STD) -> LoadedData:
    """Read `root/<class>/<image>` folders or an .npz with arrays `x` and `y`.

    Folders: class index = position in the sorted subfolder names (torchvision's
    ImageFolder; hidden folders are left out), images converted to RGB (L when
    channels == 1) and resized to image_size x image_size (default 224, bilinear).
    Unreadable images are skipped, listed in `skipped` and summarised in a warning.

    .npz: x as (N, C, H, W), (N, H, W) or (N, H, W, C) with C 1 or 3; y integer
    (N,); an optional string array `classes` names the labels. uint8 x is scaled
    and normalised like images; float x is taken as already preprocessed, as is.
    image_size, if given, resizes (bilinear, antialiased); channels, if given,
    turns 1 channel into 3 (repeat) or 3 into 1 (luma). mean and std (one value, or
    one per channel of the result) normalise pixels in [0, 1] as (x - mean) / std.

    Raises TransferFastError naming the file for anything that cannot be used.
    """
    path = _check_options(path, image_size, channels)
    if path.is_dir():
        return _load_folder(path, image_size or DEFAULT_IMAGE_SIZE, channels, mean, std)
    return _load_npz(path, image_size, channels, mean, std)


def _check_options(path: str | Path, image_size, channels) -> Path:
    """The path, once it exists and is a folder or an .npz and the sizes are sane."""
    path = Path(path)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or not 1 <= image_size <= MAX_IMAGE_SIDE):
        raise TransferFastError(f"image_size must be an integer in 1..{MAX_IMAGE_SIDE}, got "
                                f"{image_size!r}")
    if channels not in (None, 1, 3):
        raise TransferFastError(f"channels must be 1 or 3, got {channels!r}")
    if not path.exists():
        raise TransferFastError(f"{path}: not found")
    if not path.is_dir() and path.suffix.lower() != ".npz":
        raise TransferFastError(f"{path}: expected a folder of class subfolders or an .npz file")
    return path


def normalisation(mean: float | Sequence[float], std: float | Sequence[float],
                  channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as float32 (channels, 1, 1) tensors: one value is used for every
    channel, otherwise one per channel. TransferFastError for another count, a value
    that is not finite, or a std that is not positive."""
    out = []
    for name, value in (("mean", mean), ("std", std)):
        values = [value] if isinstance(value, (int, float)) else list(value)
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise TransferFastError(f"{name} must be numbers, got {value!r}") from None
        if len(values) not in (1, channels):
            raise TransferFastError(f"{name} has {len(values)} values for {channels}-channel "
                                    f"images: give 1 or {channels}")
        if not all(math.isfinite(v) for v in values) or (name == "std" and min(values) <= 0):
            raise TransferFastError(f"{name} must be finite{' and positive' * (name == 'std')}"
                                    f", got {value!r}")
        out.append(torch.tensor(values, dtype=torch.float32).expand(channels).reshape(-1, 1, 1))
    return out[0], out[1]


def dataset_bytes(path: str | Path) -> int:
    """Roughly the bytes of float32 images `load_dataset(path)` would hold, from the
    .npz headers or the folder's file list alone (0 when it cannot tell)."""
    path = Path(path)
    try:
        if path.is_dir():
            return len(_image_files(path)) * 3 * DEFAULT_IMAGE_SIZE ** 2 * 4
        with zipfile.ZipFile(path) as z:
            shape, _, _ = _npy_header(z, "x.npy")
        return math.prod(shape) * 4
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return 0


def _image_files(folder: Path) -> list[Path]:
    """Image files under folder, sorted; hidden ones (macOS '._x.jpg' forks) left out."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _folder_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image file, class index)]) of `root/<class>/<image>`."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = _image_files(root)
        hint = (f"; it holds {len(loose)} images directly: put them in one subfolder per class"
                if loose else "")
        raise TransferFastError(f"{root}: no class subfolders (expected {root}/<class>/<image>)"
                                + hint)
    files = [(f, label) for label, name in enumerate(classes) for f in _image_files(root / name)]
    if not files:
        raise TransferFastError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its "
                                f"class subfolders {first_few(classes)}")
    return classes, files


def _decode(file: Path, mode: str, size: int) -> np.ndarray | str:
    """uint8 (size, size, C) pixels of one image file, or why it cannot be read."""
    try:
        with Image.open(file) as img:
            img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.array(img, dtype=np.uint8)  # a writable copy, as torch wants
    # Pillow reports broken files as any of these; DecompressionBombError is
    # not an OSError, and a bomb is as unusable as a corrupt file.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow repeats the full path, which the entry already names.
        return str(exc).replace(f" '{file}'", "") or type(exc).__name__
    return pixels.reshape(size, size, -1)


def _report_folder(root: Path, classes: list[str], total: int, counts: list[int],
                   skipped: list[tuple[str, str]]) -> None:
    """After reading a folder: TransferFastError if no image could be read, else warnings
    for the skipped files and the classes left without images."""
    if skipped:
        summary = first_few([f"{f} ({why})" for f, why in skipped], 3)
        if sum(counts) == 0:
            raise TransferFastError(f"{root}: none of the {total} image files could be "
                                    f"read: {summary}")
        warnings.warn(f"{root}: skipped {len(skipped)} of {total} files: {summary}",
                      stacklevel=4)
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        warnings.warn(f"{root}: classes without images: {first_few(empty)}", stacklevel=4)


def _load_folder(root: Path, size: int, channels: int | None, mean, std) -> LoadedData:
    classes, files = _folder_files(root)
    mode, c = ("L", 1) if channels == 1 else ("RGB", 3)
    m, s = normalisation(mean, std, c)
    _check_bytes(root, (len(files), c, size, size))
    # One allocation up front; unreadable files leave unused rows at the end.
    x = torch.empty((len(files), c, size, size), dtype=torch.float32)
    y = torch.empty(len(files), dtype=torch.int64)
    skipped: list[tuple[str, str]] = []
    n = 0
    for file, label in tqdm(files, desc=f"reading {root.name}", unit="img", leave=False,
                            disable=None):
        pixels = _decode(file, mode, size)
        if isinstance(pixels, str):
            skipped.append((file.relative_to(root).as_posix(), pixels))
            continue
        x[n] = torch.from_numpy(pixels).permute(2, 0, 1)
        y[n] = label
        n += 1
    counts = torch.bincount(y[:n], minlength=len(classes)).tolist()
    _report_folder(root, classes, len(files), counts, skipped)
    x = x[:n].div_(255.0).sub_(m).div_(s)
    return LoadedData(x, y[:n], classes, skipped, str(root))


def _check_bytes(path: Path, shape: tuple[int, ...]) -> None:
    """Refuses float32 images of `shape` beyond MAX_DATASET_BYTES, before allocating them."""
    nbytes = math.prod(shape) * 4
    if nbytes > MAX_DATASET_BYTES:
        raise TransferFastError(f"{path}: {shape[0]} images of {tuple(shape[1:])} would take "
                                f"{nbytes / 2**30:.1f} GiB as float32, more than the "
                                f"{MAX_DATASET_BYTES >> 30} GiB allowed")


def _npy_header(z: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, uncompressed bytes stored) of one array, from its header alone."""
    info = z.getinfo(member)
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{member}: .npy format version {version} is not supported")
        return shape, dtype, info.file_size - f.tell()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays x, y and classes of the file; pickled (object) arrays are refused,
    never run; each array's header is checked against the bytes the file stores and
    MAX_DATASET_BYTES before numpy allocates it."""
    try:
        with zipfile.ZipFile(path) as z:
            members = {m.removesuffix(".npy"): m for m in z.namelist()}
            missing = [k for k in ("x", "y") if k not in members]
            if missing:
                raise TransferFastError(f"{path}: no array {first_few(missing)} (it holds "
                                        f"{first_few(members) or 'nothing'}); expected x and y")
            for key in (k for k in _NPZ_ARRAYS if k in members):
                shape, dtype, stored = _npy_header(z, members[key])
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > MAX_DATASET_BYTES:
                    raise TransferFastError(f"{path}: array {key} of shape {shape} would take "
                                            f"{nbytes / 2**30:.1f} GiB, more than the "
                                            f"{MAX_DATASET_BYTES >> 30} GiB allowed")
                if not dtype.hasobject and nbytes > stored:
                    raise TransferFastError(f"{path}: array {key} declares {nbytes} bytes but "
                                            f"the file stores {stored} (truncated?)")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in _NPZ_ARRAYS if k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, TransferFastError):
            raise
        raise TransferFastError(f"{path}: unreadable .npz ({type(exc).__name__}: {exc})") from exc


def _nchw(x: np.ndarray, path: Path) -> tuple[np.ndarray, bool]:
    """A 4-D view of x and whether it is channels-last (N, H, W, C)."""
    if x.ndim == 3:
        return x[:, None], False
    if x.ndim == 4:
        last = x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3)
        channels = x.shape[-1] if last else x.shape[1]
        if channels not in (1, 3):
            hint = " (drop the alpha channel of RGBA images)" if channels == 4 else ""
            raise TransferFastError(f"{path}: x has shape {x.shape}: {channels} channels, "
                                    f"expected 1 or 3{hint}")
        return x, last
    raise TransferFastError(f"{path}: x has shape {x.shape}: expected (N, C, H, W), (N, H, W) "
                            "or (N, H, W, C) with C 1 or 3")


def _check_npz(path: Path, x: np.ndarray, y: np.ndarray, names: np.ndarray | None) -> None:
    problem = None
    if len(x) == 0:
        problem = "x holds no images"
    elif x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        problem = (f"x has dtype {x.dtype}: expected uint8 images (0-255) or float images "
                   "already normalised")
    elif not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        problem = f"y has dtype {y.dtype} and shape {y.shape}: expected integer labels (N,)"
    elif len(y) != len(x):
        problem = f"y has {len(y)} labels for {len(x)} images in x"
    elif y.min() < 0:
        problem = f"y has negative labels (smallest {y.min()}): expected 0, 1, ..."
    elif y.max() >= MAX_CLASSES:
        problem = (f"y has a label of {y.max()}: labels index classes, and more than "
                   f"{MAX_CLASSES} classes are not supported")
    elif names is not None and (names.ndim != 1 or len(names) <= y.max()):
        problem = f"classes has {names.size} names but the labels in y go up to {y.max()}"
    if problem:
        raise TransferFastError(f"{path}: {problem}")


def _load_npz(path: Path, size: int | None, channels: int | None, mean, std) -> LoadedData:
    arrays = _read_npz(path)
    names = arrays.get("classes")
    x, channels_last = _nchw(arrays["x"], path)
    y = arrays["y"]
    _check_npz(path, x, y, names)
    c, h, w = (x.shape[3], *x.shape[1:3]) if channels_last else x.shape[1:]
    target = channels or c
    out_hw = (size, size) if size else (h, w)
    if max(h, w) > MAX_IMAGE_SIDE:
        raise TransferFastError(f"{path}: images of {h}x{w} pixels: more than "
                                f"{MAX_IMAGE_SIDE} on a side is not supported")
    pixels = x.dtype == np.uint8
    m, s = normalisation(mean, std, target) if pixels else (None, None)
    _check_bytes(path, (len(x), max(c, target), *out_hw))
    out = torch.empty((len(x), target, *out_hw), dtype=torch.float32)
    for start in range(0, len(x), _CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + _CHUNK])).float()
        if channels_last:
            chunk = chunk.permute(0, 3, 1, 2)
        if not torch.isfinite(chunk).all():
            raise TransferFastError(f"{path}: x holds NaN or Inf values")
        # Channels are converted on pixels in [0, 1], as Pillow converts a folder's
        # images, and then normalised with the target's per-channel mean and std.
        if pixels:
            chunk = chunk.div_(255.0)
        if target != c:
            chunk = _match_channels(chunk, target, path)
        if pixels:
            chunk = chunk.sub_(m).div_(s)
        if size:
            chunk = F.interpolate(chunk, size=out_hw, mode="bilinear", align_corners=False,
                                  antialias=True)
        out[start:start + len(chunk)] = chunk
    classes = ([str(n) for n in names] if names is not None
               else [str(i) for i in range(int(y.max()) + 1)])
    return LoadedData(out, torch.from_numpy(y.astype(np.int64)), classes, [], str(path))


def _match_channels(x: torch.Tensor, channels: int, path: Path) -> torch.Tensor:
    """(N, 1 or 3, H, W) -> (N, channels, H, W) by repeating, or by luma.

    Float images (already preprocessed) are converted as they are: repeating, and the
    luma weights summing to 1, make that equal to converting the pixels first when the
    normalisation is the same for every channel.
    """
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if x.shape[1] == 3 and channels == 1:
        return torch.einsum("nchw,c->nhw", x, torch.tensor(_LUMA))[:, None].contiguous()
    raise TransferFastError(f"{path}: x has {x.shape[1]} channels, cannot make {channels}")


def batches(data: LoadedData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x (B, C, H, W), y (B,)) views in order; the last batch may be smaller."""
    # Checked here, not inside a generator, so a bad size fails at the call.
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TransferFastError(f"batch_size must be a positive integer, got {batch_size!r}")
    return ((data.x[i:i + batch_size], data.y[i:i + batch_size])
            for i in range(0, len(data), batch_size))

