"""Hostile input: one line naming the file/key/value, exit 2, nothing lost, nothing measured wrong.

Files that change under a scan, run folders in use or corrupt, sizes that would
exhaust memory, configs that reach outside their folder or import code.
"""

import csv
import fcntl
import io
import json
import os
import signal
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from transfer_fast import transferability
from transfer_fast.errors import TransferFastError
from transfer_fast.io.datasets import MAX_CLASSES, load_dataset
from transfer_fast.io.pickles import unsafe_pickle_message
from transfer_fast.io.runfolder import claim
from transfer_fast.io.streaming import StreamedCheckpoint
from transfer_fast.pipelines import scan as scan_module
from transfer_fast.pipelines.experiment_config import (
    DEMO_CONFIG,
    MAX_RUNS,
    config_cost,
    parse_config,
    tomllib,
)
from transfer_fast.pipelines.experiment_data import apply_shift
from transfer_fast.pipelines.scan import scan
from transfer_fast.pipelines.scan_journal import ScanRecord

SHAPES = {"stem.weight": (16, 3, 3, 3), "stem.bias": (16,), "block.weight": (32, 16, 3, 3),
          "head.weight": (10, 32), "head.bias": (10,)}


def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


@pytest.fixture
def ckpts(tmp_path):
    save_file(state(0), str(tmp_path / "r.safetensors"))
    torch.save(state(1), tmp_path / "a.pt")
    paths = []
    for i in range(3):
        path = tmp_path / (f"b{i}.pt" if i % 2 == 0 else f"b{i}.safetensors")
        b = {n: t + 0.1 * (i + 1) for n, t in state(1).items()}
        torch.save(b, path) if path.suffix == ".pt" else save_file(b, str(path))
        paths.append(path)
    return tmp_path / "r.safetensors", tmp_path / "a.pt", paths


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- files changing under a scan ---------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_file_truncated_between_open_and_read_raises_not_sigbus(tmp_path, suffix):
    path = tmp_path / f"b{suffix}"
    torch.save(state(2), path) if suffix == ".pt" else save_file(state(2), str(path))
    with StreamedCheckpoint(path) as ck:
        os.truncate(path, path.stat().st_size // 3)
        buf = torch.empty(64 << 10, dtype=torch.uint8)
        with pytest.raises(TransferFastError, match=f"b{suffix}: file shorter"):
            for name, shape in ck.shapes.items():
                ck.read(name, 0, int(np.prod(shape)), buf)
        assert "changed while it was read" in ck.changed()


def test_scan_gives_a_failed_row_for_a_checkpoint_truncated_under_it(ckpts, tmp_path,
                                                                     monkeypatch):
    r, a, paths = ckpts
    victim = paths[0]  # a .pt
    opened = scan_module._open

    def open_then_truncate(path):
        ck, error = opened(path)
        if path == str(victim):
            os.truncate(victim, victim.stat().st_size // 2)
        return ck, error

    monkeypatch.setattr(scan_module, "_open", open_then_truncate)
    res = scan(paths, random=r, pretrained=a, out=tmp_path / "run", progress=False,
               plots=False)
    rows = {s["path"]: s for s in read(res.summary_csv)}
    assert rows[str(victim)]["status"] == "failed"
    assert "b0.pt" in rows[str(victim)]["error"]
    assert [rows[str(p)]["status"] for p in paths[1:]] == ["ok", "ok"]
    assert (res.done, res.failed) == (2, 1)


def test_checkpoint_rewritten_in_place_under_a_scan_is_not_measured(ckpts, tmp_path,
                                                                    monkeypatch):
    r, a, paths = ckpts
    victim = paths[1]  # a .safetensors: same size, other values, new mtime
    opened = scan_module._open

    def open_then_rewrite(path):
        ck, error = opened(path)
        if path == str(victim):
            data = bytearray(victim.read_bytes())
            data[-4:] = b"\0\0\xc0\x7f"  # a NaN in the last tensor
            with open(victim, "r+b") as f:
                f.write(data)
            os.utime(victim, ns=(1, 1))
        return ck, error

    monkeypatch.setattr(scan_module, "_open", open_then_rewrite)
    res = scan(paths, random=r, pretrained=a, out=tmp_path / "run", progress=False,
               plots=False)
    rows = {s["path"]: s for s in read(res.summary_csv)}
    assert rows[str(victim)]["status"] == "failed"
    assert "changed while it was read" in rows[str(victim)]["error"]


# -- the run folder ------------------------------------------------------------------------

def test_second_scan_on_a_locked_folder_fails_at_once_naming_folder_and_pid(ckpts, tmp_path):
    r, a, paths = ckpts
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another scan holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(TransferFastError, match=r"run: in use by another run \(pid 4242\)"):
            scan(paths, random=r, pretrained=a, out=out, progress=False)
    res = scan(paths, random=r, pretrained=a, out=out, progress=False, plots=False)
    assert res.done == 3  # the lock went with its holder; the scan released its own
    with claim(out, json.loads((out / "config.json").read_text())):
        pass  # and nothing is left holding it


def test_records_carry_options_and_are_not_reused_under_others(ckpts, tmp_path):
    r, a, paths = ckpts
    out = tmp_path / "run"
    first = scan(paths[:2], random=r, pretrained=a, out=out, progress=False, plots=False)
    assert [rec.options for rec in first.records] == [{"metric": "l1_mean",
                                                       "preset": "auto"}] * 2
    assert isinstance(first.records[0], ScanRecord) and first.plan is not None
    assert first.records[0].key[0] == str(paths[0].resolve())
    with pytest.raises(TransferFastError, match="other options.*metric.*l2"):
        scan(paths[:2], random=r, pretrained=a, out=out, metric="l2", progress=False)
    # A journal record made under metric l2 (say, copied in) is measured again, not reused.
    journal = out / "journal.rank0.jsonl"
    lines = journal.read_text().splitlines()
    forged = json.loads(lines[0])
    forged["options"]["metric"], forged["T"] = "l2", [123.0] * len(forged["T"])
    forged["time"] += 1  # the latest record of the path, until the rescan
    journal.write_text("\n".join([*lines, json.dumps(forged)]) + "\n")
    again = scan(paths[:2], random=r, pretrained=a, out=out, progress=False, plots=False)
    assert (again.done, again.skipped) == (1, 1)
    expected = transferability(r, a, paths[0]).values
    assert again.records[0].T == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name, content, message", [
    ("config.json", b"{not json", "config.json: corrupt"),
    ("config.json", b"[1, 2]", "config.json: corrupt"),
    ("config.json", b"\xff\xfe", "config.json: corrupt"),
    ("journal.rank0.jsonl", b'{"path": 3}\n', r"journal.rank0.jsonl: line 1 is not a scan"),
    ("journal.rank0.jsonl", b"[1, 2]\n", r"journal.rank0.jsonl: line 1 is not a scan"),
    ("journal.rank0.jsonl", b"\xff\xfe\n", r"journal.rank0.jsonl: line 1 is not UTF-8"),
    ("journal.rank0.jsonl", b"{half\n", r"journal.rank0.jsonl: line 1 is not a scan"),
])
def test_corrupt_run_folder_files_are_named(ckpts, tmp_path, name, content, message):
    r, a, paths = ckpts
    out = tmp_path / "run"
    scan(paths[:1], random=r, pretrained=a, out=out, progress=False, plots=False)
    (out / name).write_bytes(content)
    with pytest.raises(TransferFastError, match=message):
        scan(paths[:1], random=r, pretrained=a, out=out, progress=False, plots=False)


