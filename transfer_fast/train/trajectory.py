"""T per layer group after every fine-tuning epoch: how the network leaves θA.

One Plan is made before the first epoch, and θr and θA are packed once into a flat
buffer on the model's device (`PackedAnchors`); each record packs the live parameters
into a reused buffer (one `_foreach_copy_`) and reduces them with one `packed_distance`
call.
θr and θA carry the pre-training head while the fine-tuned model has a new one:
where the class counts differ the plan leaves the head out by its shape; where
they agree it is left out by name (`replaced`), since a fresh head has no
distance to θA worth measuring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..io.files import write_json
from ..measure.plan import Plan, make_plan
from ..measure.transferability import PackedAnchors, TransferabilityResult, check_metric

_LABELS = ["random (θr)", "pretrained (θA)", "fine-tuning model"]


def without(plan: Plan, names: Sequence[str], reason: str) -> Plan:
    """`plan` with the tensors `names` moved to `excluded`; groups left empty disappear."""
    drop = set(names) & set(plan.names)
    if not drop:
        return plan
    keep = [i for i, n in enumerate(plan.names) if n not in drop]
    groups = list(dict.fromkeys(plan.groups[plan.group_index[i]] for i in keep))
    return Plan(
        preset=plan.preset,
        names=tuple(plan.names[i] for i in keep),
        group_index=tuple(groups.index(plan.groups[plan.group_index[i]]) for i in keep),
        groups=tuple(groups),
        classifier=plan.classifier if plan.classifier in groups else None,
        excluded={**plan.excluded, **{n: reason for n in plan.names if n in drop}},
    )


def _module_of(names: Sequence[str]) -> str | None:
    """The module holding every tensor of `names` ('fc' for fc.weight, fc.bias)."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) or None


class Trajectory:
    """T of the fine-tuning model against θr and θA, one row per recorded epoch.

    `random`, `pretrained`: θr and θA state dicts; `current`: the model's state
    (names and shapes fix the plan); `replaced`: tensor names of the new head.
    """

    def __init__(self, random: Mapping[str, torch.Tensor],
                 pretrained: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor],
                 *, replaced: Sequence[str] = (), preset: str = "auto",
                 metric: str = "l1_mean", backend: str = "auto"):
        check_metric(metric)
        # The new head is the classifier: named so, a head whose class count differs from
        # θA's is left out by its shape, and one that matches is dropped by name below.
        plan = make_plan([random, pretrained, current], preset, labels=_LABELS,
                         classifier=_module_of(replaced))
        plan = without(plan, replaced, "classifier replaced for fine-tuning")
        self.plan = plan
        device = next(iter(current.values())).device
        # Packed once where the model lives: every record then packs the model beside them.
        self._packed = PackedAnchors([random, pretrained], self.plan, device, _LABELS)
        self.metric, self.backend = metric, backend
        self.epochs: list[int] = []
        self.values: list[list[float]] = []  # (epochs, groups)
        self.overall: list[float] = []

    def record(self, epoch: int, current: Mapping[str, torch.Tensor]) -> TransferabilityResult:
        """Appends T of `current` (the model after `epoch`) per group and overall."""
        result = self._packed.measure(current, metric=self.metric, backend=self.backend)
        self.epochs.append(epoch)
        self.values.append(result.values)
        self.overall.append(result.overall)
        return result

    def records(self) -> dict:
        """The rows so far (what a resumed run needs back)."""
        return {"epochs": list(self.epochs), "T": [list(v) for v in self.values],
                "overall": list(self.overall)}

    def restore(self, records: Mapping) -> None:
        self.epochs = list(records["epochs"])
        self.values = [list(v) for v in records["T"]]
        self.overall = list(records["overall"])

    def to_dict(self) -> dict:
        return {"groups": list(self.plan.groups), "metric": self.metric,
                "preset": self.plan.preset, **self.records(),
                "excluded": dict(self.plan.excluded)}

    def save(self, path: str | Path) -> Path:
        """to_dict() as strict JSON (inf/nan as strings), atomically."""
        return write_json(path, self.to_dict())

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """T per group against the epoch, coloured by depth; the overall mean thick, black."""
        # The one allowed upward import (only inside `plot`): figures live in report/.
        from ..report.figures import save_figure, trajectory_figure
        return save_figure(trajectory_figure(self, title=title), path)
