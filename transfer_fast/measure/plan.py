"""Which tensors to compare and how to group them into layers: presets -> Plan.

A Plan is made from names and shapes only, once per architecture, and serves
every model with those names. It knows nothing of devices or values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import TransferFastError, first_few

PRESETS = ("auto", "paper", "resnet", "densenet", "vit", "generic")
# BatchNorm statistics are buffers, not learned parameters.
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

# A grouping maps a tensor name to (group, is_classifier, order), or None to leave
# it out. `order` sorts the groups into network order, which a file may not keep
# (safetensors stores names alphabetically).
Grouping = Callable[[str], "tuple[str, bool, tuple] | None"]


def _resnet(name: str):
    if name.startswith(("conv1.", "bn1.")):
        return "stem", False, (0,)
    if m := re.match(r"layer(\d+)\.(\d+)\.", name):
        return f"layer{m[1]}.{m[2]}", False, (1, int(m[1]), int(m[2]))
    if name.startswith("fc."):
        return "fc", True, (2,)
    return None


def _densenet(name: str):
    name = name.removeprefix("features.")
    if name.startswith(("conv0.", "norm0.")):
        return "stem", False, (0,)
    if m := re.match(r"denseblock(\d+)\.denselayer(\d+)\.", name):
        return f"denseblock{m[1]}.denselayer{m[2]}", False, (1, int(m[1]), 0, int(m[2]))
    if m := re.match(r"transition(\d+)\.", name):
        return f"transition{m[1]}", False, (1, int(m[1]), 1, 0)
    if name.startswith("norm5."):
        return "norm5", False, (1.5,)
    if name.startswith("classifier."):
        return "classifier", True, (2,)
    return None


def _vit(name: str):
    if name.startswith(("patch_embed.", "cls_token", "pos_embed", "reg_token", "dist_token")):
        return "patch_embed", False, (0,)
    if m := re.match(r"blocks\.(\d+)\.", name):
        return f"blocks.{m[1]}", False, (1, int(m[1]))
    if name.startswith(("norm.", "fc_norm.")):
        return "norm", False, (1.5,)
    if name.startswith("head."):
        return "head", True, (2,)
    return None


def natural_key(name: str) -> list:
    """'features.10' after 'features.9': numbers compare as numbers."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name)]


_GROUPINGS: dict[str, Grouping] = {"resnet": _resnet, "densenet": _densenet, "vit": _vit}


def detect_architecture(names: Sequence[str]) -> str:
    """'resnet', 'densenet', 'vit' (timm) or 'generic', from the tensor names alone."""
    joined = "\n".join(names)
    if "conv1.weight" in names and re.search(r"^layer\d+\.\d+\.conv\d\.weight$", joined, re.M):
        return "resnet"
    if re.search(r"denseblock\d+\.denselayer\d+\.", joined):
        return "densenet"
    if re.search(r"^blocks\.\d+\.attn\.", joined, re.M):
        return "vit"
    return "generic"


@dataclass(frozen=True)
class Plan:
    """Selected tensors in network order and the group each belongs to."""

    preset: str
    names: tuple[str, ...]
    group_index: tuple[int, ...]  # per selected tensor, an index into `groups`
    groups: tuple[str, ...]
    classifier: str | None  # the group left out of the overall value
    excluded: dict[str, str] = field(default_factory=dict)


