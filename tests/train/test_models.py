"""Architectures by name: torchvision's exact names and shapes, and checkpoint loading."""

import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from transfer_fast.errors import TransferFastError
from transfer_fast.testing import random_state, resnet_shapes
from transfer_fast.train.models import ARCHITECTURES, build_model, load_model


def shapes_of(model: nn.Module) -> list[tuple[str, tuple]]:
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_names_shapes_and_order_match_torchvision(depth):
    model = build_model(f"resnet{depth}", 10)
    assert shapes_of(model) == list(resnet_shapes(depth, num_classes=10).items())
    with torch.no_grad():  # 16x16 still reaches layer4 (at 1x1) and keeps this cheap
        assert model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_resnet_other_channels_and_init():
    model = build_model("ResNet18", 4, in_channels=1)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    # torchvision's kaiming fan_out init: std sqrt(2 / (64 * 3 * 3)) for layer1's convs.
    w = model.layer1[0].conv1.weight
    assert abs(w.std().item() - (2 / 576) ** 0.5) < 0.005


def test_tiny_resnet():
    assert "tiny-resnet" in ARCHITECTURES
    model = build_model("tiny-resnet", 5, in_channels=3)
    assert model.conv1.weight.shape == (16, 3, 3, 3)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_unknown_and_bad_arguments():
    with pytest.raises(TransferFastError, match="unknown architecture 'vgg16'.*resnet18.*"
                                               "tiny-resnet.*package.module:function"):
        build_model("vgg16", 10)
    for bad in ({"num_classes": 0}, {"num_classes": 2, "in_channels": -1}):
        with pytest.raises(TransferFastError, match="positive integer"):
            build_model("resnet18", **bad)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_archs.py").write_text(textwrap.dedent("""
        from collections import OrderedDict

        from torch import nn

        def mlp(num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))

        def conv(num_classes, in_channels=3):
            return nn.Sequential(OrderedDict(stem=nn.Conv2d(in_channels, 4, 1),
                                             flat=nn.Flatten(), head=nn.Linear(16, num_classes)))

        def not_a_model(num_classes):
            return num_classes

        def no_classes():
            return nn.Linear(2, 2)

        WIDTH = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_archs"


def test_module_function_form(user_module):
    assert build_model(f"{user_module}:mlp", 6)[1].out_features == 6
    model = build_model(f"{user_module}:conv", 2, in_channels=1)
    assert model.stem.in_channels == 1  # passed on because the function declares it
    for arch, message in [(f"{user_module}:missing", "has no function 'missing'"),
                          (f"{user_module}:WIDTH", "has no function 'WIDTH'"),
                          (f"{user_module}:not_a_model", "returned a int"),
                          (f"{user_module}:no_classes", r"calling no_classes\(num_classes=2\)"),
                          ("no_such_pkg.sub:f", "cannot import 'no_such_pkg.sub'"),
                          (":f", "package.module:function")]:
        with pytest.raises(TransferFastError, match=message):
            build_model(arch, 2)


def test_load_model_safetensors_round_trip(tmp_path):
    state = random_state(resnet_shapes(18, num_classes=7), seed=3)
    save_file(state, str(tmp_path / "r18.safetensors"))
    model = load_model("resnet18", tmp_path / "r18.safetensors")
    assert model.fc.out_features == 7 and not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_load_model_pt_wrapped_and_inferred_channels(tmp_path):
    source = build_model("tiny-resnet", 3, in_channels=1)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
               "epoch": 9}
    torch.save(wrapped, tmp_path / "tiny.pt")
    model = load_model("tiny-resnet", str(tmp_path / "tiny.pt"))
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.eval()(x))


def test_load_model_without_batchnorm_counters(tmp_path):
    """Early torchvision checkpoints have no num_batches_tracked; torch fills it in."""
    state = {k: v for k, v in build_model("tiny-resnet", 2).state_dict().items()
             if not k.endswith("num_batches_tracked")}
    model = load_model("tiny-resnet", state)
    assert model.bn1.num_batches_tracked.item() == 0


def test_load_model_module_function(tmp_path, user_module):
    source = build_model(f"{user_module}:conv", 5, in_channels=2)
    save_file(source.state_dict(), str(tmp_path / "c.safetensors"))
    model = load_model(f"{user_module}:conv", tmp_path / "c.safetensors")
    assert model.stem.in_channels == 2 and model.head.out_features == 5


def test_load_model_mismatches_name_checkpoint_and_tensors(tmp_path):
    path = tmp_path / "r18.safetensors"
    state = random_state(resnet_shapes(18, num_classes=7))
    save_file(state, str(path))
    with pytest.raises(TransferFastError, match=r"r18.safetensors: does not fit architecture "
                       r"'resnet34': \d+ missing: 'layer1.2.conv1.weight'"):
        load_model("resnet34", path)
    with pytest.raises(TransferFastError, match=r"2 with other shapes .*'fc.weight \(7, 512\) "
                                                r"vs \(5, 512\)'"):
        load_model("resnet18", path, num_classes=5)
    with pytest.raises(TransferFastError, match=r"conv1.weight \(64, 3, 7, 7\) vs \(64, 1, 7, 7\)"):
        load_model("resnet18", path, in_channels=1)
    extra = {**state, "extra.scale": torch.ones(3)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(TransferFastError, match="1 unexpected: 'extra.scale'"):
        load_model("resnet18", tmp_path / "extra.safetensors")
    save_file({"body.weight": torch.ones(3, 3, 3, 3)}, str(tmp_path / "headless.safetensors"))
    with pytest.raises(TransferFastError, match="headless.safetensors: cannot tell the number "
                                                "of classes"):
        load_model("resnet18", tmp_path / "headless.safetensors")
    with pytest.raises(TransferFastError, match="file not found"):
        load_model("resnet18", tmp_path / "nope.pt")


def test_inference_prefers_the_least_nested_head_and_stem():
    """An SE block's 'fc' sorts after the real head in a safetensors file."""
    from transfer_fast.train.models import infer_in_channels, infer_num_classes

    state = {"fc.weight": torch.ones(9, 4), "layer4.0.se.fc.weight": torch.ones(2, 4),
             "layer1.0.conv1.weight": torch.ones(4, 8, 3, 3), "stem.weight": torch.ones(4, 1, 3, 3)}
    assert infer_num_classes(state) == 9 and infer_in_channels(state) == 1
    assert infer_num_classes({"x": torch.ones(2, 2)}) is None
