"""Which tensors to compare and how to group them into layers: names and shapes -> Plan.

A Plan is made from names, shapes and dtypes only and serves every model with those
names; it knows nothing of devices or values. Planning is one pass over the tensors
plus one sort, and `make_plan` keeps the last few plans, keyed by a hash of the sets'
names, shapes, dtypes and the options, so repeated calls (scans, trajectories, a loop
over `transferability`) pay only for that hash.
"""

from __future__ import annotations

import contextlib
import gc
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter, methodcaller
from pathlib import Path

import torch

from ..errors import TransferFastError, first_few
from ..io.names import common_prefix, describe_prefixes, natural_key  # noqa: F401 (re-export)
from .presets import (
    GROUPINGS,
    PRESETS,
    WITHIN_RANKS,
    classifier_name,
    custom_grouping,
    detect_architecture,
    generic_grouping,
    head_module,
    leaf_key,
    load_groups,
    within_key,
)

# Statistics and constants saved with the weights, not learned parameters.
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "inv_freq",
                    "masked_bias")
_HEAD_ORDER = (9,)  # the classifier group comes last
_EXTRA = "only in the last set (an adapter, a new buffer?); strict=True makes it an error"
_CACHE_SIZE = 8
_cache: OrderedDict[int, tuple[tuple, Plan]] = OrderedDict()
GroupsSource = str | Path | Sequence


