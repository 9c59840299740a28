"""load_state: formats, wrappers, and refusing what must not be loaded."""

import argparse
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from transfer_fast import TransferFastError, load_state


@pytest.fixture
def state():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_formats_and_wrappers(tmp_path, state, suffix):
    for wrapped in (state, {"state_dict": state, "epoch": 3}, {"model": state},
                    {"model_state_dict": state, "step": torch.tensor(5)},
                    {f"module.{k}": v for k, v in state.items()}):
        path = tmp_path / f"m{suffix}"
        torch.save(wrapped, path)
        loaded = load_state(path)
        assert list(loaded) == list(state)
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_legacy_non_zip_checkpoint_loads(tmp_path, state):
    path = tmp_path / "old.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state(path)["0.weight"], state["0.weight"])


def test_safetensors_module_and_mapping(tmp_path, state):
    save_file(dict(state), str(tmp_path / "m.safetensors"))
    assert torch.equal(load_state(tmp_path / "m.safetensors")["0.bias"], state["0.bias"])
    net = nn.Linear(2, 2)
    assert torch.equal(load_state(net)["weight"], net.weight)
    assert list(load_state({"x": torch.ones(2), "note": "text"})) == ["x"]


def test_missing_file(tmp_path):
    with pytest.raises(TransferFastError, match="nope.pt: file not found"):
        load_state(tmp_path / "nope.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_named(tmp_path, state, suffix):
    path = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(dict(state), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TransferFastError, match=f"m{suffix}: .*(unreadable or truncated|"
                                                 "truncated)"):
        load_state(path)


@pytest.mark.parametrize("content", [b"not a checkpoint at all\n", b"\x80\x04\x95junk" * 9],
                         ids=["text", "bad-pickle"])
def test_garbage_file_is_unreadable_not_refused(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(TransferFastError, match="junk.pt: unreadable") as info:
        load_state(path)
    assert "weights_only` set to `False" not in str(info.value)


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(TransferFastError, match="e.pt: empty file"):
        load_state(tmp_path / "e.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(TransferFastError, match="folder: no checkpoint in the folder"):
        load_state(tmp_path / "folder")


class _Payload:
    """Unpickling this would run code: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_needing_arbitrary_unpickling_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "payload": _Payload(str(marker))}, path)
    with pytest.raises(TransferFastError,
                       match=r"evil.pt: refused: loading it would run code \(io.open\)"):
        load_state(path)
    assert not marker.exists()
    plain = tmp_path / "evil_plain.pkl"
    plain.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(TransferFastError, match="refused|unreadable"):
        load_state(plain)
    assert not marker.exists()


def test_no_tensors_and_wrong_types(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, path)
    with pytest.raises(TransferFastError, match="empty.pt: holds no tensors"):
        load_state(path)
    torch.save({"net": {"w": torch.ones(1)}, "optimizer": {}}, path)
    with pytest.raises(TransferFastError, match="nested entries 'net': pick one with key='net'"):
        load_state(path)
    assert list(load_state(path, key="net")) == ["w"]
    with pytest.raises(TransferFastError, match="cannot load parameters from a int"):
        load_state(3)


def test_compile_and_data_parallel_wrappers_are_stripped(tmp_path, state):
    torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, tmp_path / "m.pt")
    assert list(load_state(tmp_path / "m.pt")) == list(state)
    assert list(load_state({f"_orig_mod.{k}": v for k, v in state.items()})) == list(state)


def _timm_training_checkpoint(state, path):
    """What timm's train.py saves: the weights, their EMA, optimizer state and the args."""
    net = nn.Linear(3, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(2, 3)).sum().backward()
    opt.step()
    ema = {k: v + 1 for k, v in state.items()}
    args = argparse.Namespace(model="convnext_tiny", lr=0.1, epochs=300, aa=None,
                              mean=(0.5, 0.5, 0.5), sched="cosine", drop_path=0.1)
    torch.save({"epoch": 299, "arch": "convnext_tiny", "state_dict": state,
                "optimizer": opt.state_dict(), "version": 2, "args": args,
                "state_dict_ema": ema, "metric": 82.1}, path)
    return ema


def test_timm_training_checkpoint_is_read_for_its_tensors(tmp_path, state):
    ema = _timm_training_checkpoint(state, tmp_path / "last.pth.tar")
    loaded = load_state(tmp_path / "last.pth.tar")
    assert list(loaded) == list(state) and torch.equal(loaded["0.weight"], state["0.weight"])
    picked = load_state(tmp_path / "last.pth.tar", key="state_dict_ema")
    assert torch.equal(picked["0.weight"], ema["0.weight"])
    with pytest.raises(TransferFastError, match=r"no state dict under key 'model_ema'; "
                                                r"entries holding one: 'state_dict', "
                                                r"'state_dict_ema'$"):
        load_state(tmp_path / "last.pth.tar", key="model_ema")


def test_a_plain_state_dict_ignores_key(tmp_path, state):
    torch.save(state, tmp_path / "plain.pt")
    assert list(load_state(tmp_path / "plain.pt", key="state_dict_ema")) == list(state)


def test_ambiguous_wrappers_list_the_candidate_keys(tmp_path, state):
    torch.save({"net": state, "net_ema": state, "step": 3}, tmp_path / "two.pt")
    with pytest.raises(TransferFastError, match="nested entries 'net', 'net_ema': pick one "
                                                "with key="):
        load_state(tmp_path / "two.pt")
    assert list(load_state(tmp_path / "two.pt", key="net_ema")) == list(state)


def test_allowed_namespace_does_not_let_other_objects_in(tmp_path, state):
    marker = tmp_path / "pwned"
    args = argparse.Namespace(lr=0.1, hook=_Payload(str(marker)))
    torch.save({"state_dict": state, "args": args}, tmp_path / "evil.pth")
    with pytest.raises(TransferFastError,
                       match=r"evil.pth: refused: loading it would run code \(io.open\)"):
        load_state(tmp_path / "evil.pth")
    assert not marker.exists()


def test_unsafe_pickle_message_is_one_plain_sentence_without_unsafe_advice(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("true",))

    path = tmp_path / "theta.pt"
    torch.save({"w": torch.ones(1), "x": Evil()}, path)
    with pytest.raises(TransferFastError) as err:
        load_state(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refused: loading it would run code")
    assert "system" in message and "weights_only=False" not in message
    assert len(message.splitlines()) == 1
