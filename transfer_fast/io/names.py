"""Tensor names: numeric-aware order, wrapper prefixes, and lining up the names of several sets.

Checkpoints of one network disagree on names in predictable ways: DataParallel adds
`module.`, torch.compile `_orig_mod.`, a Hugging Face task model nests its base model
under `bert.` / `model.` / `roberta.` while the base model has no prefix, PEFT wraps
everything in `base_model.model.`. The wrappers every name carries are stripped per
file (`strip_wrappers`); the rest is solved across the sets (`align_prefixes`): for
each set, the prefix whose removal makes the sets' names agree best.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import product
from typing import TypeVar

from ..errors import TransferFastError

# Prefixes that never belong to a model's own names: stripped per file when every name has one.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_DIGITS = re.compile(r"(\d+)")
_MAX_PREFIX_DEPTH = 3  # 'base_model.model.' (PEFT) is the deepest wrapper seen in practice
_SAMPLE = 4096  # names examined per pair of sets to find candidate prefixes

T = TypeVar("T")


def natural_key(name: str) -> list:
    """'features.10' after 'features.9': numbers compare as numbers."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in _DIGITS.split(name)]


def wrapper_prefix(names: Iterable[str]) -> str:
    """The chain of `WRAPPER_PREFIXES` that every name starts with ('module._orig_mod.'), or ''."""
    names = list(names)
    found = ""
    while names:
        head = next((p for p in WRAPPER_PREFIXES if names[0].startswith(found + p)), None)
        if head is None or not all(n.startswith(found + head) for n in names):
            break
        found += head
    return found


def strip_wrappers(state: Mapping[str, T]) -> dict[str, T]:
    """`state` without the `module.` / `_orig_mod.` prefix every one of its names carries."""
    prefix = wrapper_prefix(state)
    if not prefix:
        return state if isinstance(state, dict) else dict(state)
    return {name[len(prefix):]: v for name, v in state.items()}


def common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix every name shares ('model.', 'backbone.'), or ''; never a whole name."""
    if not names:
        return ""
    lo, hi = min(names), max(names)  # the text-order extremes share what all names share
    size = 0
    while size < min(len(lo), len(hi)) and lo[size] == hi[size]:
        size += 1
    shared = lo[:size]
    return shared[:shared.rfind(".") + 1]


def _strip(names: set[str], prefix: str) -> set[str] | None:
    """The names with `prefix` removed where they have it; None if two names would collide."""
    if not prefix:
        return names
    out = {n[len(prefix):] if n.startswith(prefix) else n for n in names}
    return out if len(out) == len(names) else None


def _candidates(ordered: Sequence[str], own: set[str], others: Sequence[set[str]]) -> list[str]:
    """Up to three prefixes of `own`'s names whose removal yields names another set has."""
    votes: Counter = Counter()
    for other in others:
        seen = 0
        for name in ordered:
            if name in other:
                continue
            seen += 1
            if seen > _SAMPLE:
                break
            dot = -1
            for _ in range(_MAX_PREFIX_DEPTH):
                dot = name.find(".", dot + 1)
                if dot < 0:
                    break
                if name[dot + 1:] in other:
                    votes[name[:dot + 1]] += 1
    ranked = sorted(votes, key=lambda p: (-votes[p], len(p), p))
    return [p for p in ranked[:3] if _strip(own, p) is not None]


def describe_prefixes(name_sets: Sequence[Iterable[str]], labels: Sequence[str]) -> str:
    """'random: 'embeddings.' (5), 'encoder.' (192); finetuned: 'bert.' (197), ...' for messages."""
    parts = []
    for label, names in zip(labels, name_sets):
        counts = Counter(n.split(".", 1)[0] + ("." if "." in n else "") for n in names)
        top = ", ".join(f"{p!r} ({c})" for p, c in counts.most_common(4))
        more = f" and {len(counts) - 4} more" if len(counts) > 4 else ""
        parts.append(f"{label}: {top}{more}")
    return "; ".join(parts)


def align_prefixes(name_sets: Sequence[Iterable[str]],
                   labels: Sequence[str] | None = None) -> list[str]:
    """Per set, the prefix to strip from its names (where they have it) so the sets line up.

    '' everywhere when the names already agree (extra tensors in one set do not count
    as disagreement). Otherwise every combination of '' and up to three candidate
    prefixes per set (those whose removal yields names of another set: 'bert.',
    'model.', 'base_model.model.') is tried, and the one leaving the most names shared
    by all sets wins; on a tie, the fewest and shortest strips.

    Raises TransferFastError naming the prefixes seen in each set when fewer than half
    of the smallest set's names can be lined up.
    """
    ordered = [list(s) for s in name_sets]
    sets = [set(s) for s in ordered]
    labels = list(labels or [f"set {i + 1}" for i in range(len(sets))])
    if len(sets) < 2:
        return [""] * len(sets)
    smallest = min(len(s) for s in sets)
    shared = len(set.intersection(*sets))
    if shared == smallest:
        return [""] * len(sets)
    options = []
    for i, own in enumerate(sets):
        others = [s for j, s in enumerate(sets) if j != i]
        options.append([("", own)] + [(p, _strip(own, p))
                                      for p in _candidates(ordered[i], own, others)])
    best, best_score = None, None
    for combo in product(*options):
        prefixes = [p for p, _ in combo]
        score = (len(set.intersection(*[s for _, s in combo])),
                 -sum(1 for p in prefixes if p), -sum(len(p) for p in prefixes))
        if best_score is None or score > best_score:
            best, best_score = prefixes, score
    if best_score[0] * 2 < smallest:
        raise TransferFastError(
            f"tensor names do not line up between the sets ({best_score[0]} of {smallest} "
            f"shared after removing prefixes); names start with: "
            f"{describe_prefixes(ordered, labels)}")
    return best


def strip_prefix(state: Mapping[str, T], prefix: str) -> dict[str, T]:
    """`state` with `prefix` removed from the names that start with it."""
    if not prefix:
        return state if isinstance(state, dict) else dict(state)
    return {(n[len(prefix):] if n.startswith(prefix) else n): v for n, v in state.items()}


def align_states(states: Sequence[Mapping[str, T]],
                 labels: Sequence[str] | None = None) -> list[dict[str, T]]:
    """The states renamed so their names line up (`align_prefixes`); same tensors, no copies."""
    prefixes = align_prefixes([list(s) for s in states], labels)
    return [strip_prefix(s, p) for s, p in zip(states, prefixes)]
