"""Scans over Hugging Face folders and index files: shard by shard, prefixes lined up, the
planning options recorded, a shard cut short under the scan a failed row."""

import csv
import json
import os
import re
import shutil

import pytest
import torch

from transfer_fast import TransferFastError, testing, transferability
from transfer_fast.pipelines import scan as scan_module
from transfer_fast.pipelines.scan import scan

# BertModel names for θr and θA; BertForSequenceClassification ('bert.' + a new 3-way
# classifier) for the fine-tuned sets, as a task model saved by save_pretrained.
BASE = testing.bert_shapes(layers=3, dim=24, hidden=40, num_labels=None, prefix="")
GROUPS = [("embeddings", r"^embeddings\."), (r"layer \1", r"^encoder\.layer\.(\d+)\."),
          ("pooler", r"^pooler\."), ("classifier", r"^classifier\.")]


def task_model(base: dict, seed: int) -> dict:
    state = {f"bert.{n}": t for n, t in base.items()}
    state.update(testing.random_state({"classifier.weight": (3, 24), "classifier.bias": (3,)},
                                      seed=seed))
    return state


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """θr as 2 safetensors shards, θA as 2 .bin shards, fine-tuned sets as 3 safetensors
    shards, 3 .bin shards, one file in a folder, and an index file named directly."""
    root = tmp_path_factory.mktemp("hf")
    r, a, _ = testing.triple(BASE, seed=0)
    testing.save_hf_folder(r, root / "random", shards=2)
    testing.save_hf_folder(a, root / "pretrained", shards=2, fmt="bin")
    states, paths = [], []
    for i, (shards, fmt) in enumerate([(3, "safetensors"), (3, "bin"), (1, "safetensors"),
                                       (2, "safetensors")]):
        _, _, b = testing.triple(BASE, seed=10 * i)
        b = {n: (t + 0.3 * a[n] if t.is_floating_point() else t) for n, t in b.items()}
        state = task_model(b, seed=i)
        folder = testing.save_hf_folder(state, root / f"task{i}", shards=shards, fmt=fmt)
        states.append(state)
        paths.append(folder / "model.safetensors.index.json" if i == 3 else folder)
    return root / "random", root / "pretrained", paths, (r, a, states)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def float64_T(r: dict, a: dict, b: dict) -> list[float]:
    """T per group of GROUPS, in float64: per tensor mean |x - b|, the mean over a group's
    tensors, D(θr, θB) / D(θA, θB); the classifier only θB has is left out."""
    b = {n.removeprefix("bert."): t for n, t in b.items()}
    groups: dict[str, list[str]] = {}
    for name, t in r.items():
        if not t.is_floating_point():
            continue
        for label, pattern in GROUPS:
            if m := re.search(pattern, name):
                groups.setdefault(m.expand(label), []).append(name)
                break

    def d(x, names):
        return sum(float((x[n].double() - b[n].double()).abs().mean()) for n in names) / len(names)

    return [d(r, names) / d(a, names) for names in groups.values()]


def test_hf_folders_give_the_numbers_of_transferability_and_of_float64(sets, tmp_path):
    random, pretrained, paths, (r, a, states) = sets
    res = scan(paths, random=random, pretrained=pretrained, out=tmp_path / "run",
               groups=GROUPS, classifier="classifier", progress=False, plots=False)
    assert (res.done, res.failed) == (len(paths), 0), [x.error for x in res.records]
    rows = read(res.results_csv)
    assert [s["path"] for s in read(res.summary_csv)] == [str(p) for p in paths]
    for path, state in zip(paths, states):
        got = [float(row["T"]) for row in rows if row["path"] == str(path)]
        expected = transferability(random, pretrained, path, groups=GROUPS,
                                   classifier="classifier")
        assert got == expected.values  # the packed kernel and the list one: bit for bit
        want = torch.tensor(float64_T(r, a, state), dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-6,
                                   atol=0)
    record = res.records[0]
    assert "classifier.weight" in record.excluded  # in the task model only
    assert record.groups[:2] == ["embeddings", "layer 0"]


def test_default_preset_lines_up_the_bert_prefix(sets, tmp_path):
    random, pretrained, paths, _ = sets
    res = scan(paths[:2], random=random, pretrained=pretrained, out=tmp_path / "run",
               progress=False, plots=False)
    assert (res.done, res.failed) == (2, 0), [x.error for x in res.records]
    for path, record in zip(paths, res.records):
        assert record.T == transferability(random, pretrained, path).values
        assert not any(g.startswith("bert.") for g in record.groups)


def test_llama_index_files_with_bin_shards_and_a_sharded_random(tmp_path):
    shapes = testing.llama_shapes(layers=3, dim=16, hidden=24)
    r, a, b = testing.triple(shapes, seed=3)
    testing.save_hf_folder(r, tmp_path / "r", shards=3, fmt="bin")
    testing.save_hf_folder(a, tmp_path / "a", shards=1)
    index = testing.save_hf_folder(b, tmp_path / "b", shards=2, fmt="bin") / \
        "pytorch_model.bin.index.json"
    res = scan([index], random=tmp_path / "r", pretrained=tmp_path / "a", out=tmp_path / "run",
               progress=False, plots=False)
    assert res.records[0].status == "ok", res.records[0].error
    assert res.records[0].T == transferability(tmp_path / "r", tmp_path / "a", index).values


