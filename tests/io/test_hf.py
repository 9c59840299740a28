"""Hugging Face folders and index files, read shard by shard, with every size bounded."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from transfer_fast import (
    TransferFastError,
    load_state,
    make_plan,
    testing,
    transferability,
    transferability_from_states,
)
from transfer_fast.io import hf
from transfer_fast.io.checkpoints import open_checkpoint
from transfer_fast.io.names import natural_key


@pytest.fixture(scope="module")
def llama():
    return testing.random_state(testing.llama_shapes(layers=3))


def _same(x, y):
    return list(x) == list(y) and all(torch.equal(x[k], y[k]) for k in x)


def _same_set(x, y):
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shards", [1, 3])
def test_folder_and_index_load_like_the_state(tmp_path, llama, fmt, shards):
    folder = testing.save_hf_folder(llama, tmp_path / "m", shards=shards, fmt=fmt)
    got = load_state(folder)
    assert set(got) == set(llama) and all(torch.equal(got[k], llama[k]) for k in llama)
    if fmt == "safetensors" or shards > 1:  # stored sorted or spread over shards
        assert list(got) == sorted(llama, key=natural_key)
    if shards > 1:
        assert _same(load_state(next(folder.glob("*.index.json"))), got)


def test_folder_prefers_safetensors_and_explains_what_it_lacks(tmp_path, llama):
    testing.save_hf_folder(llama, tmp_path / "m", shards=2, fmt="bin")
    testing.save_hf_folder({k: v + 1 for k, v in llama.items()}, tmp_path / "m", shards=1)
    assert (tmp_path / "m" / "pytorch_model.bin.index.json").exists()
    got = load_state(tmp_path / "m")
    assert torch.equal(got["lm_head.weight"], llama["lm_head.weight"] + 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransferFastError, match="empty: no checkpoint in the folder"):
        load_state(tmp_path / "empty")
    for name in ("a.pt", "b.pt"):
        torch.save(llama, tmp_path / "empty" / name)
    with pytest.raises(TransferFastError, match="several checkpoints.*'a.pt', 'b.pt'"):
        load_state(tmp_path / "empty")


def test_open_checkpoint_lists_then_loads_one_shard_at_a_time(tmp_path, llama):
    folder = testing.save_hf_folder({f"module.{k}": v for k, v in llama.items()},
                                    tmp_path / "m", shards=3)
    ck = open_checkpoint(folder)
    assert set(ck.names) == set(llama) and len(ck.files) == 3
    assert ck.shapes["lm_head.weight"] == (32, 16)
    assert ck.dtypes["model.norm.weight"] == torch.float32
    assert ck.meta()["model.norm.weight"].device.type == "meta"
    wanted = ["model.norm.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    parts = list(ck.iter_shards(wanted))
    assert sum(len(p) for p in parts) == 3 and all(len({ck._file[n] for n in p}) == 1
                                                   for p in parts)
    assert _same(ck.load(wanted), {n: llama[n] for n in wanted})
    with pytest.raises(TransferFastError, match="no tensor named 'nope'"):
        ck.load(["nope"])


def test_bin_shards_with_a_wrapper_key(tmp_path, llama):
    ema = {k: v * 2 for k, v in llama.items()}
    torch.save({"state_dict": llama, "state_dict_ema": ema}, tmp_path / "ck.pt")
    assert _same_set(open_checkpoint(tmp_path / "ck.pt", key="state_dict_ema").load(),
                     load_state(tmp_path / "ck.pt", key="state_dict_ema"))
    assert torch.equal(load_state(tmp_path / "ck.pt", key="state_dict_ema")["lm_head.weight"],
                       ema["lm_head.weight"])


def test_transferability_reads_folders_like_state_dicts(tmp_path):
    r, a, b = testing.triple(testing.llama_shapes())
    paths = [testing.save_hf_folder(s, tmp_path / n, shards=2) for n, s in zip("rab", (r, a, b))]
    assert transferability(*paths).values == transferability(r, a, b).values


def _index(tmp_path, weight_map):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": weight_map}))
    return path


def test_index_refuses_paths_missing_shards_and_lost_tensors(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    with pytest.raises(TransferFastError, match="'../s1.safetensors' is not a plain file"):
        load_state(_index(tmp_path, {"a": "../s1.safetensors"}))
    with pytest.raises(TransferFastError, match="1 shard file.*missing: 's2.safetensors'"):
        load_state(_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"}))
    with pytest.raises(TransferFastError, match="tensor.*of the index are not in their shard"):
        load_state(_index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"}))
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(TransferFastError, match="not a checkpoint index"):
        load_state(tmp_path / "model.safetensors.index.json")


def test_sizes_read_from_files_are_bounded_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}" * 8)
    with pytest.raises(TransferFastError, match="huge.safetensors: .*exceeds the 100000000"):
        load_state(path)
    path.write_bytes(struct.pack("<Q", 16) + b"[1, 2, 3]       ")
    with pytest.raises(TransferFastError, match="not a JSON object"):
        open_checkpoint(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    with pytest.raises(TransferFastError, match="tensor 'w' ends at byte 4096 of the data"):
        open_checkpoint(path)
    monkeypatch.setattr(hf, "MAX_INDEX_BYTES", 10)
    with pytest.raises(TransferFastError, match="index file of .* bytes"):
        load_state(_index(tmp_path, {"a": "x.safetensors"}))


def test_a_plan_from_listed_names_serves_the_loaded_tensors(tmp_path):
    """What a scan does: plan from names, shapes and dtypes, then read only the planned
    tensors shard by shard."""
    r, a, b = testing.triple(testing.bert_shapes())
    folder = testing.save_hf_folder(b, tmp_path / "b", shards=3)
    ck = open_checkpoint(folder)
    plan = make_plan([r, a, ck.meta()])
    assert plan.groups == make_plan([r, a, b]).groups
    assert "bert.embeddings.position_ids" in plan.excluded
    got = transferability_from_states([r, a, ck.load(plan.names)], plan)
    assert got.values == transferability(r, a, b).values


def test_per_file_keys(tmp_path):
    r, a, b = testing.triple(testing.resnet_shapes(18, width=8))
    torch.save({"state_dict": a, "state_dict_ema": b}, tmp_path / "a.pth.tar")
    got = transferability(r, tmp_path / "a.pth.tar", b, key=(None, "state_dict", None))
    assert got.values == transferability(r, a, b).values
    with pytest.raises(TransferFastError, match="one entry name or three"):
        transferability(r, a, b, key=("state_dict",))
