"""io.files: a failed write leaves the old file and no temporary; strict JSON; inputs kept."""

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from transfer_fast.errors import TransferFastError
from transfer_fast.io.files import (
    atomic_write,
    csv_text,
    refuse_overwriting_inputs,
    save_tensors,
    write_csv,
    write_json,
    write_text,
)

ROOT = Path(__file__).resolve().parents[2]


def half_then(exc: BaseException):
    """A writer that gets half of its output onto the disk, then fails."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write("new, but only ha")
            f.flush()
            raise exc
    return write


@pytest.mark.parametrize("exc, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (ValueError("Format 'xyz' is not supported\nsupported: png"), "Format 'xyz' is not supported"),
])
def test_a_writer_that_fails_midway_leaves_the_old_file(tmp_path, exc, reason):
    path = tmp_path / "out.json"
    path.write_text("old\n")
    with pytest.raises(TransferFastError) as info:
        atomic_write(path, half_then(exc))
    assert str(info.value) == f"{path}: cannot write ({reason})"
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left behind


def test_an_unexpected_error_propagates_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="bug"):
        atomic_write(path, half_then(RuntimeError("bug")))
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["out.csv"]


def test_a_file_size_limit_leaves_the_old_file(tmp_path):
    pytest.importorskip("resource")  # RLIMIT_FSIZE: POSIX only
    path = tmp_path / "report.md"
    path.write_text("old\n")
    script = textwrap.dedent(f"""
        import resource, signal
        from transfer_fast.errors import TransferFastError
        from transfer_fast.io.files import write_text
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_text({str(path)!r}, "x" * 100_000)
        except TransferFastError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}: cannot write (File too large)")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["report.md"]


def test_a_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(TransferFastError) as info:
        write_text(tmp_path / "file" / "x.txt", "x")
    assert str(info.value).startswith(f"{tmp_path / 'file' / 'x.txt'}: cannot write (")
    write_text(tmp_path / "new" / "deeper" / "x.txt", "x")  # missing folders are made
    assert (tmp_path / "new" / "deeper" / "x.txt").read_text() == "x"


def test_write_json_is_strict_with_inf_and_nan_as_strings(tmp_path):
    path = write_json(tmp_path / "r.json", {"T": float("inf"), "d": [float("nan"), -float("inf")],
                                           "ok": (1.5, 2), "nested": {"x": float("nan")}})

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    got = json.loads(path.read_text(), parse_constant=refuse)
    assert got == {"T": "inf", "d": ["nan", "-inf"], "ok": [1.5, 2], "nested": {"x": "nan"}}


def test_csv_has_a_header_and_plain_line_ends(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["a", "b"], [[1, "x,y"], [repr(0.1), ""]])
    assert path.read_bytes() == b'a,b\n1,"x,y"\n0.1,\n'
    assert csv_text([["q"]]) == "q\n"


def test_save_tensors_copies_tied_and_strided_tensors(tmp_path):
    from safetensors import safe_open

    w = torch.arange(6.0).reshape(2, 3)
    path = save_tensors(tmp_path / "s.safetensors", {"w": w, "tied": w, "t": w.t()},
                        metadata={"k": "v"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert torch.equal(f.get_tensor("t"), w.t()) and torch.equal(f.get_tensor("tied"), w)


def test_refuse_overwriting_inputs(tmp_path):
    data = tmp_path / "b.pt"
    refuse_overwriting_inputs([tmp_path / "out.json", None, "-"], [data, None])
    with pytest.raises(TransferFastError, match="refusing to overwrite an input"):
        refuse_overwriting_inputs([None, tmp_path / "sub" / ".." / "b.pt"], [data])