@dataclass(frozen=True)
class Plan:
    """Selected tensors in network order and the group each belongs to.

    Plans are shared between calls (`make_plan` caches them): treat them as read-only.
    """

    preset: str
    names: tuple[str, ...]
    group_index: tuple[int, ...]  # per selected tensor, an index into `groups`
    groups: tuple[str, ...]
    classifier: str | None  # the group left out of the overall value
    excluded: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def _gc_paused():
    """Building 10^5 small tuples would trigger full collections that walk every live
    tensor; none of what is built here forms a cycle."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _signature(state: Mapping[str, torch.Tensor]) -> tuple:
    values = list(state.values())
    return (tuple(state), tuple(map(attrgetter("shape"), values)),
            tuple(map(attrgetter("dtype"), values)), tuple(map(attrgetter("layout"), values)),
            _aliases(state, values))


def _aliases(state: Mapping[str, torch.Tensor], values: list) -> tuple[tuple[str, ...], ...]:
    """Names that view the same memory (a head tied to the embedding), as sorted tuples."""
    if not values or values[0].is_meta:
        return ()
    try:
        ptrs = list(map(methodcaller("data_ptr"), values))
        if len(set(ptrs)) == len(ptrs):
            return ()
    except RuntimeError:  # a sparse tensor has no data pointer: look one by one
        pass
    classes: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if t.layout == torch.strided and not t.is_meta and t.numel():
            classes.setdefault((t.data_ptr(), t.shape, t.stride(), t.dtype), []).append(name)
    return tuple(sorted(tuple(sorted(c)) for c in classes.values() if len(c) > 1))


def make_plan(states: Sequence[Mapping[str, torch.Tensor]], preset: str = "auto",
              labels: Sequence[str] | None = None, *, groups: GroupsSource | None = None,
              classifier: str | None = None, strict: bool = False) -> Plan:
    """Plan for comparing `states` (e.g. [θr, θA, θB]) tensor by tensor.

    Args:
        states: name -> tensor mappings (meta tensors suffice); names must line up
            (`transfer_fast.io.names.align_states` removes differing prefixes).
        preset: one of PRESETS; 'auto' picks from the names.
        labels: the sets' names in error messages (e.g. "random (r.pt)").
        groups: custom grouping instead of the preset: a .toml/.json file or a list of
            {name, pattern} (format: `presets.load_groups`); unmatched tensors are
            listed in `excluded`.
        classifier: the group, or module, that is the classifier head (left out of the
            overall value); default: the one rule of `presets.classifier_name`.
        strict: make tensors present only in the last set (an adapter, a new buffer in
            θB) an error instead of leaving them out.
    Raises TransferFastError when a selected tensor is missing from a set or its shape
    differs between sets; a classifier whose shape differs (1000 vs 10 classes) is
    left out and listed in `excluded` instead.
    """
    if preset not in PRESETS:
        raise TransferFastError(f"unknown preset {preset!r}: expected one of {PRESETS}")
    rules, file_classifier = load_groups(groups) if groups is not None else (None, None)
    classifier = classifier if classifier is not None else file_classifier
    with _gc_paused():
        sigs = tuple(_signature(s) for s in states)
        key = hash((sigs, preset, rules, classifier, strict))
        names_only = tuple(sig[0] for sig in sigs)
        hit = _cache.get(key)
        if hit is not None and hit[0] == names_only:
            _cache.move_to_end(key)
            return hit[1]
        plan = _build(states, sigs, preset, rules, classifier, strict,
                      list(labels or [f"set {i + 1}" for i in range(len(states))]))
        _cache[key] = (names_only, plan)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return plan


def _build(states, sigs, preset, rules, classifier, strict, labels) -> Plan:
    # Usually every set has the same names, shapes, dtypes and layouts: then one set's
    # signature answers every question about all of them.
    uniform = all(sig[:4] == sigs[0][:4] for sig in sigs[1:])
    if uniform:
        names = list(sigs[0][0])
        shape_list = sigs[0][1]
        reasons = _uniform_exclusions(*sigs[0][:4])
    else:
        first: dict[str, torch.Tensor] = {}
        for state in reversed(states):  # each name's tensor from the first set holding it
            first.update(state)
        names = list(first)
        shape_list = [first[n].shape for n in names]
    prefix = common_prefix(names)  # 'model.', '_orig_mod.', 'backbone.' ...
    bare = [n[len(prefix):] for n in names] if prefix else names
    arch = detect_architecture(bare)
    if preset == "paper" and arch not in ("resnet", "densenet") and rules is None:
        raise TransferFastError(
            "preset 'paper' reproduces the authors' script for torchvision ResNet/DenseNet "
            f"names; these names look like a {arch} network: use preset '{arch}' or 'auto'")
    kind = preset if preset in GROUPINGS else arch
    ranks = None if rules is not None else WITHIN_RANKS.get(kind)
    # The torchvision/timm layouts name groups after the names without the shared prefix
    # ('layer1.0'); the others keep whole names, whose prefix cannot come and go with a
    # tensor saved or not (a tied head).
    keys = bare if ranks is not None else names
    order_in_group = partial(within_key, ranks=ranks)
    if rules is not None:
        group_of = custom_grouping(rules)
    elif kind == "generic":  # a group is one module: its tensors differ in the leaf only
        group_of, order_in_group = generic_grouping(arch, prefix), leaf_key
    else:
        group_of = GROUPINGS[kind]
    head = classifier_name(keys, dict(zip(keys, shape_list)))
    head_dot = f"{head}." if head is not None and rules is None else None

    entries: dict[str, tuple[str, tuple, str]] = {}  # name -> (group, order, key)
    excluded: dict[str, str] = {}
    unmatched = ("matches no group pattern" if rules is not None
                 else f"in no group of preset {preset if preset != 'auto' else kind!r}")
    for name, key in zip(names, keys):
        if name.endswith(_BUFFER_SUFFIXES):
            continue
        if head_dot is not None and key.startswith(head_dot):
            entries[name] = (head, _HEAD_ORDER, key)
            continue
        grouped = group_of(key)
        if grouped is None:
            excluded[name] = unmatched
        else:
            entries[name] = (*grouped, key)
    head_group = _head_group(entries, classifier, head, prefix, rules)

    selected, extras = [], []
    for name, (group, order, b) in entries.items():
        is_head = group == head_group
        if preset == "paper" and "conv" not in b and not (is_head and b.endswith("weight")):
            continue  # the authors' script: names with 'conv' plus the classifier weight
        if uniform:
            reason = reasons.get(name)
        else:
            role = "classifier" if is_head else "head" if head_module(b) is not None else None
            reason = _exclusion(name, [s.get(name) for s in states], role, strict)
        item = ((order, group, order_in_group(b)), name, group)
        if reason == _EXTRA:
            extras.append(item)
        elif reason:
            excluded[name] = reason
        else:
            selected.append(item)
    # An extra tensor inside a group the sets share (an adapter, a new buffer) is left
    # out; whole groups only the last set has mean another network: the check below fails.
    shared = {g for _, _, g in selected}
    for item in extras:
        if item[2] in shared:
            excluded[item[1]] = _EXTRA
        else:
            selected.append(item)
    selected.sort(key=lambda item: item[0])
    selected = _untie(selected, states, [sig[4] for sig in sigs], excluded)
    if not selected:
        raise TransferFastError(f"preset {preset!r} selected no tensor to compare")
    kept = [n for _, n, _ in selected]
    if not uniform:
        check_sets_agree(states, kept, labels)
    index = {g: i for i, g in enumerate(dict.fromkeys(g for _, _, g in selected))}
    return Plan(
        preset=preset if rules is None else "custom",
        names=tuple(kept),
        group_index=tuple(index[g] for _, _, g in selected),
        groups=tuple(index),
        classifier=head_group if head_group in index else None,
        excluded=excluded,
    )


def _head_group(entries: dict, classifier: str | None, head: str | None, prefix: str,
                rules) -> str | None:
    """The classifier group: `classifier` if a group, else its module's tensors pulled out
    into a group of that name; by default the group holding the rule's head module."""
    if classifier is None:
        if head is None:
            return None
        if rules is None:
            return head
        found = entries.get(head + ".weight")
        return found[0] if found else None
    if any(g == classifier for g, _, _ in entries.values()):
        return classifier
    modules = (classifier + ".", classifier.removeprefix(prefix) + ".")
    members = [n for n, (_, _, key) in entries.items() if n.startswith(modules)
               or key.startswith(modules)]
    if not members:
        groups = list(dict.fromkeys(g for g, _, _ in entries.values()))
        raise TransferFastError(f"classifier {classifier!r} is neither a group "
                                f"({first_few(groups)}) nor a module of these tensors")
    for n in members:
        entries[n] = (classifier, _HEAD_ORDER, entries[n][2])
    return classifier


