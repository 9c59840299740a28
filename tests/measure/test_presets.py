"""Grouping presets, auto-detection and the classifier rule."""

import json

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
from transfer_fast.measure.presets import classifier_name, detect_architecture


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


# ----- transformer and convnext presets, the classifier rule -----------------------------

def test_llama_groups_embeddings_blocks_norm_head():
    state = testing.random_state(testing.llama_shapes(layers=12))
    plan = make_plan([state] * 3)
    assert plan.groups == ("embeddings", *(f"model.layers.{i}" for i in range(12)), "norm",
                           "lm_head")
    assert plan.classifier == "lm_head" and plan.preset == "auto"
    assert plan.names[-1] == "lm_head.weight"


def test_bert_and_gpt2_groups():
    bert = testing.random_state(testing.bert_shapes(layers=3))
    plan = make_plan([bert] * 3, "transformer")
    assert plan.groups == ("embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1",
                           "bert.encoder.layer.2", "pooler", "classifier")
    assert plan.excluded == {"bert.embeddings.position_ids": "not a floating-point tensor"}
    gpt2 = testing.random_state(testing.gpt2_shapes(layers=2))
    assert make_plan([gpt2] * 3).groups == ("embeddings", "transformer.h.0", "transformer.h.1",
                                            "norm", "lm_head")


def test_convnext_layouts_group_stem_downsamples_blocks_norm_head():
    timm = testing.random_state(testing.convnext_shapes(depths=(1, 2, 1, 1)))
    plan = make_plan([timm] * 3)
    assert plan.groups == ("stem", "stages.0.blocks.0", "stages.1.downsample",
                           "stages.1.blocks.0", "stages.1.blocks.1", "stages.2.downsample",
                           "stages.2.blocks.0", "stages.3.downsample", "stages.3.blocks.0",
                           "norm", "head.fc")
    assert plan.classifier == "head.fc"
    tv = testing.random_state(testing.convnext_shapes(depths=(1, 2, 1, 1), layout="torchvision"))
    plan = make_plan([tv] * 3, "convnext")
    assert plan.groups == ("stem", "features.1.0", "features.2", "features.3.0", "features.3.1",
                           "features.4", "features.5.0", "features.6", "features.7.0", "norm",
                           "classifier.2")
    assert plan.names[plan.group_index.index(1)] == "features.1.0.layer_scale"


def _classifier(shapes):
    return classifier_name(list(shapes), shapes)


@pytest.mark.parametrize("shapes,expected", [
    (testing.resnet_shapes(18, width=8), "fc"),
    (testing.densenet121_shapes(growth=4), "classifier"),
    (testing.vit_shapes(dim=8, depth=1, tokens=2), "head"),
    (testing.convnext_shapes(), "head.fc"),
    (testing.convnext_shapes(layout="torchvision"), "classifier.2"),
    (testing.llama_shapes(), "lm_head"),
    (testing.llama_shapes(lm_head=False), None),  # tied head not saved: no classifier
    (testing.bert_shapes(num_labels=None, prefix=""), None),  # the pooler is never the head
    (testing.bert_shapes(), "classifier"),
    ({"roberta.encoder.layer.0.dense.weight": (4, 4), "classifier.dense.weight": (4, 4),
      "classifier.out_proj.weight": (2, 4)}, "classifier.out_proj"),
    ({"distilbert.transformer.layer.0.ffn.lin1.weight": (4, 4),
      "pre_classifier.weight": (4, 4), "classifier.weight": (2, 4)}, "classifier"),
    ({"layer1.0.se.fc.weight": (4, 4), "layer1.0.conv.weight": (4, 4, 3, 3)}, None),
    ({"features.0.weight": (4, 3, 3, 3), "classifier.1.weight": (10, 4, 1, 1)},
     "classifier.1"),  # SqueezeNet: a 1x1 convolution
    ({"fc1.weight": (8, 4), "fc2.weight": (8, 8), "fc10.weight": (3, 8)}, "fc10"),
    ({"0.weight": (4, 3, 3, 3), "2.weight": (8, 4), "4.weight": (5, 8)}, "4"),
], ids=lambda x: "" if isinstance(x, dict) else str(x))
def test_one_classifier_rule_from_names_and_shapes(shapes, expected):
    assert _classifier(shapes) == expected
    assert _classifier(dict(reversed(list(shapes.items())))) == expected  # order-free