def _union_in_order(states: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    seen: dict[str, None] = {}
    for state in states:
        seen.update(dict.fromkeys(state))
    return list(seen)


_HEAD_NAMES = ("fc", "head", "classifier", "last_linear", "logits")


def _generic_classifier(names: Sequence[str], shapes: Mapping[str, tuple]) -> str | None:
    """A module named like a head, else the module of the last 2-D weight."""
    modules = [n.rsplit(".", 1)[0] for n in names if n.endswith(".weight")]
    named = [m for m in modules if m.rsplit(".", 1)[-1] in _HEAD_NAMES]
    if named:
        return named[-1]
    for name in reversed(names):
        if name.endswith(".weight") and len(shapes[name]) == 2:
            return name.rsplit(".", 1)[0]
    return None


def common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix every name shares ('model.', '_orig_mod.', 'backbone.'), or ''."""
    parts = [n.split(".") for n in names]
    depth = 0
    while parts and all(len(p) > depth + 1 and p[depth] == parts[0][depth] for p in parts):
        depth += 1
    return "".join(part + "." for part in parts[0][:depth]) if depth else ""


def _grouping(names: list[str], shapes: Mapping[str, tuple], preset: str, prefix: str
              ) -> Grouping:
    """The grouping for `preset`, for names with their common `prefix` removed."""
    bare = [n[len(prefix):] for n in names]
    arch = detect_architecture(bare)
    if preset == "paper" and arch not in ("resnet", "densenet"):
        raise TransferFastError(
            "preset 'paper' reproduces the authors' script for torchvision ResNet/DenseNet "
            f"names; these names look like a {arch} network: use preset "
            f"'{arch}' or 'auto'")
    chosen = _GROUPINGS.get(preset if preset in _GROUPINGS else arch)
    if chosen is None:  # generic: one group per module, classifier = the head module
        head = _generic_classifier(bare, {b: shapes[n] for b, n in zip(bare, names)})

        def chosen(name: str):
            module = name.rsplit(".", 1)[0] if "." in name else name
            return module, module == head, (2,) if module == head else (1,)

    return chosen


def _exclusion(name: str, tensors: list, is_head: bool) -> str | None:
    """Why a tensor is left out of the comparison, or None to keep it."""
    present = [t for t in tensors if t is not None]
    if any(t.layout != torch.strided for t in present):
        raise TransferFastError(f"tensor {name!r} is {present[0].layout}: only dense "
                                "tensors can be compared; densify it first")
    if any(not t.is_floating_point() for t in present):
        return "not a floating-point tensor"
    if any(t.numel() == 0 for t in present):
        return "empty tensor"
    if is_head and len({tuple(t.shape) for t in present}) > 1:
        return "classifier shape differs between sets: " + " vs ".join(
            str(tuple(t.shape)) if t is not None else "missing" for t in tensors)
    if is_head and len(present) < len(tensors):
        return "classifier missing from a set"
    return None


def make_plan(
    states: Sequence[Mapping[str, torch.Tensor]],
    preset: str = "auto",
    labels: Sequence[str] | None = None,
) -> Plan:
    """Plan for comparing `states` (e.g. [θr, θA, θB]) tensor by tensor.

    `labels` name the sets in error messages (e.g. "random (r.pt)").
    Raises TransferFastError when a selected tensor is missing from a set or its shape
    differs between sets; a classifier whose shape differs (1000 vs 10 classes) is
    left out and listed in `excluded` instead.
    """
    if preset not in PRESETS:
        raise TransferFastError(f"unknown preset {preset!r}: expected one of {PRESETS}")
    names = _union_in_order(states)
    shapes = {n: tuple(next(s[n] for s in states if n in s).shape) for n in names}
    prefix = common_prefix(names)  # 'model.', '_orig_mod.' (torch.compile), ...
    group_of = _grouping(names, shapes, preset, prefix)
    selected, excluded = [], {}
    for name in names:
        bare = name[len(prefix):]
        grouped = group_of(bare)
        if grouped is None or name.endswith(_BUFFER_SUFFIXES):
            continue
        group, is_head, order = grouped
        if preset == "paper" and "conv" not in bare and not (is_head and bare.endswith("weight")):
            continue  # the authors' script: names with 'conv' plus the classifier weight
        reason = _exclusion(name, [s.get(name) for s in states], is_head)
        if reason:
            excluded[name] = reason
        else:
            selected.append((name, group, is_head, order))
    if not selected:
        raise TransferFastError(f"preset {preset!r} selected no tensor to compare")
    names = [n for n, *_ in selected]
    check_sets_agree(states, names, labels or [f"set {i + 1}" for i in range(len(states))])
    # Stable sort: within equal keys (generic groups) the names' own order stands.
    selected.sort(key=lambda item: item[3])
    groups = list(dict.fromkeys(g for _, g, _, _ in selected))
    heads = [g for _, g, h, _ in selected if h]
    return Plan(
        preset=preset,
        names=tuple(n for n, *_ in selected),
        group_index=tuple(groups.index(g) for _, g, _, _ in selected),
        groups=tuple(groups),
        classifier=heads[0] if heads else None,
        excluded=excluded,
    )


def check_sets_agree(states, names: Sequence[str], labels: Sequence[str]) -> None:
    """Raises TransferFastError naming the first tensors missing from a set or reshaped."""
    for label, state in zip(labels, states):
        missing = [n for n in names if n not in state]
        if missing:
            raise TransferFastError(f"{label} lacks {len(missing)} tensor(s) the other sets "
                                    f"have: {first_few(missing)}")
    mismatched = [f"{n} " + " vs ".join(f"{tuple(s[n].shape)} in {label}"
                                        for label, s in zip(labels, states))
                  for n in names if len({tuple(s[n].shape) for s in states}) > 1]
    if mismatched:
        raise TransferFastError(f"{len(mismatched)} tensor(s) differ in shape between sets: "
                                f"{first_few(mismatched, 3)}")