def _uniform_exclusions(names: tuple, shapes: tuple, dtypes: tuple, layouts: tuple
                        ) -> dict[str, str]:
    """`_exclusion` for sets that agree on every name, shape, dtype and layout: from one
    set's signature, with per-kind checks instead of per-tensor ones."""
    if layouts.count(torch.strided) != len(layouts):
        name, layout = next((n, x) for n, x in zip(names, layouts) if x != torch.strided)
        raise TransferFastError(f"tensor {name!r} is {layout}: only dense tensors can be "
                                "compared; densify it first")
    nonfloat = {d for d in set(dtypes) if not d.is_floating_point}
    reasons = {n: "not a floating-point tensor" for n, d in zip(names, dtypes) if d in nonfloat}
    for name, shape in zip(names, shapes):
        if 0 in shape and name not in reasons:
            reasons[name] = "empty tensor"
    return reasons


def _exclusion(name: str, tensors: list, role: str | None, strict: bool) -> str | None:
    """Why a tensor is left out of the comparison, or None to keep it. `role`:
    'classifier', 'head' (another head module) or None."""
    present = [t for t in tensors if t is not None]
    if any(t.layout != torch.strided for t in present):
        raise TransferFastError(f"tensor {name!r} is {present[0].layout}: only dense "
                                "tensors can be compared; densify it first")
    if any(not t.is_floating_point() for t in present):
        return "not a floating-point tensor"
    if any(t.numel() == 0 for t in present):
        return "empty tensor"
    if role and len({tuple(t.shape) for t in present}) > 1:
        return f"{role} shape differs between sets: " + " vs ".join(
            str(tuple(t.shape)) if t is not None else "missing" for t in tensors)
    if len(present) < len(tensors):
        if role:
            return f"{role} missing from a set"
        if len(present) == 1 and tensors[-1] is not None and not strict:
            return _EXTRA
    return None


def _untie(selected: list, states, aliases: list[tuple], excluded: dict[str, str]) -> list:
    """Drops tensors that are views of an earlier selected tensor in every set holding
    both (an LM head tied to the embedding): the .pt and .safetensors files of one model,
    the latter saving the tensor once, then give the same groups."""
    per_set = [{n: c for c in classes for n in c} for classes in aliases]
    if not any(per_set):
        return selected
    seen: dict[tuple, str] = {}  # (set, alias class) -> its first name in network order
    out = []
    for item in selected:
        name = item[1]
        earlier = next((seen[(i, cls[name])] for i, cls in enumerate(per_set)
                        if (i, cls.get(name)) in seen), None)
        if earlier is not None and all(
                cls.get(name) is not None and cls.get(name) == cls.get(earlier)
                for cls, s in zip(per_set, states)
                if name in s and earlier in s and not s[name].is_meta):
            excluded[name] = f"tied to {earlier} (the same tensor)"
            continue
        for i, cls in enumerate(per_set):
            if name in cls:
                seen.setdefault((i, cls[name]), name)
        out.append(item)
    return out


def check_sets_agree(states, names: Sequence[str], labels: Sequence[str]) -> None:
    """Raises TransferFastError naming the first tensors missing from a set or reshaped."""
    for label, state in zip(labels, states):
        missing = [n for n in names if n not in state]
        if missing:
            hint = ""
            if len(missing) * 3 >= len(names):  # many names differ: prefixes, not a tensor
                hint = f"; names start with: {describe_prefixes(states, labels)}"
            raise TransferFastError(f"{label} lacks {len(missing)} tensor(s) the other sets "
                                    f"have: {first_few(missing)}{hint}")
    mismatched = [f"{n} " + " vs ".join(f"{tuple(s[n].shape)} in {label}"
                                        for label, s in zip(labels, states))
                  for n in names if len({tuple(s[n].shape) for s in states}) > 1]
    if mismatched:
        raise TransferFastError(f"{len(mismatched)} tensor(s) differ in shape between sets: "
                                f"{first_few(mismatched, 3)}")