def test_resume_skips_unchanged_folders_and_measures_a_touched_shard_again(sets, tmp_path):
    random, pretrained, paths, _ = sets
    first = scan(paths[:2], random=random, pretrained=pretrained, out=tmp_path / "run",
                 progress=False, plots=False)
    again = scan(paths[:2], random=random, pretrained=pretrained, out=tmp_path / "run",
                 progress=False, plots=False)
    assert (again.done, again.skipped) == (0, 2)
    shard = sorted(paths[1].glob("*.bin"))[0]
    os.utime(shard, ns=(1, shard.stat().st_mtime_ns + 10**9))
    third = scan(paths[:2], random=random, pretrained=pretrained, out=tmp_path / "run",
                 progress=False, plots=False)
    assert (third.done, third.skipped) == (1, 1)
    assert read(third.results_csv) == read(first.results_csv)


def test_a_shard_truncated_under_the_scan_is_a_failed_row(sets, tmp_path, monkeypatch):
    random, pretrained, paths, _ = sets
    copies = {}  # work on copies: the module's fixture stays intact
    for folder, pattern, i in ((paths[0], "*.safetensors", 1), (paths[1], "*.bin", 2)):
        copy = shutil.copytree(folder, tmp_path / folder.name)
        copies[str(copy)] = sorted(copy.glob(pattern))[i]
    opened = scan_module._open

    def open_then_truncate(path):
        ck, error = opened(path)
        if path in copies:
            os.truncate(copies[path], copies[path].stat().st_size // 2)
        return ck, error

    monkeypatch.setattr(scan_module, "_open", open_then_truncate)
    targets = [*copies, paths[2]]
    res = scan(targets, random=random, pretrained=pretrained, out=tmp_path / "run",
               progress=False, plots=False)
    summary = {s["path"]: s for s in read(res.summary_csv)}
    for folder, shard in copies.items():
        assert summary[folder]["status"] == "failed"
        assert shard.name in summary[folder]["error"]
    assert summary[str(paths[2])]["status"] == "ok"
    assert (res.done, res.failed) == (1, 2)


def test_planning_options_are_recorded_and_key_picks_the_wrapped_set(sets, tmp_path):
    random, pretrained, paths, (r, a, _) = sets
    wrapped = tmp_path / "a.pt"
    torch.save({"state_dict": r, "state_dict_ema": a}, wrapped)
    kw = dict(random=random, pretrained=wrapped, groups=GROUPS, classifier="classifier",
              key="state_dict_ema", strict=True, progress=False, plots=False)
    res = scan(paths[:1], out=tmp_path / "run", **kw)
    assert res.records[0].status == "ok", res.records[0].error
    expected = transferability(random, wrapped, paths[0], groups=GROUPS,
                               classifier="classifier", key="state_dict_ema", strict=True)
    assert res.records[0].T == expected.values
    options = res.records[0].options
    assert options["key"] == "state_dict_ema" and options["strict"] is True
    assert options["classifier"] == "classifier" and options["groups"][0] == list(GROUPS[0])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["key"] == "state_dict_ema" and config["groups"] == options["groups"]
    assert scan(paths[:1], out=tmp_path / "run", **kw).skipped == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_scan_of_folders_matches_the_cpu_scan(sets, tmp_path):
    random, pretrained, paths, _ = sets
    cpu = scan(paths, random=random, pretrained=pretrained, out=tmp_path / "cpu",
               backend="cpu", progress=False, plots=False)
    # A budget below one target (61 kB): K = 1 and each target in several parts (pinned
    # buffers, one copy and one kernel call per part).
    gpu = scan(paths, random=random, pretrained=pretrained, out=tmp_path / "gpu",
               backend="cuda", max_memory=40_000, progress=False, plots=False)
    for a, b in zip(cpu.records, gpu.records):
        assert b.status == "ok", b.error
        torch.testing.assert_close(torch.tensor(b.T), torch.tensor(a.T), rtol=1e-6, atol=0)


def test_an_index_naming_a_tensor_its_shard_lacks_fails_its_row(sets, tmp_path):
    random, pretrained, paths, _ = sets
    broken = shutil.copytree(paths[0], tmp_path / "broken")
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    index_path.write_text(json.dumps(index))
    res = scan([broken, paths[2]], random=random, pretrained=pretrained, out=tmp_path / "run",
               progress=False, plots=False)
    assert [r.status for r in res.records] == ["failed", "ok"]
    assert "not in their shard" in res.records[0].error and name in res.records[0].error


def test_an_out_folder_inside_a_model_folder_never_overwrites_its_files(sets, tmp_path):
    random, pretrained, paths, _ = sets
    model = shutil.copytree(paths[2], tmp_path / "model")
    (model / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(TransferFastError, match="config.json: refusing to overwrite"):
        scan([model], random=random, pretrained=pretrained, out=model, progress=False)
    assert (model / "config.json").read_text() == '{"model_type": "bert"}'
