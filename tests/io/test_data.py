"""load_dataset: image folders and .npz layouts, checked against numpy/Pillow by hand."""

import numpy as np
import pytest
import torch
from PIL import Image

from transfer_fast.errors import TransferFastError
from transfer_fast.io.datasets import LoadedData, batches, load_dataset


def normalised(pixels: np.ndarray) -> np.ndarray:
    """The paper's preprocessing of uint8 pixels, written out."""
    return (pixels.astype(np.float64) / 255.0 - 0.5) / 0.225


def rgb(seed: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """cat: 2 images, dog: 1 image + a corrupt .png + a .txt; a hidden folder and file."""
    root = tmp_path / "data"
    for sub in ("cat", "dog", ".cache"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(rgb(0)).save(root / "cat" / "a.png")
    Image.fromarray(rgb(1, 12, 10)).save(root / "cat" / "b.BMP")
    Image.fromarray(rgb(2)[..., 0]).save(root / "dog" / "c.tiff")  # greyscale
    (root / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "._c.tiff").write_bytes(b"macOS resource fork")
    Image.fromarray(rgb(3)).save(root / ".cache" / "x.png")
    return root


def test_folder_values_labels_and_skips(folder):
    skip = r"skipped 1 of 4 files: 'dog/bad.png \(cannot identify image file\)'"
    with pytest.warns(UserWarning, match=skip):
        data = load_dataset(folder, image_size=8)
    assert isinstance(data, LoadedData) and len(data) == 3
    assert data.classes == ["cat", "dog"]
    assert data.y.dtype == torch.int64 and data.y.tolist() == [0, 0, 1]
    assert data.x.dtype == torch.float32 and data.x.shape == (3, 3, 8, 8)
    assert [f for f, _ in data.skipped] == ["dog/bad.png"]
    assert data.source == str(folder)
    # At its own size an image is not resampled: exactly the formula on the pixels.
    np.testing.assert_allclose(data.x[0].numpy(), normalised(rgb(0)).transpose(2, 0, 1),
                               atol=1e-5)
    # Greyscale turned RGB repeats the grey level in every channel.
    grey = normalised(rgb(2)[..., 0])
    for ch in range(3):
        np.testing.assert_allclose(data.x[2, ch].numpy(), grey, atol=1e-5)


def test_folder_resize_matches_pillow_bilinear(folder):
    with pytest.warns(UserWarning, match="skipped"):
        data = load_dataset(folder, image_size=5)
    assert data.x.shape == (3, 3, 5, 5)
    small = Image.fromarray(rgb(1, 12, 10)).resize((5, 5), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(data.x[1].numpy(),
                               normalised(np.asarray(small)).transpose(2, 0, 1), atol=1e-5)


def test_folder_default_size_and_grey(tmp_path):
    for i, ext in enumerate((".jpg", ".jpeg", ".gif", ".webp", ".tif")):
        (tmp_path / f"k{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rgb(i)).save(tmp_path / f"k{i % 2}" / f"im{ext}")
    data = load_dataset(tmp_path)
    assert data.x.shape == (5, 3, 224, 224) and data.y.tolist() == [0, 0, 0, 1, 1]
    grey = load_dataset(tmp_path, image_size=8, channels=1)
    assert grey.x.shape == (5, 1, 8, 8)
    # Pillow's own L conversion of the decoded file: .webp is lossy, so decode it again.
    with Image.open(tmp_path / "k1" / "im.webp") as img:
        expected = normalised(np.asarray(img.convert("L")))
    np.testing.assert_allclose(grey.x[4, 0].numpy(), expected, atol=1e-5)


def test_folder_errors(tmp_path):
    with pytest.raises(TransferFastError, match="not found"):
        load_dataset(tmp_path / "nope")
    Image.fromarray(rgb(0)).save(tmp_path / "loose.png")
    with pytest.raises(TransferFastError, match="no class subfolders.*1 images directly"):
        load_dataset(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    with pytest.raises(TransferFastError, match=r"no image files .* 'a'"):
        load_dataset(tmp_path)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(TransferFastError, match="none of the 1 image files could be read"):
        load_dataset(tmp_path)
    (tmp_path / "table.csv").write_text("1,2")
    with pytest.raises(TransferFastError, match="table.csv: expected a folder"):
        load_dataset(tmp_path / "table.csv")
    for bad in ({"image_size": 0}, {"channels": 2}):
        with pytest.raises(TransferFastError, match="must be"):
            load_dataset(tmp_path, **bad)


def test_empty_class_warns(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(rgb(0)).save(tmp_path / "b" / "x.png")
    with pytest.warns(UserWarning, match="classes without images: 'a'"):
        data = load_dataset(tmp_path, image_size=4)
    assert data.classes == ["a", "b"] and data.y.tolist() == [1]


def save_npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


NCHW = np.stack([rgb(i) for i in range(5)]).transpose(0, 3, 1, 2)  # (5, 3, 8, 8) uint8
LABELS = np.array([0, 2, 1, 2, 0])


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw", "nhw1", "n1hw"])
def test_npz_layouts(tmp_path, layout):
    grey = NCHW[:, 0]
    x, expected = {
        "nchw": (NCHW, NCHW), "nhwc": (NCHW.transpose(0, 2, 3, 1), NCHW),
        "nhw": (grey, grey[:, None]), "nhw1": (grey[..., None], grey[:, None]),
        "n1hw": (grey[:, None], grey[:, None]),
    }[layout]
    data = load_dataset(save_npz(tmp_path, x=x, y=LABELS.astype(np.int32)))
    np.testing.assert_allclose(data.x.numpy(), normalised(expected), atol=1e-5)
    assert data.y.dtype == torch.int64 and data.y.tolist() == LABELS.tolist()
    assert data.classes == ["0", "1", "2"] and data.skipped == []


def test_npz_float_taken_as_is_and_class_names(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float64)
    path = save_npz(tmp_path, x=x, y=np.array([0, 1, 1, 0]), classes=np.array(["ant", "bee"]))
    data = load_dataset(path)
    assert data.x.dtype == torch.float32
    np.testing.assert_allclose(data.x.numpy(), x, rtol=1e-6)
    assert data.classes == ["ant", "bee"]


def test_npz_resize_agrees_with_pillow_route(tmp_path):
    """The same images through an .npz (torch, antialiased) and a folder (Pillow)."""
    x = np.stack([rgb(i, 16, 16) for i in range(2)])  # (2, 16, 16, 3)
    for i, img in enumerate(x):
        (tmp_path / "f" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "f" / "c" / f"{i}.png")
    from_npz = load_dataset(save_npz(tmp_path, x=x, y=np.zeros(2, np.int64)), image_size=7)
    from_folder = load_dataset(tmp_path / "f", image_size=7)
    assert from_npz.x.shape == (2, 3, 7, 7)
    # Pillow's fixed-point weights and uint8 rounding: under one grey level apart.
    torch.testing.assert_close(from_npz.x, from_folder.x, atol=1 / 255 / 0.225, rtol=0)


def test_npz_channel_conversion(tmp_path):
    path = save_npz(tmp_path, x=NCHW, y=LABELS)
    grey = load_dataset(path, channels=1).x
    luma = (0.299 * normalised(NCHW[:, 0]) + 0.587 * normalised(NCHW[:, 1])
            + 0.114 * normalised(NCHW[:, 2]))
    np.testing.assert_allclose(grey[:, 0].numpy(), luma, atol=1e-5)
    path1 = save_npz(tmp_path, "g.npz", x=NCHW[:, 0], y=LABELS)
    three = load_dataset(path1, channels=3).x
    assert three.shape == (5, 3, 8, 8) and torch.equal(three[:, 0], three[:, 2])


@pytest.mark.parametrize("arrays, message", [
    ({"x": NCHW}, "no array 'y'"),
    ({"y": LABELS}, "no array 'x'"),
    ({"x": NCHW, "y": LABELS.astype(np.float32)}, "expected integer labels"),
    ({"x": NCHW, "y": LABELS[:, None]}, "expected integer labels"),
    ({"x": NCHW, "y": LABELS[:4]}, "4 labels for 5 images"),
    ({"x": NCHW, "y": LABELS - 1}, "negative labels"),
    ({"x": NCHW, "y": LABELS + 10**9}, "label of 1000000002.*classes are not supported"),
    ({"x": NCHW[:, 0, 0], "y": LABELS}, r"x has shape \(5, 8\)"),
    ({"x": NCHW[:, :, :, :, None], "y": LABELS}, "x has shape"),
    ({"x": NCHW[:0], "y": LABELS[:0]}, "no images"),
    ({"x": NCHW.astype(np.int32), "y": LABELS}, "dtype int32"),
    ({"x": np.full((5, 1, 2, 2), np.nan, np.float32), "y": LABELS}, "NaN or Inf"),
    ({"x": np.full((5, 1, 2, 2), np.inf), "y": LABELS}, "NaN or Inf"),
    ({"x": NCHW, "y": LABELS, "classes": np.array(["a", "b"])}, "2 names"),
    ({"x": np.zeros((5, 8, 8, 4), np.uint8), "y": LABELS}, "4 channels.*alpha"),
    ({"x": np.zeros((5, 2, 8, 8), np.uint8), "y": LABELS}, "2 channels, expected 1 or 3"),
])
def test_npz_errors(tmp_path, arrays, message):
    path = save_npz(tmp_path, **arrays)
    with pytest.raises(TransferFastError, match=message) as info:
        load_dataset(path)
    assert str(path) in str(info.value)


def test_npz_unreadable_and_pickled(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TransferFastError, match="junk.npz: unreadable"):
        load_dataset(tmp_path / "junk.npz")
    objects = np.array([{"a": 1}, None], dtype=object)
    with pytest.raises(TransferFastError, match="unreadable"):
        load_dataset(save_npz(tmp_path, "o.npz", x=objects, y=np.array([0, 1])))


def test_batches_in_order():
    data = LoadedData(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10), ["a"])
    got = list(batches(data, 4))
    assert [len(y) for _, y in got] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in got]), data.x)
    assert torch.equal(torch.cat([y for _, y in got]), data.y)
    with pytest.raises(TransferFastError, match="batch_size"):
        batches(data, 0)


# ---- streaming (io.data_stream) ----------------------------------------------------------

def _streamed(stream, batch_size=2, workers=0):
    got = list(stream.batches(batch_size, workers=workers))
    return torch.cat([x for x, _ in got]), torch.cat([y for _, y in got]), got


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_of_a_folder_equals_the_loaded_folder(folder, workers):
    from transfer_fast.io.data_stream import DataStream, open_dataset

    with pytest.warns(UserWarning, match="skipped"):
        loaded = load_dataset(folder, image_size=8)
    stream = open_dataset(folder, image_size=8)
    assert isinstance(stream, DataStream) and stream.folder is not None
    assert stream.classes == ["cat", "dog"] and len(stream) == 4  # listed, bad.png included
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 files: 'dog/bad.png"):
        x, y, got = _streamed(stream, batch_size=2, workers=workers)
    assert [len(b) for _, b in got] == [2, 1]  # the batch holding bad.png is one short
    torch.testing.assert_close(x, loaded.x, rtol=0, atol=0)
    assert torch.equal(y, loaded.y)
    assert [f for f, _ in stream.skipped] == ["dog/bad.png"] and stream.read == 3


def test_stream_is_lazy_and_normalises_per_channel(folder):
    from transfer_fast.io.data_stream import ImageFolderDataset, open_dataset

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    stream = open_dataset(folder, image_size=8, mean=mean, std=std)
    assert isinstance(stream.folder, ImageFolderDataset)
    x, label, name = stream.folder[0]  # one file decoded, on demand
    expected = (rgb(0) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    assert (label, name) == (0, "cat/a.png")
    bad = stream.folder[2]  # dog/bad.png sorts before dog/c.tiff
    assert bad[0] is None and "cannot identify image file" in bad[1]
    grey = open_dataset(folder, image_size=8, channels=1, mean=0.4, std=0.2).folder[3][0]
    np.testing.assert_allclose(grey[0].numpy(), (rgb(2)[..., 0] / 255.0 - 0.4) / 0.2, atol=1e-5)


def test_npz_mean_std_and_stream(tmp_path):
    from transfer_fast.io.data_stream import open_dataset

    path = save_npz(tmp_path, x=NCHW, y=LABELS)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    data = load_dataset(path, mean=mean, std=std)
    expected = (NCHW / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(data.x.numpy(), expected, atol=1e-5)
    # 3 -> 1 channel: luma of the pixels, then the single channel's normalisation.
    grey = load_dataset(path, channels=1, mean=0.3, std=0.5).x
    luma = (0.299 * NCHW[:, 0] + 0.587 * NCHW[:, 1] + 0.114 * NCHW[:, 2]) / 255.0
    np.testing.assert_allclose(grey[:, 0].numpy(), (luma - 0.3) / 0.5, atol=1e-5)
    stream = open_dataset(path, mean=mean, std=std)
    assert stream.folder is None and stream.read == len(stream) == 5
    x, y, _ = _streamed(stream, batch_size=3, workers=4)  # in memory: workers unused
    assert torch.equal(x, data.x) and y.tolist() == LABELS.tolist()


@pytest.mark.parametrize("mean, std, message", [
    ((0.5, 0.5), 0.2, "mean has 2 values for 3-channel images"),
    (0.5, (0.2, 0.0, 0.2), "std must be finite and positive"),
    (float("nan"), 0.2, "mean must be finite"),
    ("a", 0.2, "mean must be numbers"),
])
def test_bad_normalisation_is_refused_at_once(folder, tmp_path, mean, std, message):
    from transfer_fast.io.data_stream import open_dataset

    with pytest.raises(TransferFastError, match=message):
        open_dataset(folder, mean=mean, std=std)
    with pytest.raises(TransferFastError, match=message):
        load_dataset(save_npz(tmp_path, x=NCHW, y=LABELS), mean=mean, std=std)


def test_stream_errors(tmp_path):
    from transfer_fast.io.data_stream import open_dataset

    with pytest.raises(TransferFastError, match="not found"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    stream = open_dataset(tmp_path, image_size=4)
    for bad in ({"batch_size": 0}, {"batch_size": 2, "workers": -1}):
        with pytest.raises(TransferFastError, match="batch_size|workers"):
            stream.batches(**bad)
    with pytest.raises(TransferFastError, match="none of the 1 image files could be read"):
        list(stream.batches(4))
