"""Many-model scans: same numbers as one-at-a-time, resumable after kill -9, sharded."""

import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from transfer_fast import TransferFastError, testing, transferability
from transfer_fast.pipelines.scan import scan

COUNT = 8


def _write_set(folder, count=COUNT, depth=18):
    shapes = testing.resnet_shapes(depth)
    r, a, _ = testing.triple(shapes)
    save_file(r, str(folder / "r.safetensors"))
    torch.save(a, folder / "a.pt")
    paths = []
    for i in range(count):
        _, _, b = testing.triple(shapes, seed=10 + i, finetuned_classes=10)
        path = folder / f"b{i}.safetensors" if i % 3 else folder / f"b{i}.pt"
        if path.suffix == ".pt":
            torch.save(b, path)
        else:
            save_file(b, str(path))
        paths.append(path)
    return folder / "r.safetensors", folder / "a.pt", paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return _write_set(tmp_path_factory.mktemp("scan"))


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_scan_equals_one_checkpoint_at_a_time(ckpts, tmp_path):
    r, a, paths = ckpts
    res = scan(paths, random=r, pretrained=a, out=tmp_path / "run", progress=False)
    assert (res.done, res.failed, res.skipped) == (COUNT, 0, 0)
    rows = read(res.results_csv)
    for path in paths:
        expected = transferability(r, a, path)
        got = [row for row in rows if row["path"] == str(path)]
        assert [row["group"] for row in got] == expected.groups
        torch.testing.assert_close(torch.tensor([float(row["T"]) for row in got]),
                                   torch.tensor(expected.values), rtol=1e-6, atol=0)
    summary = read(res.summary_csv)
    assert [s["path"] for s in summary] == [str(p) for p in paths]
    assert all(s["status"] == "ok" for s in summary)
    for name in ("T_heatmap.png", "T_curves.png"):
        assert (tmp_path / "run" / name).read_bytes()[:4] == b"\x89PNG"


def test_batch_size_does_not_change_the_numbers(ckpts, tmp_path):
    r, a, paths = ckpts
    one = scan(paths, random=r, pretrained=a, out=tmp_path / "k1", max_memory=1,
               progress=False)
    many = scan(paths, random=r, pretrained=a, out=tmp_path / "kn", progress=False)
    assert read(one.results_csv) == read(many.results_csv)


def test_manifest_columns_are_carried_and_bad_rows_fail_alone(ckpts, tmp_path):
    r, a, paths = ckpts
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(paths[1].read_bytes()[:300_000])
    other = tmp_path / "other.safetensors"
    save_file(testing.random_state(testing.resnet_shapes(34)), str(other))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,lr,seed\n" + f"{paths[1]},0.01,1\n{trunc},0.1,2\n"
                        f"{other},0.2,3\n{paths[2]},0.02,4\n")
    res = scan(manifest=manifest, random=r, pretrained=a, out=tmp_path / "run",
               progress=False)
    summary = read(res.summary_csv)
    assert [s["status"] for s in summary] == ["ok", "failed", "failed", "ok"]
    assert "truncated" in summary[1]["error"] and "lacks" in summary[2]["error"]
    results = read(res.results_csv)
    assert {row["lr"] for row in results} == {"0.01", "0.02"}
    assert list(results[0])[:4] == ["path", "lr", "seed", "group"]


def test_bad_manifest_is_reported_before_the_scan(ckpts, tmp_path):
    r, a, paths = ckpts
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{paths[0]}\n{paths[0]}\n{tmp_path / 'gone.pt'}\n")
    with pytest.raises(TransferFastError, match="duplicated paths.*do not exist.*gone.pt"):
        scan(manifest=manifest, random=r, pretrained=a, out=tmp_path / "run")
    manifest.write_text("file\nx\n")
    with pytest.raises(TransferFastError, match="no 'path' column"):
        scan(manifest=manifest, random=r, pretrained=a, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_run_folder_made_with_other_options_is_refused(ckpts, tmp_path):
    r, a, paths = ckpts
    scan(paths[:2], random=r, pretrained=a, out=tmp_path / "run", progress=False)
    with pytest.raises(TransferFastError, match="other options.*metric.*start fresh"):
        scan(paths[:2], random=r, pretrained=a, out=tmp_path / "run", metric="l2")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TransferFastError, match="cannot write the run folder"):
        scan(paths[:1], random=r, pretrained=a, out=blocker / "run")