def test_auto_picks_the_layout_from_the_names():
    for shapes, arch in ((testing.llama_shapes(), "transformer"),
                         (testing.bert_shapes(), "transformer"),
                         (testing.gpt2_shapes(), "transformer"),
                         (testing.convnext_shapes(), "convnext"),
                         (testing.convnext_shapes(layout="torchvision"), "convnext"),
                         (testing.vit_shapes(dim=8, depth=1, tokens=2), "vit"),
                         (testing.resnet_shapes(18, width=8), "resnet")):
        assert detect_architecture(list(shapes)) == arch


# ----- custom groups and the classifier option ---------------------------------------------

def test_custom_groups_from_toml_json_or_a_list(tmp_path):
    state = testing.random_state(testing.llama_shapes(layers=4))
    (tmp_path / "g.toml").write_text(
        'classifier = "head"\n'
        '[[group]]\nname = "attention \\\\1"\npattern = \'layers\\.(\\d+)\\.self_attn\\.\'\n'
        '[[group]]\nname = "mlp"\npattern = \'\\.mlp\\.\'\n'
        '[[group]]\nname = "head"\npattern = \'^lm_head\\.\'\n')
    (tmp_path / "g.json").write_text(json.dumps({"classifier": "head", "groups": [
        {"name": r"attention \1", "pattern": r"layers\.(\d+)\.self_attn\."},
        {"name": "mlp", "pattern": r"\.mlp\."}, {"name": "head", "pattern": r"^lm_head\."}]}))
    rules = [(r"attention \1", r"layers\.(\d+)\.self_attn\."), ("mlp", r"\.mlp\."),
             ("head", r"^lm_head\.")]
    plans = [make_plan([state] * 3, groups=tmp_path / "g.toml"),
             make_plan([state] * 3, groups=str(tmp_path / "g.json")),
             make_plan([state] * 3, groups=rules, classifier="head")]
    for plan in plans:
        assert plan.groups == ("attention 0", "attention 1", "attention 2", "attention 3", "mlp",
                               "head")
        assert plan.classifier == "head" and plan.preset == "custom"
        assert plan.excluded["model.norm.weight"] == "matches no group pattern"
        assert "model.layers.0.input_layernorm.weight" in plan.excluded
    # without a classifier named, the group holding the rule's head module is the classifier
    assert make_plan([state] * 3, groups=rules).classifier == "head"


@pytest.mark.parametrize("content,match", [
    ('[{"name": "a"}]', "group 1 needs a 'name' and a 'pattern'"),
    ('[{"name": "a", "pattern": "("}]', "group 'a': bad pattern"),
    ("[]", "expected a non-empty list"),
    ("{not json", "unreadable groups file"),
])
def test_bad_groups_files_are_named(tmp_path, content, match):
    (tmp_path / "g.json").write_text(content)
    state = testing.random_state(testing.llama_shapes())
    with pytest.raises(TransferFastError, match=f"g.json: {match}"):
        make_plan([state] * 3, groups=tmp_path / "g.json")


def test_classifier_option_names_a_group_or_a_module():
    state = testing.random_state(testing.llama_shapes(layers=2))
    by_group = make_plan([state] * 3, classifier="norm")
    assert by_group.classifier == "norm" and "lm_head" in by_group.groups
    by_module = make_plan([state] * 3, classifier="model.layers.1.mlp")
    assert by_module.groups[-1] == "model.layers.1.mlp" == by_module.classifier
    assert "model.layers.1" in by_module.groups  # the rest of the block stays a group
    with pytest.raises(TransferFastError, match="classifier 'nope' is neither a group"):
        make_plan([state] * 3, classifier="nope")


