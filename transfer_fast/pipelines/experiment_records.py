"""The experiment's records: one per fine-tuning run (`RunRecord`), one per task
(`TaskMeasures`), how each score ranks the tasks (`ScoreAgreement`), what made the
results (`Provenance`), and the whole result (`ExperimentResult`, results.json)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io.files import json_safe
from ..measure.regression import TransferabilityModel


@dataclass
class RunRecord:
    """One fine-tuning run of the grid and what was measured of it. status: 'pending',
    then 'done' or 'failed' (why in `reason`); T: overall T (NaN unless measured);
    T_groups: T per layer group; G, G_frechet, D: its task's."""

    run: str
    task: str
    N: int
    seed: int
    lr: float
    status: str = "pending"
    reason: str = ""
    val_acc: float = math.nan
    checkpoint: Path | None = None
    trajectory: Path | None = None
    T: float = math.nan
    T_groups: dict[str, float] = field(default_factory=dict)
    G: float = math.nan
    G_frechet: float = math.nan
    D: float = math.nan

    @property
    def measured(self) -> bool:
        """Fine-tuned and with a finite positive T (a row the model can take)."""
        return self.status == "done" and math.isfinite(self.T) and self.T > 0

    def to_dict(self) -> dict:
        """JSON-ready, without the file paths."""
        return {k: v for k, v in asdict(self).items() if k not in ("checkpoint", "trajectory")}


@dataclass
class TaskMeasures:
    """One downstream task: its data, its statistics under the pre-trained network (G,
    G_frechet, D and the transferability `scores` on its training pool of `pool` images,
    `classes` classes) and, over its `measured` runs, the mean T and mean validation
    accuracy."""

    name: str
    shift: str
    data: str
    pool: int
    classes: int
    G: float
    G_frechet: float
    D: float
    scores: dict[str, float] = field(default_factory=dict)
    mean_T: float = math.nan
    mean_acc: float = math.nan
    measured: int = 0


@dataclass(frozen=True)
class ScoreAgreement:
    """How a score (or a static baseline, `baseline`) ranks the tasks against their mean
    T and mean accuracy: Kendall's tau-b and the weighted tau, over `tasks` tasks."""

    score: str
    baseline: bool
    tasks: int
    tau_T: float
    weighted_tau_T: float
    tau_acc: float
    weighted_tau_acc: float


@dataclass(frozen=True)
class Provenance:
    """What made the results: versions, the UTC start time, the command line ('Python
    API' when called as a function) and the first 12 hex digits of the sha256 of the
    validated config as canonical JSON (sorted keys, no spaces)."""

    package: str
    torch: str
    python: str
    date: str
    command: str
    config_hash: str


@dataclass
class ExperimentResult:
    """Per run records, per task measures, the fitted model, the scores' agreement with
    the measured T and accuracy, and where the report is."""

    out: Path
    runs: list[RunRecord]
    tasks: dict[str, TaskMeasures]
    groups: list[str]
    classifier: str | None
    report: Path
    model: TransferabilityModel | None = None  # None when it could not be fitted
    notes: list[str] = field(default_factory=list)
    agreements: list[ScoreAgreement] = field(default_factory=list)
    provenance: Provenance | None = None

    def to_dict(self) -> dict:
        """results.json: everything but the file paths, JSON-ready."""
        return json_safe({
            "provenance": asdict(self.provenance) if self.provenance else None,
            "runs": [r.to_dict() for r in self.runs],
            "tasks": {name: asdict(t) for name, t in self.tasks.items()},
            "groups": list(self.groups), "classifier": self.classifier,
            "agreements": [asdict(a) for a in self.agreements],
            "model": self.model.to_dict() if self.model else None, "notes": list(self.notes)})