def test_outputs_never_overwrite_inputs(ckpts, tmp_path):
    r, a, paths = ckpts
    out = tmp_path / "run"
    out.mkdir()
    manifest = out / "summary.csv"  # the manifest where the scan writes its summary
    manifest.write_text("path\n" + "\n".join(map(str, paths)) + "\n")
    with pytest.raises(TransferFastError, match="summary.csv: refusing to overwrite an input"):
        scan(manifest=manifest, random=r, pretrained=a, out=out, progress=False)
    assert manifest.read_text().startswith("path\n")


def test_every_tensor_left_out_is_listed(ckpts, tmp_path):
    r, a, paths = ckpts
    b = {**state(1), "counter": torch.tensor([3]), "head.weight": torch.randn(5, 32),
         "head.bias": torch.randn(5)}
    save_file(b, str(tmp_path / "five.safetensors"))
    res = scan([tmp_path / "five.safetensors"], random=r, pretrained=a, out=tmp_path / "run",
               progress=False, plots=False)
    left_out = {row["tensor"]: row["reason"] for row in read(tmp_path / "run" / "excluded.csv")}
    assert "head.weight" in left_out and "classifier" in left_out["head.weight"]
    assert res.records[0].excluded == left_out
    assert read(res.summary_csv)[0]["excluded"] == str(len(left_out))


