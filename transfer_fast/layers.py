"""Which tensors to compare and how to group them into layers: presets -> Plan.

A Plan is made from names and shapes only, once per architecture, and serves
every model with those names. It knows nothing of devices or values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import TransferFastError, first_few

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
    if name.startswith(("norm5.", "classifier.")):  # the final norm only feeds the classifier
        return "classifier", True, (2,)
    return None


def _vit(name: str):
    if name.startswith(("patch_embed.", "cls_token", "pos_embed", "reg_token", "dist_token")):
        return "patch_embed", False, (0,)
    if m := re.match(r"blocks\.(\d+)\.", name):
        return f"blocks.{m[1]}", False, (1, int(m[1]))
    if name.startswith(("norm.", "fc_norm.", "head.", "head_drop.")):
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
    arch = detect_architecture(names)
    group_of = _GROUPINGS.get(preset if preset in _GROUPINGS else arch)
    if group_of is None:  # generic: one group per module, classifier = last linear
        head = _generic_classifier(names, shapes)

        def group_of(name: str):
            module = name.rsplit(".", 1)[0] if "." in name else name
            return module, module == head, (2,) if module == head else (1,)

    selected, excluded = [], {}
    for name in names:
        grouped = group_of(name)
        if grouped is None or name.endswith(_BUFFER_SUFFIXES):
            continue
        group, is_head, order = grouped
        if preset == "paper" and "conv" not in name and not (is_head and name.endswith("weight")):
            continue  # the authors' script: names with 'conv' plus the classifier weight
        tensors = [s.get(name) for s in states]
        if any(t is not None and not t.is_floating_point() for t in tensors):
            excluded[name] = "not a floating-point tensor"
        elif any(t is not None and t.numel() == 0 for t in tensors):
            excluded[name] = "empty tensor"
        elif is_head and len({tuple(t.shape) for t in tensors if t is not None}) > 1:
            excluded[name] = "classifier shape differs between sets: " + " vs ".join(
                str(tuple(t.shape)) if t is not None else "missing" for t in tensors)
        elif is_head and any(t is None for t in tensors):
            excluded[name] = "classifier missing from a set"
        else:
            selected.append((name, group, is_head, order))

    labels = labels or [f"set {i + 1}" for i in range(len(states))]
    _check_sets_agree(states, [n for n, *_ in selected], labels)
    if preset == "paper" and not any("conv" in n for n, *_ in selected):
        raise TransferFastError(
            "preset 'paper' compares tensors whose name contains 'conv' (the authors' "
            f"ResNet/DenseNet script) and found none in this {arch} network; use preset "
            f"'{arch if arch in _GROUPINGS else 'generic'}' or 'auto'")
    if not selected:
        raise TransferFastError(f"preset {preset!r} selected no tensor to compare")
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


def _check_sets_agree(states, names: list[str], labels: Sequence[str]) -> None:
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
