"""Grouping presets, auto-detection and the classifier rule."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from transfer_fast import (
    TransferFastError,
    load_state,
    make_plan,
    testing,
    transferability,
    transferability_from_states,
)


@pytest.mark.parametrize("depth,blocks", [(18, 8), (34, 16), (50, 16), (101, 33), (152, 50)])
def test_resnet_groups_are_stem_blocks_classifier(depth, blocks):
    state = testing.random_state(testing.resnet_shapes(depth))
    plan = make_plan([state, state, state])
    assert plan.groups[0] == "stem" and plan.groups[-1] == "fc" and plan.classifier == "fc"
    assert len(plan.groups) == blocks + 2
    assert not any("running" in n or "num_batches" in n for n in plan.names)
    assert "layer1.0.downsample.0.weight" in plan.names or depth < 50  # all parameters


def test_densenet121_has_the_papers_63_points():
    state = testing.random_state(testing.densenet121_shapes())
    plan = make_plan([state] * 3, "paper")
    assert len(plan.groups) == 63
    assert plan.groups[:2] == ("stem", "denseblock1.denselayer1")
    assert plan.groups.index("transition1") == 7  # after the six layers of block 1
    assert plan.names[-1] == "classifier.weight" and "features.norm5.weight" not in plan.names


def test_prefixed_names_keep_the_architecture_and_the_paper_preset():
    state = testing.random_state(testing.resnet_shapes(50))
    for prefix in ("model.", "_orig_mod.", "backbone.encoder."):
        prefixed = {prefix + k: v for k, v in state.items()}
        plan = make_plan([prefixed] * 3, "paper")
        assert len(plan.groups) == 18 and plan.groups[:2] == ("stem", "layer1.0")
        assert plan.classifier == "fc" and plan.names[0] == prefix + "conv1.weight"


def test_paper_preset_refuses_a_network_it_does_not_know():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TransferFastError, match="preset 'paper'.*generic"):
        make_plan([net.state_dict()] * 3, "paper")


def test_sparse_tensor_is_named():
    state = {"conv1.weight": torch.eye(3).to_sparse(), "fc.weight": torch.ones(2, 2)}
    with pytest.raises(TransferFastError, match="'conv1.weight' is torch.sparse_coo"):
        make_plan([state] * 3)


def test_vit_groups_patch_embedding_blocks_head():
    state = testing.random_state(testing.vit_shapes(dim=32, depth=4, tokens=5))
    plan = make_plan([state] * 3)
    assert plan.groups == ("patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "norm",
                           "head")
    assert plan.classifier == "head" and "norm.weight" not in [
        n for n, g in zip(plan.names, plan.group_index) if plan.groups[g] == "head"]
    with pytest.raises(TransferFastError, match="preset 'vit'"):
        make_plan([state] * 3, "paper")


def test_generic_grouping_by_module_for_any_network():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.Flatten(),
                        nn.Linear(8, 5))
    plan = make_plan([net.state_dict()] * 3)
    assert plan.groups == ("0", "2", "4") and plan.classifier == "4"


def test_safetensors_files_come_back_in_network_order(tmp_path):
    state = testing.random_state(testing.resnet_shapes(18))
    save_file({k: v for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    loaded = load_state(tmp_path / "m.safetensors")
    plan = make_plan([loaded] * 3)
    assert plan.groups[:4] == ("stem", "layer1.0", "layer1.1", "layer2.0")
    assert plan.groups[-1] == "fc"


def test_renamed_or_reshaped_body_tensor_is_named_in_the_error():
    r, a, b = testing.triple(testing.resnet_shapes(18))
    b_missing = {k: v for k, v in b.items() if k != "layer2.1.conv1.weight"}
    with pytest.raises(TransferFastError, match=r"finetuned lacks 1 tensor.*layer2\.1\.conv1"):
        transferability(r, a, b_missing)
    b_shape = {**b, "layer3.0.conv2.weight": torch.zeros(3, 3)}
    with pytest.raises(TransferFastError, match=r"layer3\.0\.conv2\.weight.*\(3, 3\)"):
        transferability(r, a, b_shape)


def test_a_reused_plan_is_checked_against_new_states():
    r, a, b = testing.triple(testing.resnet_shapes(18))
    plan = make_plan([r, a, b])
    reshaped = {**b, "layer1.0.conv1.weight": b["layer1.0.conv1.weight"].reshape(64, -1)}
    with pytest.raises(TransferFastError, match=r"layer1\.0\.conv1\.weight"):
        transferability_from_states([r, a, reshaped], plan)


def test_unknown_preset_is_refused():
    state = testing.random_state(testing.resnet_shapes(18))
    with pytest.raises(TransferFastError, match="unknown preset"):
        make_plan([state] * 3, "alexnet")
