"""Journals: a torn last line is no record and is cut before the next append."""

import pytest

from transfer_fast.errors import TransferFastError
from transfer_fast.io import journal


def test_a_torn_line_is_cut_before_the_next_record(tmp_path):
    path = tmp_path / "j.jsonl"
    journal.append(path, {"a": 1})
    with open(path, "ab") as f:
        f.write(b'{"b": 2, "tor')  # a kill in the middle of a write
    assert [r for _, r in journal.read(path)] == [{"a": 1}]
    journal.append(path, {"c": 3})
    assert journal.read(path) == [(1, {"a": 1}), (2, {"c": 3})]
    assert path.read_bytes() == b'{"a": 1}\n{"c": 3}\n'


def test_corrupt_lines_are_named(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"a": 1}\n[1]\n')
    with pytest.raises(TransferFastError, match=r"j.jsonl: line 2 is not a thing"):
        journal.read(path, "thing")
    assert journal.read(tmp_path / "missing.jsonl") == []
