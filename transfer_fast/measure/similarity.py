"""How alike are the fine-tuning updates θB_i - θA of K checkpoints: K x K cosine and L2."""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import ops
from ..errors import TransferFastError, first_few
from ..io.checkpoints import StateSource, load_state, open_checkpoint
from ..io.files import write_csv
from ..io.names import align_prefixes, strip_prefix
from .plan import GroupsSource, check_sets_agree, make_plan

NETWORK = "network"  # the last group: every compared tensor at once


@dataclass
class SimilarityResult:
    """Cosine similarity and L2 distance between the updates of K checkpoints, per group.

    cosine, l2: float64 (G + 1, K, K) on the CPU, indexed [group, i, j] with the groups
    of `groups` (the plan's G groups in network order, then "network"). cosine is NaN
    where update i or j is all zeros in that group.
    """

    labels: list[str]
    groups: list[str]
    cosine: torch.Tensor
    l2: torch.Tensor
    excluded: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "groups": list(self.groups),
                "cosine": self.cosine.tolist(), "l2": self.l2.tolist(),
                "excluded": dict(self.excluded), "warnings": list(self.warnings)}

    def write_csv(self, path: str | Path) -> Path:
        """Long format: one row per (group, i, j) with columns group, a, b, cosine, l2."""
        rows = []
        for g, group in enumerate(self.groups):
            cosine, l2 = self.cosine[g].tolist(), self.l2[g].tolist()
            rows += [[group, a, b, repr(cosine[i][j]), repr(l2[i][j])]
                     for i, a in enumerate(self.labels) for j, b in enumerate(self.labels)]
        return write_csv(path, ["group", "a", "b", "cosine", "l2"], rows)

    def plot(self, path: str | Path, group: str = NETWORK, title: str | None = None) -> Path:
        """The cosine and the L2 matrix of one group (the whole network by default)."""
        if group not in self.groups:
            raise TransferFastError(f"unknown group {group!r}: expected one of "
                                    f"{first_few(self.groups)}")
        g = self.groups.index(group)
        # The one allowed upward import (only inside `plot`): figures live in report/.
        from ..report.figures import save_figure, similarity_figure
        fig = similarity_figure(self.labels, self.cosine[g].tolist(), self.l2[g].tolist(),
                                title=title or f"Fine-tuning updates, {group}")
        return save_figure(fig, path)


def default_labels(sources: Sequence[StateSource]) -> list[str]:
    """Short unique names: for paths the shortest trailing part of the path that tells
    it apart (the file stem when that is unique, `run_3/model` for many
    `.../run_<k>/model.safetensors`), for anything else the position.

    Each path gets the fewest trailing folders needed for its own label to be unique;
    the extension is dropped unless that makes two labels equal. A path listed twice
    gets its position after it (`model.pt#4`).
    """
    parts = [tuple(x for x in Path(s).parts if x != Path(s).anchor)
             if isinstance(s, (str, Path)) else () for s in sources]
    for stem in (True, False):
        labels = _suffix_labels(parts, stem)
        if len(set(labels)) == len(labels):
            return labels
    count = Counter(labels)
    return [f"{x}#{i}" if count[x] > 1 else x for i, x in enumerate(labels)]


def _suffix_labels(parts: list[tuple[str, ...]], stem: bool) -> list[str]:
    """Per path, its shortest trailing part that no other path ends with (the whole
    path when none is); the position for an empty one."""
    def tail(p: tuple[str, ...], depth: int) -> str:
        last = Path(p[-1]).stem if stem else p[-1]
        return "/".join((*p[len(p) - depth:-1], last))

    labels: list[str | None] = [None if p else str(i) for i, p in enumerate(parts)]
    for depth in range(1, max(map(len, parts), default=0) + 1):
        if all(x is not None for x in labels):
            break
        count = Counter(tail(p, depth) for p in parts if len(p) >= depth)
        for i, p in enumerate(parts):
            if labels[i] is None and (count[tail(p, depth)] == 1 or depth == len(p)):
                labels[i] = tail(p, depth)
    return [str(x) for x in labels]


