"""Network order from names alone: .pt, .safetensors and HF folders give the same groups,
classifier and T for every preset, and T matches an independent float64 computation."""

import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

from transfer_fast import testing, transferability

GROUPS_TOML = """
classifier = "head"
[[group]]
name = "stem"
pattern = '^stem\\.'
[[group]]
name = 'stage \\1'
pattern = '^stages\\.(\\d+)\\.'
[[group]]
name = "head"
pattern = '^head\\.fc\\.'
"""

# name: (shapes, preset, options, the θB classes)
CASES = {
    "paper-resnet50": (lambda: testing.resnet_shapes(50, width=8), "paper", {}, 10),
    "resnet18": (lambda: testing.resnet_shapes(18, width=8), "resnet", {}, 10),
    "densenet121": (lambda: testing.densenet121_shapes(growth=4), "densenet", {}, None),
    "vit": (lambda: testing.vit_shapes(dim=16, depth=3, tokens=5), "vit", {}, 10),
    "generic-resnet": (lambda: testing.resnet_shapes(18, width=8), "generic", {}, None),
    "llama": (lambda: testing.llama_shapes(layers=3), "transformer", {}, None),
    "bert": (lambda: testing.bert_shapes(layers=2), "auto", {}, None),
    "gpt2-tied": (lambda: testing.gpt2_shapes(layers=2), "transformer", {}, None),
    "convnext-timm": (lambda: testing.convnext_shapes(), "convnext", {}, 5),
    "convnext-tv": (lambda: testing.convnext_shapes(layout="torchvision"), "auto", {}, 5),
    "custom-groups": (lambda: testing.convnext_shapes(), "auto", {"groups": "toml"}, None),
}
FORMATS = ("memory", "pt", "safetensors", "hf-safetensors", "hf-bin")


def _tie(state):
    """GPT-2 ties lm_head to wte: one tensor under two names in a module's state dict."""
    if "lm_head.weight" in state:
        state = dict(state)
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _save(state, fmt, path):
    if fmt == "memory":
        return state
    if fmt == "pt":
        torch.save(state, path.with_suffix(".pt"))  # keeps the tie, as torch.save does
        return path.with_suffix(".pt")
    # safetensors refuses shared tensors; save_pretrained drops the tied copy, so do we
    untied = {k: v for k, v in state.items()
              if not (k == "lm_head.weight" and v is state.get("transformer.wte.weight"))}
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in untied.items()}, str(path) + ".safetensors")
        return str(path) + ".safetensors"
    return testing.save_hf_folder(untied, path, shards=3, fmt=fmt.removeprefix("hf-"))


def _float64_t(r, a, b, members, classifier):
    """T per group from scratch: float64 mean |p - q| per tensor, group means, ratio."""
    values = {}
    for group, names in members.items():
        d_r = sum((r[n].double() - b[n].double()).abs().mean().item() for n in names)
        d_a = sum((a[n].double() - b[n].double()).abs().mean().item() for n in names)
        values[group] = d_r / d_a
    body = [v for g, v in values.items() if g != classifier]
    return values, sum(body) / len(body)


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_gives_the_same_groups_classifier_and_t(case, tmp_path):
    shapes, preset, options, classes = CASES[case]
    r, a, b = testing.triple(shapes(), finetuned_classes=classes)
    if case == "gpt2-tied":
        r, a, b = _tie(r), _tie(a), _tie(b)
    if options.get("groups") == "toml":
        (tmp_path / "groups.toml").write_text(GROUPS_TOML)
        options = {"groups": tmp_path / "groups.toml"}
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for fmt in FORMATS:
            paths = [_save(s, fmt, tmp_path / f"{fmt}-{role}") for role, s in zip("rab", (r, a, b))]
            results[fmt] = transferability(*paths, preset=preset, backend="cpu", **options)
    ref = results["memory"]
    for fmt, got in results.items():
        assert (got.groups, got.classifier, got.values, got.overall) == (
            ref.groups, ref.classifier, ref.values, ref.overall), fmt
    assert ref.values and all(v > 1 for g, v in zip(ref.groups, ref.values)
                              if g != ref.classifier)
    if case == "gpt2-tied":
        assert ref.classifier is None and ref.groups[-1] == "norm"
        assert results["pt"].excluded["lm_head.weight"] == "tied to transformer.wte.weight " \
                                                           "(the same tensor)"


def _members(state, rules):
    """{group: tensor names} from (regex, group template) rules, first match wins."""
    members = {}
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        for pattern, group in rules:
            if m := re.match(pattern, name):
                members.setdefault(m.expand(group), []).append(name)
                break
    return members


LLAMA_RULES = [(r"model\.embed_tokens\.", "embeddings"), (r"(model\.layers\.\d+)\.", r"\1"),
               (r"model\.norm\.", "norm"), (r"lm_head\.", "lm_head")]
CONVNEXT_RULES = [(r"stem\.", "stem"), (r"(stages\.\d+\.downsample)\.", r"\1"),
                  (r"(stages\.\d+\.blocks\.\d+)\.", r"\1"), (r"head\.norm\.", "norm"),
                  (r"head\.fc\.", "head.fc")]
TV_RULES = [(r"features\.0\.", "stem"), (r"(features\.\d+\.\d+)\.(layer_scale|block)", r"\1"),
            (r"(features\.\d+)\.", r"\1"), (r"classifier\.0\.", "norm"),
            (r"classifier\.2\.", "classifier.2")]


@pytest.mark.parametrize("shapes,rules,head", [
    (testing.llama_shapes(layers=4), LLAMA_RULES, "lm_head"),
    (testing.convnext_shapes(depths=(2, 1, 3, 1)), CONVNEXT_RULES, "head.fc"),
    (testing.convnext_shapes(layout="torchvision"), TV_RULES, "classifier.2"),
], ids=["llama", "convnext-timm", "convnext-torchvision"])
def test_new_presets_against_float64_from_explicit_groups(shapes, rules, head, tmp_path):
    r, a, b = testing.triple(shapes)
    members = _members(b, rules)
    expected, overall = _float64_t(r, a, b, members, head)
    save_file({k: v.contiguous() for k, v in b.items()}, str(tmp_path / "b.safetensors"))
    got = transferability(r, a, tmp_path / "b.safetensors", backend="cpu")
    assert got.groups == list(members) and got.classifier == head
    torch.testing.assert_close(torch.tensor(got.values, dtype=torch.float64),
                               torch.tensor(list(expected.values()), dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert got.overall == pytest.approx(overall, rel=1e-5)