# -- sizes ---------------------------------------------------------------------------------

def test_huge_label_in_an_npz_is_refused_before_a_class_list_is_built(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((2, 1, 4, 4), np.uint8), y=np.array([0, 10**12]))
    with pytest.raises(TransferFastError, match=f"big.npz: .*{MAX_CLASSES}"):
        load_dataset(path)


def test_npz_declaring_a_huge_array_is_refused_before_numpy_allocates(tmp_path):
    path = tmp_path / "bomb.npz"
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**7, 3, 1024, 1024)}
    x, y = io.BytesIO(), io.BytesIO()
    np.lib.format.write_array_header_1_0(x, header)
    np.save(y, np.zeros(10**7, np.int64)[:1])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:  # a few bytes on disk
        z.writestr("x.npy", x.getvalue() + b"\0" * 64)
        z.writestr("y.npy", y.getvalue())
    with pytest.raises(TransferFastError, match="bomb.npz: array x of shape"):
        load_dataset(path)


def config(**experiment):
    cfg = tomllib.loads(DEMO_CONFIG)
    cfg["experiment"].update(experiment)
    return cfg


def test_blur_strength_out_of_range_is_refused(tmp_path):
    cfg = config()
    cfg["task"][3]["strength"] = 1e9
    with pytest.raises(TransferFastError, match=r"task\[3\].strength: at most 64 for shift "
                                                r"'blur', got 1e\+09"):
        parse_config(cfg)
    for bad in (float("inf"), float("nan")):
        cfg["task"][3]["strength"] = bad
        with pytest.raises(TransferFastError, match=r"task\[3\].strength"):
            parse_config(cfg)
    with pytest.raises(TransferFastError, match="blur strength must be in"):
        apply_shift(torch.zeros(1, 1, 8, 8), "blur", 1e9)


def test_a_grid_of_millions_of_runs_is_refused_unless_allowed():
    cfg = config(seeds=list(range(350)), data_amounts=list(range(1, 801)))
    with pytest.raises(TransferFastError, match=r"1,400,000 fine-tuning runs.*"
                                                r"allow_large=True \(CLI: --allow-large\)"):
        parse_config(cfg)
    allowed = parse_config(cfg, allow_large=True)
    assert config_cost(allowed).runs == 1_400_000 > MAX_RUNS
    assert config_cost(parse_config(config())).runs == 40


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/b", "..", ".", "", "a\\b", "x\n"])
def test_experiment_names_that_leave_the_output_root_are_refused(name):
    with pytest.raises(TransferFastError, match="experiment.name"):
        parse_config(config(name=name))


def test_arch_that_imports_code_needs_allow_code():
    cfg = config()
    cfg["model"]["arch"] = "os:system"
    with pytest.raises(TransferFastError, match=r"model.arch: 'os:system' would import and run "
                                                r"code.*allow_code=True \(CLI: --allow-code\)"):
        parse_config(cfg)
    assert parse_config(cfg, allow_code=True)["model"]["arch"] == "os:system"
    cfg["model"]["arch"] = "resnet9000"
    with pytest.raises(TransferFastError, match="unknown architecture 'resnet9000'"):
        parse_config(cfg)