def _listing(src: StateSource, key: str | None) -> dict[str, torch.Tensor]:
    """What planning needs of a checkpoint: a file's names, shapes and dtypes (meta
    tensors, no data read), or a module's or mapping's tensors as they are."""
    if isinstance(src, (str, Path)):
        return open_checkpoint(src, key=key).meta()
    return load_state(src, key=key)


def similarity(checkpoints: Sequence[StateSource], reference: StateSource, *,
               preset: str = "auto", backend: str = "auto",
               labels: Sequence[str] | None = None, groups: GroupsSource | None = None,
               classifier: str | None = None, key: str | None = None,
               strict: bool = False) -> SimilarityResult:
    """K x K cosine similarity and L2 distance between the updates θB_i - θA, per group.

    The tensors and groups come from `make_plan` (a classifier whose shape differs is
    left out, listed in `excluded`); "network" sums over every compared tensor;
    prefixes that differ between the sets ('bert.' in a task model) are lined up. The
    plan's tensors get one flat layout: each update (float32 at least) is packed into
    one row of a (K, L) buffer on the device of the first checkpoint (the CPU for a
    path), checkpoints given as paths read one at a time, and all K*K pairs come from
    one `packed_distance` call. Memory: K packed updates and one checkpoint. An
    all-zero update (a frozen group) gives NaN cosines, in `warnings`.

    Args:
        checkpoints: K >= 2 fine-tuned sets θB_i, a list of paths, folders, modules or
            mappings (as `load_state`); paths are listed first (names, shapes and
            dtypes) and read one at a time.
        reference: the pre-trained set θA, the same way (loaded whole).
        preset: the grouping of tensors into layer groups, one of `presets.PRESETS`
            ("auto" picks one from the names).
        backend: "auto" (the compiled kernel of the buffer's device, else pure torch),
            "cpu"/"cuda" (that kernel, or an error), "torch" (pure torch).
        labels: one name per checkpoint, for the result and messages; None:
            `default_labels` (the shortest distinguishing tail of each path, else the
            position).
        groups: custom groups instead of the preset's, as in `transferability`.
        classifier: the classifier group or module, as in `transferability`.
        key: the wrapped state dict entry to read in every checkpoint file, as in
            `load_state`; None: the default choice.
        strict: as in `transferability`. `groups`, `classifier`, `strict` go to
            `make_plan`, `key` to `load_state`, as in `transferability`.
    Returns:
        SimilarityResult: `labels`; `groups` (the plan's G groups in network order, then
        "network"); `cosine` and `l2` float64 (G + 1, K, K) on the CPU, indexed [group,
        i, j], exactly symmetric; `excluded`; `warnings` (also issued as
        RuntimeWarning).
    Raises:
        TransferFastError: a single path, mapping or module instead of a list; fewer
            than 2 checkpoints; a number of labels other than K; a set that cannot be
            loaded (a missing, unreadable, truncated, unsafe or tensor-less file, or a
            `key` that names no state dict); names that do not line up; a selected
            tensor missing from a set or of another shape; an unknown preset, a bad
            groups file or list or `classifier`, no tensor to compare; an unknown
            backend or one that cannot reduce the buffers on their device; a NaN, Inf or
            overflow in an update.
        OSError: a model folder, index file or groups file the system refuses to list or
            read, or an I/O error while a .safetensors file is read (other read failures
            are TransferFastError).
    """
    if isinstance(checkpoints, (str, Path, Mapping, nn.Module)):
        raise TransferFastError("checkpoints must be a list of checkpoints, got a single "
                                f"{type(checkpoints).__name__}")
    checkpoints = list(checkpoints)
    if len(checkpoints) < 2:
        raise TransferFastError(f"similarity needs at least 2 checkpoints to compare, got "
                                f"{len(checkpoints)}")
    labels = [str(x) for x in labels] if labels is not None else default_labels(checkpoints)
    if len(labels) != len(checkpoints):
        raise TransferFastError(f"{len(labels)} labels for {len(checkpoints)} checkpoints")
    ref = load_state(reference, key=key)
    listed = [_listing(c, key) for c in checkpoints]
    ref_label = f"reference ({reference})" if isinstance(reference, (str, Path)) else "reference"
    set_labels = [ref_label, *(f"checkpoint {x}" for x in labels)]
    prefixes = align_prefixes([ref, *listed], set_labels)  # 'bert.' in some, none in others
    ref, listed = strip_prefix(ref, prefixes[0]), [
        strip_prefix(s, p) for s, p in zip(listed, prefixes[1:])]
    plan = make_plan([ref, *listed], preset, labels=set_labels, groups=groups,
                     classifier=classifier, strict=strict)
    first = listed[0][plan.names[0]]
    device = torch.device("cpu") if first.is_meta else first.device
    # θB - θA in float32 at least: in half precision the small update would be mostly
    # rounding error of the (much larger) weights.
    dtype = functools.reduce(torch.promote_types, (
        s[n].dtype for s in (ref, *listed) for n in plan.names), torch.float32)
    layout = ops.PackedLayout.from_tensors([ref[n] for n in plan.names])
    base = layout.pack([ref[n].to(device) for n in plan.names],
                       out=layout.new_buffer(1, dtype=dtype, device=device)[0])
    updates = layout.new_buffer(len(checkpoints), dtype=dtype, device=device)
    for k, (src, listing) in enumerate(zip(checkpoints, listed)):
        state = (strip_prefix(load_state(src, key=key), prefixes[k + 1])
                 if isinstance(src, (str, Path)) else listing)
        check_sets_agree([ref, state], plan.names, [ref_label, set_labels[k + 1]])
        layout.pack([state[n].to(device) for n in plan.names], out=updates[k]).sub_(base)
        del state  # one checkpoint in memory at a time
    sums = ops.packed_distance(updates, updates, layout, backend=backend)  # (K, K, T, 5)

    bad = (~torch.isfinite(sums[:, 0, :, 3])).nonzero().tolist()  # per (checkpoint, tensor)
    if bad:
        found = [f"{plan.names[t]} in checkpoint {labels[k]}" for k, t in bad]
        raise TransferFastError(f"NaN, Inf or overflow in the update (checkpoint - reference) "
                                f"of {len(found)} tensor(s): {first_few(found, 3)}")

    index = torch.tensor(plan.group_index, device=sums.device)
    per_group = sums.new_zeros(*sums.shape[:2], len(plan.groups), 5).index_add_(2, index, sums)
    s = torch.cat([per_group, sums.sum(2, keepdim=True)], 2).permute(2, 0, 1, 3).cpu()
    # (i, j) and (j, i) are reduced separately, in orders that may differ in the last
    # bits: averaging the two makes the matrices exactly symmetric.
    sq_diff = (s[..., 1] + s[..., 1].mT) / 2  # (G + 1, K, K)
    dot = (s[..., 2] + s[..., 2].mT) / 2
    norm_sq = s[:, :, 0, 3]  # (G + 1, K): each update's squared norm
    # Rounding can push |cos| of (nearly) parallel updates just past 1.
    cosine = (dot / (norm_sq[:, :, None] * norm_sq[:, None, :]).sqrt()).clamp(-1.0, 1.0)

    groups = [*plan.groups, NETWORK]
    notes = []
    for k, label in enumerate(labels):
        zero = [g for g, n in zip(groups, norm_sq[:, k].tolist()) if n == 0]
        if NETWORK in zero:
            notes.append(f"checkpoint {label}: identical to the reference (zero update), "
                         "cosine undefined (NaN) in every group")
        elif zero:
            notes.append(f"checkpoint {label}: zero update in {len(zero)} group(s), cosine "
                         f"undefined (NaN) there: {first_few(zero, 3)}")
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return SimilarityResult(labels=labels, groups=groups, cosine=cosine, l2=sq_diff.sqrt(),
                            excluded=dict(plan.excluded), warnings=notes)
