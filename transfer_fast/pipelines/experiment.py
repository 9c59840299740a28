"""`transfer-fast experiment CONFIG`: the paper's study on a grid of downstream runs.

Pre-train once, fine-tune every (task, data amount, seed, learning rate), then measure
T of every run with `scan`, the domain gap G (BN statistics and Fréchet), the
intraclass variance D and N per task, fit log T ~ G + D + log N, and write report.md
(and report.html) with its figures. Rerunning the same folder skips finished work.

Folder layout: experiment.json (the config it was made with), pretrain/ (θr, θA),
runs/<task>-n<N>-s<seed>[-lr<lr>]/ (θB, sidecar, trajectory), scan/ (T tables),
stats/ (FeatureStats per data set), runs.csv, report.md, figures/.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import TransferFastError
from ..io.checkpoints import load_state
from ..io.files import write_csv
from ..io.runfolder import claim
from ..measure.features import FeatureStats, batchnorm_layers
from ..measure.frechet import frechet_distance
from ..measure.gap import bn_gap, intraclass_variance
from ..measure.plan import make_plan
from ..ops.devices import resolve_device
from ..train.finetune import finetune, pretrain
from ..train.models import build_model
from .experiment_config import config_cost, load_config
from .experiment_data import apply_shift, load_source, split, subset
from .scan import scan


@dataclass
class ExperimentResult:
    """Per run rows (T, G, D, N, status...), per task measures, and where the report is."""

    out: Path
    runs: list[dict]
    tasks: dict[str, dict]
    groups: list[str]
    classifier: str | None
    report: Path
    model: object = None  # the fitted TransferabilityModel, None when it could not be fitted
    notes: list[str] = field(default_factory=list)


def _grid(cfg: dict) -> list[dict]:
    e = cfg["experiment"]
    lrs = e["learning_rates"] or [cfg["finetune"]["lr"]]
    runs = []
    for task in cfg["task"]:
        for n in e["data_amounts"]:
            for seed in e["seeds"]:
                for lr in lrs:
                    run = f"{task['name']}-n{n}-s{seed}" + (f"-lr{lr:g}" if len(lrs) > 1 else "")
                    runs.append({"run": run, "task": task["name"], "N": n, "seed": seed,
                                 "lr": lr})
    return runs


def _load_tasks(cfg: dict) -> tuple[dict, dict]:
    """Pre-training and task data, split; every size problem reported at once."""
    e = cfg["experiment"]
    pre_x, pre_y = load_source(cfg["pretrain"]["data"])
    data = {"pretrain": split(pre_x, pre_y, e["val_fraction"])}
    errors = _class_problems("the pre-training data", pre_y)
    for task in cfg["task"]:
        x, y = load_source(task["data"])
        x = apply_shift(x, task["shift"], task["strength"], seed=1234)
        if x.shape[1:] != pre_x.shape[1:]:
            errors.append(f"task {task['name']}: images {tuple(x.shape[1:])} differ from the "
                          f"pre-training images {tuple(pre_x.shape[1:])}")
        data[task["name"]] = split(x, y, e["val_fraction"])
        pool = len(data[task["name"]][0][0])
        too_big = [n for n in e["data_amounts"] if n > pool]
        if too_big:
            errors.append(f"task {task['name']}: data amounts {too_big} exceed its {pool} "
                          "training samples")
        errors += _class_problems(f"task {task['name']}", y)
    if errors:
        raise TransferFastError("; ".join(errors))
    classes = {name: int(torch.cat([p[1], v[1]]).max()) + 1 for name, (p, v) in data.items()}
    return data, classes


def _class_problems(what: str, y: torch.Tensor) -> list[str]:
    """A model head has max(label) + 1 outputs: every one of them needs samples."""
    missing = sorted(set(range(int(y.max()) + 1)) - set(y.tolist()))
    if int(y.max()) < 1 or missing:
        return [f"{what}: needs at least two classes, each label 0..{int(y.max())} with "
                f"samples (none for {missing})"]
    return []


def run_experiment(config, out: str | Path | None = None, *, html: bool = False,
                   progress: bool = True, allow_code: bool = False,
                   allow_large: bool = False) -> ExperimentResult:
    """Runs (or resumes) the experiment of `config` (a TOML path or a dict) into `out`.

    Args:
        config: a TOML path or a dict (see `transfer-fast demo --print-config`).
        out: the run folder (default runs/<experiment.name>); rerunning it resumes.
        html: also write one self-contained report.html.
        allow_code: allow `model.arch = "package.module:function"` to import code.
        allow_large: allow a grid above the limits of experiment_config (runs, memory).
    Returns:
        ExperimentResult (runs, per-task measures, groups, the report's path).
    Raises:
        TransferFastError: a bad config or data, or a folder of another config or in use.
    """
    cfg = load_config(config, allow_code=allow_code, allow_large=allow_large)
    out = Path(out or Path("runs") / cfg["experiment"]["name"])
    if progress:
        print(config_cost(cfg).describe())
    data, classes = _load_tasks(cfg)  # before anything is written: bad data fails fast
    with claim(out, cfg, marker="experiment.json", require_empty=True):
        return _run(cfg, out, data, classes, html=html, progress=progress)


def _run(cfg: dict, out: Path, data: dict, classes: dict, *, html: bool,
         progress: bool) -> ExperimentResult:
    from ..report.experiment import write_report

    e, arch = cfg["experiment"], cfg["model"]["arch"]
    device = str(resolve_device(e["device"], what="experiment.device"))
    channels = data["pretrain"][0][0].shape[1]

    def model_fn():
        return build_model(arch, classes["pretrain"], in_channels=channels)

    p = cfg["pretrain"]
    pre = pretrain(model_fn, *data["pretrain"], out=out / "pretrain", epochs=p["epochs"],
                   lr=p["lr"], batch_size=p["batch_size"], seed=p["seed"], device=device,
                   progress=progress)
    if pre.status != "done":
        raise TransferFastError(f"pre-training failed ({pre.reason}); see {out / 'pretrain'}")

    runs = _grid(cfg)
    f = cfg["finetune"]
    bar = tqdm(runs, desc="fine-tuning runs", unit="run", disable=None if progress else True)
    for row in bar:
        bar.set_postfix_str(row["run"])
        train = subset(data[row["task"]][0], row["N"], row["seed"])
        result = finetune(model_fn, pre.checkpoint, train, data[row["task"]][1],
                          num_classes=classes[row["task"]], out=out / "runs" / row["run"],
                          epochs=f["epochs"], lr=row["lr"], batch_size=f["batch_size"],
                          seed=row["seed"], random=pre.random, preset=e["preset"],
                          metric=e["metric"], device=device, progress=progress)
        row.update(status=result.status, reason=result.reason or "", val_acc=result.best_acc,
                   checkpoint=result.checkpoint, trajectory=result.trajectory)

    groups, classifier = _measure_t(out, runs, pre, e, progress)
    notes: list[str] = []
    tasks = _measure_data(out, cfg, data, pre.checkpoint, model_fn, device, progress, notes)
    for row in runs:
        row.update({k: tasks[row["task"]][k] for k in ("G", "G_frechet", "D")})
    _write_runs_csv(out / "runs.csv", runs)
    result = ExperimentResult(out, runs, tasks, groups, classifier, out / "report.md",
                              notes=notes)
    write_report(result, cfg, html=html)
    return result


def _measure_t(out: Path, runs: list[dict], pre, e: dict, progress: bool
               ) -> tuple[list[str], str | None]:
    """T per run and per group, through one scan of every finished run; the groups in
    network order and the classifier group (not in the overall)."""
    done = [r for r in runs if r["status"] == "done"]
    if not done:
        raise TransferFastError("every fine-tuning run failed: nothing to measure "
                                f"(see the sidecars under {out / 'runs'})")
    manifest = out / "manifest.csv"
    write_csv(manifest, ["path", "run"],
              [[str(Path(r["checkpoint"]).resolve()), r["run"]] for r in done])
    scan(manifest=manifest, random=pre.random, pretrained=pre.checkpoint, out=out / "scan",
         preset=e["preset"], metric=e["metric"], progress=progress)
    by_run = {r["run"]: r for r in runs}
    with open(out / "scan" / "summary.csv") as fh:
        for rec in csv.DictReader(fh):
            row = by_run[rec["run"]]
            row["T"] = float(rec["overall_T"]) if rec["status"] == "ok" else math.nan
            if rec["status"] != "ok":
                row.update(status="failed", reason=rec["error"])
    if not any(math.isfinite(r.get("T", math.nan)) and r["T"] > 0 for r in runs):
        raise TransferFastError(f"no fine-tuned run has a finite positive T (see "
                                f"{out / 'scan' / 'summary.csv'}): nothing to report")
    groups: list[str] = []
    with open(out / "scan" / "results.csv") as fh:
        for rec in csv.DictReader(fh):
            row = by_run[rec["run"]]
            row.setdefault("T_groups", {})[rec["group"]] = float(rec["T"])
            if rec["group"] not in groups:
                groups.append(rec["group"])
    states = [load_state(p) for p in (pre.random, pre.checkpoint, done[0]["checkpoint"])]
    return groups, make_plan(states, e["preset"]).classifier


def _measure_data(out: Path, cfg: dict, data: dict, pretrained: Path, model_fn, device: str,
                  progress: bool, notes: list[str]) -> dict[str, dict]:
    """G (BN gap and Fréchet against the pre-training data), D and the pool size per task;
    warnings (an ill-conditioned Fréchet distance) go to `notes` for the report."""
    model = model_fn()
    model.load_state_dict(load_state(pretrained))
    model.to(device).eval()
    (out / "stats").mkdir(exist_ok=True)
    metric = cfg["experiment"]["gap_metric"]

    def stats_of(name: str) -> FeatureStats:
        x, y = data[name][0]
        with FeatureStats(model, num_classes=int(y.max()) + 1) as stats:
            stats.accumulate(zip(x.split(256), y.split(256)), progress=progress,
                             desc=f"statistics {name}")
        stats.metadata.update(data=name)
        stats.save(out / "stats" / f"{name}.safetensors")
        return stats

    has_bn = bool(batchnorm_layers(model))
    if not has_bn:
        notes.append("the model has no BatchNorm layer: G is the Fréchet distance of the "
                     "penultimate features to the pre-training data")
    reference = stats_of("pretrain")
    tasks = {}
    for task in cfg["task"]:
        stats = stats_of(task["name"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fd = frechet_distance(reference, stats)
        notes += [f"task {task['name']}: {w.message}" for w in caught]
        tasks[task["name"]] = {
            "G": bn_gap(model, stats, metric=metric).mean if has_bn else fd.distance,
            "G_frechet": fd.distance,
            "D": intraclass_variance(stats).normalised,
            "pool": len(data[task["name"]][0][0]),
            "shift": task["shift"], "data": task["data"]}
    return tasks


RUN_COLUMNS = ("run", "task", "N", "seed", "lr", "status", "T", "G", "G_frechet", "D",
               "val_acc", "reason")


def _write_runs_csv(path: Path, runs: list[dict]) -> None:
    write_csv(path, RUN_COLUMNS, [[r.get(c, "") for c in RUN_COLUMNS] for r in runs])