# ----- sets that differ: extras in θB, tied heads -------------------------------------------

def test_extra_tensor_in_finetuned_is_left_out_unless_strict():
    r, a, b = testing.triple(testing.llama_shapes())
    b = {**b, "model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 16)}
    got = transferability(r, a, b)
    assert "only in the last set" in got.excluded["model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert got.values == transferability(r, a, {k: v for k, v in b.items()
                                                if "lora" not in k}).values
    with pytest.raises(TransferFastError, match="random lacks 1 tensor.*lora_A"):
        transferability(r, a, b, strict=True)


def test_another_network_as_finetuned_still_fails():
    r, a, _ = testing.triple(testing.resnet_shapes(18, width=8))
    other = testing.random_state(testing.resnet_shapes(34, width=8))
    with pytest.raises(TransferFastError, match=r"random lacks .*layer1\.2\.conv1\.weight"):
        transferability(r, a, other)


def test_tied_lm_head_is_left_out_like_an_unsaved_one():
    r, a, b = (testing.random_state(testing.llama_shapes(), seed) for seed in range(3))
    tied = [{**s, "lm_head.weight": s["model.embed_tokens.weight"]} for s in (r, a, b)]
    untied = [{k: v for k, v in s.items() if k != "lm_head.weight"} for s in (r, a, b)]
    plan_tied, plan_untied = make_plan(tied), make_plan(untied)
    assert plan_tied.excluded["lm_head.weight"] == ("tied to model.embed_tokens.weight "
                                                    "(the same tensor)")
    assert plan_tied.names == plan_untied.names and plan_tied.groups == plan_untied.groups
    assert plan_tied.classifier is None is plan_untied.classifier


# ----- plan once ---------------------------------------------------------------------------

def test_plans_are_cached_per_names_shapes_and_options():
    r, a, b = testing.triple(testing.resnet_shapes(18, width=8))
    plan = make_plan([r, a, b])
    assert make_plan([dict(r), dict(a), dict(b)]) is plan  # new dicts, same names and shapes
    assert make_plan([r, a, b], "generic") is not plan
    assert make_plan([r, a, b], strict=True) is not plan
    b2 = {**b, "fc.weight": torch.zeros(3, 64), "fc.bias": torch.zeros(3)}
    assert make_plan([r, a, b2]) is not plan and "fc.weight" in make_plan([r, a, b2]).excluded
    assert transferability_from_states([r, a, b]).values == transferability(r, a, b).values


def test_many_one_tensor_modules_plan_in_numeric_order():
    count = 3000
    state = {f"blocks_{i}.weight": torch.zeros(2) for i in reversed(range(count))}
    plan = make_plan([state] * 3)
    assert plan.groups == tuple(f"blocks_{i}" for i in range(count))
    assert plan.group_index == tuple(range(count)) and plan.classifier is None


@pytest.mark.parametrize("shapes,presets", [
    (testing.resnet_shapes(50, width=8), ("auto", "paper", "resnet", "generic")),
    (testing.densenet121_shapes(growth=4), ("auto", "paper", "densenet", "generic")),
    (testing.vit_shapes(dim=8, depth=2, tokens=2), ("auto", "vit", "generic")),
], ids=["resnet", "densenet", "vit"])
def test_known_layouts_keep_their_module_order(shapes, presets):
    """Tensors in torchvision/timm registration order, whatever order the file had: the
    numbers of module-ordered state dicts stay bitwise what they were."""
    state = testing.random_state(shapes)
    shuffled = dict(sorted(state.items(), key=lambda kv: kv[0][::-1]))  # any other order
    for preset in presets:
        plan = make_plan([shuffled] * 3, preset)
        assert list(plan.names) == [n for n in state if n in set(plan.names)], preset