def test_oversized_config_file_is_refused(tmp_path):
    from transfer_fast.pipelines.experiment_config import MAX_CONFIG_BYTES, load_config

    path = tmp_path / "huge.toml"
    path.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(TransferFastError, match="huge.toml: .*a config is at most"):
        load_config(path)


# -- messages and the toolchain ------------------------------------------------------------

class _System:
    def __reduce__(self):
        return (os.system, ("true",))


def test_unsafe_pickle_refusal_is_one_plain_sentence(tmp_path):
    path = tmp_path / "θA.pt"
    torch.save({"w": torch.ones(1), "x": _System()}, path)
    with pytest.raises(Exception) as info:
        torch.load(path, weights_only=True)
    message = unsafe_pickle_message(path, info.value)
    assert message == f"{path}: refused: loading it would run code (os.system)"


def test_exceptions_work_reports_a_crash_as_such(monkeypatch):
    from transfer_fast.ops import _library

    if not _library.loaded:
        pytest.skip("no compiled library")
    _library.exceptions_work.cache_clear()
    assert _library.exceptions_work() == (True, "C++ errors arrive as Python exceptions")
    _library.exceptions_work.cache_clear()
    monkeypatch.setattr(_library, "_PROBE", f"import os; os.kill(os.getpid(), {signal.SIGSEGV})")
    ok, why = _library.exceptions_work()
    _library.exceptions_work.cache_clear()
    assert not ok and "SIGSEGV" in why and "CXX=g++" in why


def test_a_fifo_is_refused_not_waited_on(ckpts, tmp_path):
    r, a, paths = ckpts
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(TransferFastError, match="pipe.safetensors: not a regular file"):
        StreamedCheckpoint(fifo)
    with pytest.raises(TransferFastError, match="not regular files.*pipe.safetensors"):
        scan([fifo], random=r, pretrained=a, out=tmp_path / "run", progress=False)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_read_many_of_a_file_truncated_under_it_raises_naming_it(tmp_path, suffix):
    path = tmp_path / f"b{suffix}"
    torch.save(state(2), path) if suffix == ".pt" else save_file(state(2), str(path))
    with StreamedCheckpoint(path) as ck:
        names = list(ck.shapes)[::-1]  # out of file order: sorted into runs by the reader
        bufs = [torch.empty(ck.meta(n).numel() * 4, dtype=torch.uint8) for n in names]
        ck.read_many([(n, 0, ck.meta(n).numel(), b) for n, b in zip(names, bufs)])
        for n, b in zip(names, bufs):
            assert torch.equal(b.view(torch.float32).view(ck.meta(n).shape), state(2)[n])
        os.truncate(path, path.stat().st_size // 3)
        with pytest.raises(TransferFastError, match=f"b{suffix}: file shorter"):
            ck.read_many([(n, 0, ck.meta(n).numel(), b) for n, b in zip(names, bufs)])


def test_a_torch_file_laid_out_like_a_cached_one_is_still_checked(tmp_path):
    good, other = tmp_path / "good.pt", tmp_path / "other.pt"
    torch.save(state(2), good)
    torch.save(state(3), other)  # the same pickle: its layout comes from the cache
    with StreamedCheckpoint(good) as ck:
        first = {n: ck.load(n) for n in ck.shapes}
    with StreamedCheckpoint(other) as ck:
        assert all(torch.equal(ck.load(n), state(3)[n]) for n in ck.shapes)
        assert all(torch.equal(first[n], state(2)[n]) for n in first)
    # A record renamed (in its local header and the central directory): the pickle is
    # unchanged, so the cached layout names a record the file no longer has.
    other.write_bytes(other.read_bytes().replace(b"other/data/1", b"other/data/9"))
    with pytest.raises(TransferFastError, match="other.pt: tensor .* lies outside"):
        StreamedCheckpoint(other)