def _cli(*args):
    return [sys.executable, "-m", "transfer_fast", "scan", *map(str, args), "--no-progress"]


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path):
    r, a, paths = _write_set(tmp_path, count=16)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli("--random", r, "--pretrained", a, "--out", run,
                                 "--max-memory", "1", *paths), stderr=subprocess.DEVNULL)
    journal = run / "journal.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the scan ended before it could be killed"
    done_before = journal.read_text().count("\n")
    assert 0 < done_before < 16
    with open(journal, "a") as f:  # and a record torn by the kill in the middle of a write
        f.write('{"key": ["half a rec')
    resumed = subprocess.run(_cli("--random", r, "--pretrained", a, "--out", run, *paths),
                             capture_output=True, text=True, check=True)
    assert re.match(rf"{16 - done_before} measured, 0 failed, {done_before} already done",
                    resumed.stdout)
    whole = scan(paths, random=r, pretrained=a, out=tmp_path / "whole", progress=False)
    assert read(run / "results.csv") == read(whole.results_csv)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(read(run / "summary.csv")) == strip(read(whole.summary_csv))


def test_torchrun_two_gloo_ranks_merge_to_the_single_process_tables(ckpts, tmp_path):
    r, a, paths = ckpts
    single = scan(paths, random=r, pretrained=a, out=tmp_path / "single", progress=False)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "transfer_fast", "scan", "--random", str(r),
                "--pretrained", str(a), "--out", str(tmp_path / "dist"), "--no-progress",
                *map(str, paths)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=300)
    (tmp_path / "torchrun.log").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "dist").glob("journal.rank*.jsonl")) == [
        "journal.rank0.jsonl", "journal.rank1.jsonl"]
    assert read(tmp_path / "dist" / "results.csv") == read(single.results_csv)
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(read(tmp_path / "dist" / "summary.csv")) == strip(read(single.summary_csv))
    assert proc.stdout.count("measured") == 1  # rank 0 reports the totals: 8 measured
    assert proc.stdout.startswith(f"{COUNT} measured")


def test_segments_split_and_pack_tensors_without_changing_the_numbers(ckpts, tmp_path,
                                                                      monkeypatch):
    import importlib

    scan_module = importlib.import_module("transfer_fast.pipelines.scan")
    r, a, paths = ckpts
    monkeypatch.setattr(scan_module, "SEGMENT_ELEMS", 1009)  # odd: pieces of many tensors
    res = scan(paths[:2], random=r, pretrained=a, out=tmp_path / "run", progress=False)
    for path in paths[:2]:
        expected = transferability(r, a, path).values
        got = [float(row["T"]) for row in read(res.results_csv) if row["path"] == str(path)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-6, atol=0)


def test_manifest_with_several_anchor_pairs_and_relative_paths(tmp_path):
    (tmp_path / "m").mkdir()
    shapes = testing.resnet_shapes(18)
    rows = []
    for pair in range(2):
        r, a, b = testing.triple(shapes, seed=100 * pair, finetuned_classes=10)
        for name, state in (("r", r), ("a", a), ("b", b)):
            save_file(state, str(tmp_path / f"{name}{pair}.safetensors"))
        rows.append(f"../b{pair}.safetensors,../r{pair}.safetensors,../a{pair}.safetensors,"
                    f"task{pair}")
    b_nan = {**b, "layer2.0.conv1.weight": b["layer2.0.conv1.weight"].clone()}
    b_nan["layer2.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    save_file(b_nan, str(tmp_path / "b_nan.safetensors"))
    (tmp_path / "bad_anchor.pt").write_text("not weights")
    save_file(b, str(tmp_path / "b_copy.safetensors"))
    rows.append("../b_nan.safetensors,../r1.safetensors,../a1.safetensors,task1")
    rows.append("../b_copy.safetensors,../r1.safetensors,../bad_anchor.pt,task9")
    manifest = tmp_path / "m" / "runs.csv"
    manifest.write_text("path,random,pretrained,dataset\n" + "\n".join(rows) + "\n")
    res = scan(manifest=manifest, out=tmp_path / "run", progress=False)
    summary = read(res.summary_csv)
    assert [s["status"] for s in summary] == ["ok", "ok", "failed", "failed"]
    assert "layer2.0.conv1.weight" in summary[2]["error"]
    assert "bad_anchor.pt" in summary[3]["error"]
    for pair in range(2):
        expected = transferability(tmp_path / f"r{pair}.safetensors",
                                   tmp_path / f"a{pair}.safetensors",
                                   tmp_path / f"b{pair}.safetensors").values
        got = [float(x["T"]) for x in read(res.results_csv) if x["dataset"] == f"task{pair}"]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-6, atol=0)


