"""io.safetensors: hostile headers are refused naming the file (and tensor), never half-read."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file as library_load_file
from safetensors.torch import save_file

from transfer_fast.errors import TransferFastError
from transfer_fast.io.safetensors import (
    MAX_HEADER_BYTES,
    load_file,
    parse_header,
    read_header,
    read_range,
)

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def write(path, header=None, data=b"", *, raw=None, length=None):
    """A file with `header` (an object, or `raw` bytes) and `data`; `length` overrides N."""
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def test_valid_file_reads_like_the_library(tmp_path):
    state = {"b": torch.randn(3, 4), "a": torch.arange(5, dtype=torch.int64),
             "h": torch.randn(7).half(), "empty": torch.zeros(0), "m": torch.ones(2).bool()}
    path = tmp_path / "ok.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert set(header.names) == set(state) and header.metadata == {"format": "pt"}
    assert header.shapes["b"] == (3, 4) and header.dtypes["h"] == torch.float16
    begin, end = header.offsets["b"]
    assert end - begin == 48 and header.data_start <= begin <= end <= header.file_size
    ours, theirs = load_file(path), library_load_file(str(path))
    assert list(ours) == list(header.names)
    for name in state:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name])


def test_read_range_and_a_file_cut_short_after_its_header_was_read(tmp_path):
    path = tmp_path / "r.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        header = parse_header(fd, path)
        buf = torch.empty(4096, dtype=torch.uint8)
        assert read_range(fd, header, "w", 10, 20, buf).tolist() == list(range(10, 20))
        os.truncate(path, header.data_start + 100)  # shorter than the header says
        with pytest.raises(TransferFastError, match="r.safetensors: file shorter"):
            read_range(fd, header, "w", 0, 1000, buf)
    finally:
        os.close(fd)


HOSTILE = [  # (header, data, message): every case names the file
    ({"a": F32x2, "b": F32x2}, b"\0" * 8, "'b'.*overlaps|'a'.*overlaps"),
    ({"a": {**F32x2, "data_offsets": [4, 12]}}, b"\0" * 12, "gap"),
    ({"a": {**F32x2, "data_offsets": [-8, 0]}}, b"\0" * 8, "not two non-negative integers"),
    ({"a": {**F32x2, "data_offsets": [8, 0]}}, b"\0" * 8, "begin after"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}}, b"\0" * 4, "truncated.*'a'"),
    ({"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, b"\0" * 8, "not two non-negative"),
    ({"a": {**F32x2, "data_offsets": [0, 2**70]}}, b"\0" * 8, "truncated.*'a'"),
    ({"a": {**F32x2, "shape": [True, 2]}}, b"\0" * 8, "shape"),
    ({"a": {**F32x2, "shape": [-2]}}, b"\0" * 8, "shape"),
    ({"a": {**F32x2, "shape": [3]}}, b"\0" * 8, "needs 12 bytes"),
    ({"a": {**F32x2, "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, b"", "overflows"),
    ({"a": {**F32x2, "dtype": "Q7"}}, b"\0" * 8, "tensor 'a'.*unknown dtype 'Q7'"),
    ({"a": {**F32x2, "dtype": "F4", "shape": [16]}}, b"\0" * 8, "tensor 'a'.*F4"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "tensor 'a'.*no data_offsets"),
    ({"a": [1, 2]}, b"", "tensor 'a'.*not an object"),
    ({"a": F32x2}, b"\0" * 12, "4 bytes after the last tensor"),
    ({"__metadata__": {"n": 1}, "a": F32x2}, b"\0" * 8, "__metadata__"),
    ([F32x2], b"", "not a JSON object"),
]


@pytest.mark.parametrize("header, data, message", HOSTILE)
def test_hostile_headers_are_refused_naming_the_file(tmp_path, header, data, message):
    path = write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(TransferFastError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1
    with pytest.raises(TransferFastError):
        load_file(path)


@pytest.mark.parametrize("raw, data, length, message", [
    (b"{not json", b"", None, "not JSON"),
    (b'{"a": \xff}', b"", None, "not JSON"),  # not UTF-8
    (b"[" * 100_000 + b"]" * 100_000, b"", None, "not JSON"),  # nesting deeper than Python's
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", '
     b'"shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8, None, "'a' appears twice"),
    (b"{}", b"", MAX_HEADER_BYTES + 1, "exceeds"),
    (b"{}", b"", 2**63, "exceeds"),
    (b"{}", b"", 1000, "truncated"),
])
def test_unparseable_or_oversized_headers(tmp_path, raw, data, length, message):
    path = write(tmp_path / "bad.safetensors", raw=raw, data=data, length=length)
    with pytest.raises(TransferFastError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_files_shorter_than_the_length_field(tmp_path):
    for content in (b"", b"\x01\x02"):
        path = tmp_path / "short.safetensors"
        path.write_bytes(content)
        with pytest.raises(TransferFastError, match="short.safetensors.*8-byte"):
            read_header(path)


def test_whatever_the_library_refuses_we_refuse(tmp_path):
    """Parity: a file the safetensors library rejects never reaches a measurement."""
    for i, (header, data, _) in enumerate(HOSTILE):
        path = write(tmp_path / f"h{i}.safetensors", header, data)
        try:
            library_load_file(str(path))
        except Exception:  # the library refuses it: so must we
            with pytest.raises(TransferFastError):
                read_header(path)
