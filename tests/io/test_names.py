"""Names: numeric-aware order, wrapper prefixes, lining up prefixes across the sets."""

import pytest
import torch

from transfer_fast import TransferFastError, load_state, make_plan, testing, transferability
from transfer_fast.io.names import (
    align_prefixes,
    align_states,
    common_prefix,
    natural_key,
    strip_wrappers,
    wrapper_prefix,
)


def test_natural_key_orders_numbers_as_numbers():
    names = ["features.10.weight", "features.9.weight", "features.1.weight", "fc.weight"]
    assert sorted(names, key=natural_key) == ["fc.weight", "features.1.weight",
                                              "features.9.weight", "features.10.weight"]


def test_wrappers_are_stripped_only_when_every_name_has_them():
    assert wrapper_prefix(["module._orig_mod.a.w", "module._orig_mod.b"]) == "module._orig_mod."
    assert wrapper_prefix(["_orig_mod.a", "b"]) == ""
    assert list(strip_wrappers({"_orig_mod.a": 1, "_orig_mod.b.c": 2})) == ["a", "b.c"]
    assert common_prefix(["model.a.w", "model.b.w"]) == "model."
    assert common_prefix(["model.a.w", "lm_head.weight"]) == ""
    assert common_prefix(["a.b", "a.b.c"]) == "a."  # never a whole name


@pytest.mark.parametrize("prefixes", [("", "", "bert."), ("bert.", "bert.", ""),
                                      ("", "model.", ""), ("base_model.model.", "", "")])
def test_differing_base_model_prefixes_line_up(prefixes):
    body = ["embeddings.word.weight", "encoder.layer.0.dense.weight",
            "encoder.layer.1.dense.weight", "pooler.dense.weight"]
    sets = [[p + n for n in body] for p in prefixes]
    sets[2].append("classifier.weight")  # the task model's head has no prefix
    assert align_prefixes(sets) == list(prefixes)


def test_names_that_agree_are_left_alone():
    names = ["model.a.weight", "model.b.weight"]
    assert align_prefixes([names, names, [*names, "adapter.weight"]]) == ["", "", ""]


def test_names_that_cannot_line_up_name_the_prefixes_of_each_set():
    with pytest.raises(TransferFastError, match=r"do not line up.*random: 'encoder\.' \(2\).*"
                                                r"finetuned: 'decoder\.' \(2\)"):
        align_prefixes([["encoder.a.w", "encoder.b.w"]] * 2 + [["decoder.x.w", "decoder.y.w"]],
                       ["random", "pretrained", "finetuned"])


def test_bert_base_model_against_a_task_model_with_a_bert_prefix():
    base = testing.bert_shapes(num_labels=None, prefix="")
    task = testing.bert_shapes(num_labels=3, prefix="bert.")
    r, a = testing.random_state(base, 0), testing.random_state(base, 1)
    b = {k: v + 0.1 for k, v in testing.random_state(task, 2).items()}
    got = transferability(r, a, b)
    assert got.groups == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]
    assert got.excluded["classifier.weight"] == "classifier missing from a set"
    assert got.classifier is None and len(got.values) == 4


def test_plan_of_misaligned_sets_names_the_prefixes():
    base = testing.random_state(testing.bert_shapes(num_labels=None, prefix=""))
    task = {f"bert.{k}": v for k, v in base.items()}
    with pytest.raises(TransferFastError, match=r"lacks .*names start with: .*'bert\.'"):
        make_plan([base, base, task], labels=["random", "pretrained", "finetuned"])
    aligned = align_states([base, base, task])
    assert make_plan(aligned).names == make_plan([base] * 3).names


def test_orig_mod_in_one_file_only(tmp_path):
    r, a, b = testing.triple(testing.resnet_shapes(18))
    torch.save({f"_orig_mod.{k}": v for k, v in b.items()}, tmp_path / "b.pt")
    assert list(load_state(tmp_path / "b.pt")) == list(b)
    assert transferability(r, a, tmp_path / "b.pt").values == transferability(r, a, b).values


def test_llama_causal_lm_against_a_base_model_without_model_prefix():
    base = testing.random_state(testing.llama_shapes(lm_head=False, prefix=""))
    r, a = base, {k: v + 1.0 for k, v in base.items()}
    b = {f"model.{k}": v + 1.1 for k, v in base.items()}
    b["lm_head.weight"] = torch.zeros(32, 16)
    got = transferability(r, a, b)
    assert got.groups == ["embeddings", "layers.0", "layers.1", "norm"]
    assert "lm_head.weight" in got.excluded