def test_data_parallel_names_in_safetensors_are_unwrapped(ckpts, tmp_path):
    r, a, paths = ckpts
    from transfer_fast import load_state

    wrapped = tmp_path / "ddp.safetensors"
    save_file({f"module.{k}": v for k, v in load_state(paths[1]).items()}, str(wrapped))
    res = scan([wrapped], random=r, pretrained=a, out=tmp_path / "run", progress=False)
    got = [float(row["T"]) for row in read(res.results_csv)]
    assert got == pytest.approx(transferability(r, a, paths[1]).values, rel=1e-6)


def test_cli_scan_pairwise_and_bad_input_exit_2(ckpts, tmp_path):
    r, a, paths = ckpts
    ok = subprocess.run(_cli("--random", r, "--pretrained", a, "--out", tmp_path / "run",
                             "--pairwise", *paths[:3]), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    pairs = read(tmp_path / "run" / "pairwise.csv")
    assert len(pairs) == 9 * len({p["group"] for p in pairs})
    assert (tmp_path / "run" / "pairwise.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(_cli("--random", r, "--pretrained", a, "--out", tmp_path / "r2",
                              paths[0], tmp_path / "nope.pt"), capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.pt" in bad.stderr and "Traceback" not in bad.stderr


def test_pairwise_table_is_written_without_the_figures(ckpts, tmp_path):
    r, a, paths = ckpts
    scan(paths[:3], random=r, pretrained=a, out=tmp_path / "run", pairwise=True, plots=False,
         progress=False)
    assert len(read(tmp_path / "run" / "pairwise.csv")) > 0
    assert not list((tmp_path / "run").glob("*.png"))


def test_reader_threads_sharing_a_target_do_not_change_the_numbers(ckpts, tmp_path,
                                                                   monkeypatch):
    import importlib

    scan_module = importlib.import_module("transfer_fast.pipelines.scan")
    r, a, paths = ckpts
    whole = scan(paths[:3], random=r, pretrained=a, out=tmp_path / "one", progress=False,
                 plots=False)
    monkeypatch.setattr(scan_module, "READ_THREADS", 4)
    size = sum(t.numel() * t.element_size() for t in torch.load(a).values())
    # K = 1 with the whole model in one part: 4 readers fill each target's row together.
    shared = scan(paths[:3], random=r, pretrained=a, out=tmp_path / "four",
                  max_memory=int(2.5 * size), progress=False, plots=False)
    assert read(shared.results_csv) == read(whole.results_csv)


def test_heads_of_other_class_counts_share_the_packed_anchors(ckpts, tmp_path):
    r, a, paths = ckpts
    shapes = testing.resnet_shapes(18)
    other = []
    for classes in (5, 7):
        _, _, b = testing.triple(shapes, seed=classes, finetuned_classes=classes)
        save_file(b, str(tmp_path / f"c{classes}.safetensors"))
        other.append(tmp_path / f"c{classes}.safetensors")
    res = scan([paths[1], *other], random=r, pretrained=a, out=tmp_path / "run",
               progress=False, plots=False)
    assert res.done == 3
    for path, record in zip([paths[1], *other], res.records):
        assert record.T == transferability(r, a, path).values
