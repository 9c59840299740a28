"""Layer-wise distances and the paper's transferability T = D(θr, θB) / D(θA, θB)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import ops
from ..errors import TransferFastError, first_few
from ..io.checkpoints import StateSource, load_state
from ..io.names import align_states
from .plan import GroupsSource, Plan, check_sets_agree, make_plan


def _metric_l1_mean(s, n):
    return s[..., 0] / n


def _metric_l2(s, n):
    return s[..., 1].sqrt()


def _metric_rms(s, n):
    return (s[..., 1] / n).sqrt()


def _metric_rel_l2(s, n):
    return s[..., 1].sqrt() / s[..., 4].sqrt()  # relative to the target's (θB's) norm


def _metric_cosine(s, n):
    return 1.0 - s[..., 2] / (s[..., 3] * s[..., 4]).sqrt()


# Each metric from the fused sums (..., 5) and the element count; float64 in, float64 out.
METRICS = {
    "l1_mean": _metric_l1_mean,  # mean |a - b|: the authors' distance
    "l2": _metric_l2,            # ||a - b||
    "rms": _metric_rms,          # ||a - b|| / sqrt(numel)
    "rel_l2": _metric_rel_l2,    # ||a - b|| / ||b||, b the fine-tuned (target) tensor
    "cosine": _metric_cosine,    # 1 - cos(a, b)
}


# The sums (of ops.SUM_NAMES) each metric reads: the op computes only these where
# that saves work (the pure-torch fallback), and only these are checked for NaN/Inf.
METRIC_SUMS = {
    "l1_mean": frozenset({"abs_diff"}),
    "l2": frozenset({"sq_diff"}),
    "rms": frozenset({"sq_diff"}),
    "rel_l2": frozenset({"sq_diff", "target_sq"}),
    "cosine": frozenset({"dot", "anchor_sq", "target_sq"}),
}
SQUARES = frozenset({"anchor_sq", "target_sq"})


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise TransferFastError(f"unknown metric {metric!r}: expected one of {tuple(METRICS)}")


def _columns(wanted: frozenset[str]) -> list[int]:
    return [i for i, name in enumerate(ops.SUM_NAMES) if name in wanted]


def _all_finite(sums: torch.Tensor, wanted: frozenset[str]) -> bool:
    return bool(torch.isfinite(sums[..., _columns(wanted)]).all())


def _check_finite(sums: torch.Tensor, sets: list[list[torch.Tensor]], labels: list[str],
                  names: Sequence[str], wanted: frozenset[str]) -> list[str]:
    """Names the tensors holding NaN/Inf, from the sums (A, K, T, 5) of the `wanted`
    columns: a non-finite value makes every sum it enters non-finite, so only the
    tensors of those sums are scanned again. Sums that overflowed float32 blocks
    (|x| > ~1e19 squared) with finite inputs are returned as warnings."""
    if _all_finite(sums, wanted):
        return []
    num_anchors = sums.shape[0]
    if SQUARES <= wanted:  # each set's own sum of squares points at the set
        squares = torch.cat([sums[:, 0, :, 3], sums[0, :, :, 4]])
        bad = [((s, t),) for s, t in (~torch.isfinite(squares)).nonzero().tolist()]
        places = {pair: f"{names[pair[0][1]]} in {labels[pair[0][0]]}" for pair in bad}
    else:  # a pair's sum: either of its two sets
        pairs = (~torch.isfinite(sums[..., _columns(wanted)])).any(-1).nonzero().tolist()
        bad = [((i, t), (num_anchors + k, t)) for i, k, t in pairs]
        places = {pair: f"{names[pair[0][1]]} between {labels[pair[0][0]]} and "
                        f"{labels[pair[1][0]]}" for pair in bad}
    suspects = dict.fromkeys(place for pair in bad for place in pair)
    found = [f"{names[t]} in {labels[s]}" for s, t in suspects
             if not torch.isfinite(sets[s][t]).all()]
    if found:
        raise TransferFastError(f"NaN or Inf in {len(found)} tensor(s): {first_few(found, 3)}")
    return [f"sums overflowed for {places[pair]}: the metric is inf there" for pair in bad]


@dataclass
class LayerDistances:
    """Per-tensor distances between two parameter sets."""

    names: list[str]
    values: dict[str, list[float]]  # metric -> one value per name
    excluded: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_distances(a: StateSource, b: StateSource, *,
                    metrics: Sequence[str] = ("l1_mean", "l2", "rel_l2", "cosine"),
                    backend: str = "auto") -> LayerDistances:
    """Every metric for every learned tensor the two sets share, in one fused pass.

    The tensors compared are those `make_plan` selects with the "generic" preset:
    buffers such as running statistics are skipped, and the tensors left out for a
    reason (not floating-point, empty) are listed in `excluded`. Differing wrapper or
    base-model prefixes are lined up (`io.names.align_states`). Sums that overflow with
    finite inputs give inf and a RuntimeWarning.

    Args:
        a: the first set: a checkpoint file, index file or model folder, an nn.Module or a
            mapping of names to tensors (`load_state`, default state dict entry).
        b: the second set, the same way; its norm is the reference of "rel_l2".
        metrics: the names (of METRICS) to compute: "l1_mean" (mean |a - b|), "l2"
            (||a - b||), "rms" (||a - b|| / sqrt(numel)), "rel_l2" (||a - b|| / ||b||),
            "cosine" (1 - cos(a, b)); default all but "rms". Only the sums they need are
            computed where that saves work.
        backend: "auto" (the compiled kernel of the tensors' device, else pure torch),
            "cpu"/"cuda" (that kernel, or an error), "torch" (pure torch).
    Returns:
        LayerDistances: `names` (the compared tensors, in network order), `values`
        {metric: one float per name, computed from float64 sums; cosine and rel_l2 are
        NaN or inf where a norm is zero} and `excluded` {name: why it was left out}.
    Raises:
        TransferFastError: an unknown metric or backend, or a backend that cannot reduce
            tensors on their device; a set that cannot be loaded (a missing, unreadable,
            truncated, unsafe or tensor-less file, or an object that is not a path,
            module or mapping); names that do not line up; a selected tensor missing from
            a set or of another shape; no tensor to compare; a NaN or Inf in a tensor.
        OSError: a model folder or index file the system refuses to list or read, or an
            I/O error while a .safetensors file is read (other read failures are
            TransferFastError).
    """
    for metric in metrics:
        check_metric(metric)
    labels = ["first set", "second set"]
    states = align_states([load_state(a), load_state(b)], labels)
    plan = make_plan(states, "generic", labels=labels)
    sets = [[s[n] for n in plan.names] for s in states]
    wanted = frozenset().union(*(METRIC_SUMS[m] for m in metrics))
    sums = ops.multi_tensor_distance([sets[0]], [sets[1]], backend=backend, sums=wanted)[0, 0]
    for note in _check_finite(sums[None, None], sets, labels, plan.names, wanted):
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    numel = torch.tensor([t.numel() for t in sets[0]], dtype=torch.float64, device=sums.device)
    values = {m: METRICS[m](sums, numel).tolist() for m in metrics}
    return LayerDistances(list(plan.names), values, plan.excluded)


@dataclass
class TransferabilityResult:
    """T per group in network order, and the overall mean over non-classifier groups."""

    groups: list[str]
    values: list[float]
    overall: float
    d_random: list[float]
    d_pretrained: list[float]
    excluded: dict[str, str]
    classifier: str | None
    metric: str
    preset: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _label(role: str, src: StateSource) -> str:
    return f"{role} ({src})" if isinstance(src, (str, Path)) else role


def _keys(key: str | Sequence[str | None] | None) -> list[str | None]:
    if key is None or isinstance(key, str):
        return [key] * 3
    if len(key) != 3:
        raise TransferFastError(f"key: expected one entry name or three (random, pretrained, "
                                f"finetuned), got {len(key)}")
    return list(key)


def transferability(random: StateSource, pretrained: StateSource, finetuned: StateSource, *,
                    preset: str = "auto", metric: str = "l1_mean", backend: str = "auto",
                    groups: GroupsSource | None = None, classifier: str | None = None,
                    key: str | Sequence[str | None] | None = None,
                    strict: bool = False) -> TransferabilityResult:
    """T = D(θr, θB) / D(θA, θB) per layer group, from one fused pass over the three sets.

    A group's distance is the mean of its tensors' distances (the authors' script),
    T is the ratio of the two group distances, and `overall` the plain mean of T
    over the groups other than the classifier. A zero D(θA, θB) gives T = inf for
    that group (NaN if D(θr, θB) is zero too), reported in `warnings`.

    Args:
        random: θr, the randomly initialised set.
        pretrained: θA, the pre-trained set.
        finetuned: θB, the set fine-tuned from θA; the comparison runs on the device of
            its first selected tensor. Each set is a checkpoint file, an index file or
            model folder (sharded Hugging Face checkpoints), a module or a mapping
            (`load_state`). Differing wrapper or base-model prefixes ('bert.' in one,
            none in another) are lined up (`io.names.align_states`).
        preset: the grouping of tensors into layer groups, one of `presets.PRESETS`
            ("auto" picks one from the names, "paper" is the authors' script for
            ResNet/DenseNet).
        metric: the distance D, one of METRICS: "l1_mean" (mean |a - b|, the authors'
            and the default), "l2", "rms", "rel_l2" (relative to θB's norm) or "cosine"
            (1 - cos).
        backend: "auto" (the compiled kernel of θB's device, else pure torch),
            "cpu"/"cuda" (that kernel, or an error), "torch" (pure torch).
        groups: custom groups instead of the preset's: a .toml/.json file or a list of
            {name, pattern} (`presets.load_groups`); None: the preset's.
        classifier: the group, or module, that is the classifier head (left out of
            `overall`); None: the groups file's, else the one found by
            `presets.classifier_name`.
        key: picks the wrapped state dict ('state_dict_ema', ...) in checkpoints that
            hold several, one name for every file or three (random, pretrained,
            finetuned); None, for all or in one of the three: the default choice
            ('state_dict', 'model_state_dict', 'model' or 'module').
        strict: make tensors present only in θB (an adapter, a new buffer) an error
            instead of leaving them out (listed in `excluded`). `groups`, `classifier`
            and `strict` go to `make_plan`.
    Returns:
        TransferabilityResult: per group in network order `values` (T), `d_random`
        (D(θr, θB)) and `d_pretrained` (D(θA, θB)), from float64 sums; `overall`;
        `excluded` {tensor name: why it was left out}; the `classifier` group (None if
        none); `metric`; `preset` ("custom" with `groups`); `warnings` (also issued as
        RuntimeWarning).
    Raises:
        TransferFastError: an unknown metric, preset or backend, or a backend that cannot
            reduce tensors on θB's device; a set that cannot be loaded (a missing,
            unreadable, truncated, unsafe or tensor-less file, an object that is not a
            path, module or mapping, a `key` that names no state dict, a `key` list not of
            three); names that do not line up; a selected tensor missing from a set or of
            another shape; a bad groups file or list, or a `classifier` that is neither a
            group nor a module; preset "paper" for names not of a ResNet/DenseNet; no
            tensor to compare; a NaN or Inf in a tensor.
        OSError: a model folder, index file or groups file the system refuses to list or
            read, or an I/O error while a .safetensors file is read (other read failures
            are TransferFastError).
    """
    check_metric(metric)
    labels = [_label(r, s) for r, s in
              (("random", random), ("pretrained", pretrained), ("finetuned", finetuned))]
    states = [load_state(src, key=k) for src, k in
              zip((random, pretrained, finetuned), _keys(key))]
    states = align_states(states, labels)
    plan = make_plan(states, preset, labels=labels, groups=groups, classifier=classifier,
                     strict=strict)
    return transferability_from_states(states, plan, metric=metric, backend=backend,
                                       labels=labels)


def transferability_from_states(states: Sequence[dict[str, torch.Tensor]],
                                plan: Plan | None = None, *, metric: str = "l1_mean",
                                backend: str = "auto", labels: list[str] | None = None,
                                preset: str = "auto", groups: GroupsSource | None = None,
                                classifier: str | None = None,
                                strict: bool = False) -> TransferabilityResult:
    """`transferability` for loaded [θr, θA, θB] and a ready Plan (reused across models);
    without one, `make_plan(states, preset, groups=, classifier=, strict=)` (cached).

    Args:
        states: [θr, θA, θB], each {name: tensor} with names that already line up (no
            prefixes are removed here: see `io.names.align_states`). The plan's tensors
            (floating point as `make_plan` selects them; mixed dtypes are promoted) are
            compared on the device of θB's first one; θr's and θA's are moved there.
        plan: the tensors and groups to compare, e.g. `make_plan` of other files of the
            same architecture; every set must hold its tensors with one shape. None:
            made here from `preset`, `groups`, `classifier` and `strict`.
        metric: the distance D, one of METRICS (as in `transferability`).
        backend: "auto", "cpu", "cuda" or "torch" (as in `transferability`).
        labels: the three sets' names in messages; None: ["random", "pretrained",
            "finetuned"].
        preset: the preset of the plan made when `plan` is None (ignored otherwise).
        groups: custom groups of that plan, as in `transferability`.
        classifier: the classifier group or module of that plan, as in `transferability`.
        strict: as in `transferability`, for that plan.
    Returns:
        TransferabilityResult, as `transferability` (float64 sums; notes also issued as
        RuntimeWarning).
    Raises:
        TransferFastError: an unknown metric, preset or backend, or a backend that cannot
            reduce tensors on θB's device; a plan tensor missing from a set or of another
            shape; a bad groups file or list or `classifier`, or no tensor to compare
            (when the plan is made here); a NaN or Inf in a tensor.
        OSError: a groups file the system refuses to read.
    """
    labels = labels or ["random", "pretrained", "finetuned"]
    if plan is None:
        plan = make_plan(states, preset, labels=labels, groups=groups, classifier=classifier,
                         strict=strict)
    check_metric(metric)
    check_sets_agree(states, plan.names, labels)  # the Plan may come from other files
    sets = [[s[n] for n in plan.names] for s in states]
    device = sets[2][0].device  # compare where the fine-tuned set lives
    sets = [[t.to(device) for t in s] for s in sets]
    wanted = METRIC_SUMS[metric]
    sums = ops.multi_tensor_distance(sets[:2], sets[2:], backend=backend,
                                     sums=wanted)  # (2, 1, T, 5)
    notes = _check_finite(sums, sets, labels, plan.names, wanted)
    numel = torch.tensor([t.numel() for t in sets[0]], dtype=torch.float64)
    return result_from_sums(sums[:, 0].cpu(), plan, numel, metric=metric, notes=notes)


class PackedAnchors:
    """θr and θA packed once for many measurements of sets with the same names and shapes
    (a trajectory: the live model after every epoch).

    The plan's tensors get one flat `PackedLayout`; θr and θA are packed into a (2, L)
    buffer on `device` here, and each `measure(state)` packs `state` into a reused (1, L)
    buffer (one `_foreach_copy_`) and reduces it with one `packed_distance` call: O(1)
    kernel launches and host work per measurement whatever the number of tensors. The
    sums are those of `transferability_from_states` on the same tensors, bit for bit
    when they share one dtype.
    """

    def __init__(self, anchors: Sequence[Mapping[str, torch.Tensor]], plan: Plan,
                 device: torch.device | str, labels: list[str] | None = None):
        self.plan = plan
        self.labels = list(labels or ["random", "pretrained", "finetuned"])
        check_sets_agree(anchors, plan.names, self.labels[:2])
        sets = [[s[n] for n in plan.names] for s in anchors]
        self.layout = ops.PackedLayout.from_tensors(sets[0])
        dtype = functools.reduce(torch.promote_types, (t.dtype for s in sets for t in s))
        rows = []
        for tensors in sets:  # packed where the set lives, then moved as one buffer
            home = tensors[0].device
            row = self.layout.new_buffer(1, dtype=dtype, device=home)[0]
            rows.append(self.layout.pack([t.to(home) for t in tensors], out=row).to(device))
        self.anchors = torch.stack(rows)
        self.numel = torch.tensor(self.layout.numels, dtype=torch.float64)
        # Shapes only, to name a tensor a measured set lacks or has reshaped.
        self._shapes = {n: torch.empty(s, device="meta")
                        for n, s in zip(plan.names, self.layout.shapes)}
        self._target: torch.Tensor | None = None  # (1, L), made on the first measure

    def measure(self, state: Mapping[str, torch.Tensor], *, metric: str = "l1_mean",
                backend: str = "auto") -> TransferabilityResult:
        """T of `state` (the plan's names and shapes) against the packed anchors."""
        check_metric(metric)
        try:
            tensors = [state[n] for n in self.plan.names]
        except KeyError:
            self._check(state)
            raise
        dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors})
        if self._target is None or self._target.dtype != dtype:
            self._target = self.layout.new_buffer(1, dtype=dtype, device=self.anchors.device)
        try:
            self.layout.pack(tensors, out=self._target[0])
        except ValueError:
            self._check(state)
            raise
        wanted = METRIC_SUMS[metric]
        sums = ops.packed_distance(self.anchors, self._target, self.layout, backend=backend,
                                   sums=wanted)
        notes = []
        if not _all_finite(sums, wanted):  # name the NaN/Inf (or overflow)
            sets = [*(self.layout.unpack(row) for row in self.anchors), tensors]
            notes = _check_finite(sums, sets, self.labels, self.plan.names, wanted)
        return result_from_sums(sums[:, 0].cpu(), self.plan, self.numel, metric=metric,
                                notes=notes)

    def _check(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raises TransferFastError naming a tensor `state` lacks or has of another shape."""
        check_sets_agree([self._shapes, state], self.plan.names, self.labels[1:])


def result_from_sums(sums: torch.Tensor, plan: Plan, numel: torch.Tensor, *, metric: str,
                     notes: list[str] | None = None) -> TransferabilityResult:
    """T per group from the fused sums of one fine-tuned set: `sums` (2, T, 5) for the
    anchors (θr, θA) and the plan's T tensors, `numel` (T,) their element counts."""
    notes = list(notes or [])
    per_tensor = METRICS[metric](sums.double(), numel.double())  # (2, T)
    # cosine of a zero tensor (a bias at init) has no value: such tensors leave the
    # group means instead of turning every group into NaN.
    defined = torch.isfinite(per_tensor).all(0)
    excluded = dict(plan.excluded)
    undefined = [plan.names[t] for t in (~defined).nonzero().flatten().tolist()]
    for name in undefined:
        excluded[name] = f"{metric} undefined (zero norm)"
    if undefined:
        notes.append(f"{metric} undefined for {len(undefined)} zero-norm tensor(s), left out: "
                     f"{first_few(undefined, 3)}")
    index = torch.tensor(plan.group_index)
    weight = defined.double()
    count = torch.zeros(len(plan.groups), dtype=torch.float64).index_add_(0, index, weight)
    group_d = torch.zeros(2, len(plan.groups), dtype=torch.float64).index_add_(
        1, index, torch.where(defined, per_tensor, 0.0)) / count
    d_random, d_pretrained = group_d.tolist()
    values = []
    for g, num, den in zip(plan.groups, d_random, d_pretrained):
        values.append(num / den if den != 0 else (math.inf if num > 0 else math.nan))
        if not math.isfinite(values[-1]):
            notes.append(f"group {g}: D(random, finetuned) = {num:.6g}, "
                         f"D(pretrained, finetuned) = {den:.6g}, T = {values[-1]}")
    body = [v for g, v in zip(plan.groups, values) if g != plan.classifier]
    overall = sum(body) / len(body) if body else math.nan
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return TransferabilityResult(
        groups=list(plan.groups), values=values, overall=overall, d_random=d_random,
        d_pretrained=d_pretrained, excluded=excluded, classifier=plan.classifier,
        metric=metric, preset=plan.preset, warnings=notes)
