"""`transfer-fast experiment CONFIG`: the paper's study on a grid of downstream runs.

Pre-train once, fine-tune every (task, data amount, seed, learning rate), then measure
T of every run with `scan`, the domain gap G (BN statistics and Fréchet), the
intraclass variance D, N and the transferability scores (LogME, H-score, ...) per task,
fit log T ~ G + D + log N with errors clustered by task, rank the scores against the
measured T and accuracy, and write report.md (and report.html) with its figures.
Rerunning the same folder skips finished work.

Folder layout: experiment.json (the config it was made with), pretrain/ (θr, θA),
runs/<task>-n<N>-s<seed>[-lr<lr>]/ (θB, sidecar, trajectory), manifest.csv and scan/
(T tables, for people: the numbers come back from `scan` as records), stats/
(FeatureStats per data set), runs.csv, results.json, report.md, figures/.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shlex
import statistics
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import TransferFastError
from ..io.checkpoints import load_state
from ..io.files import json_safe, write_csv
from ..io.runfolder import claim
from ..io.streaming import StreamedCheckpoint
from ..measure.agreement import kendall_tau, weighted_tau
from ..measure.features import FeatureStats, batchnorm_layers, penultimate_layer
from ..measure.frechet import frechet_distance
from ..measure.gap import bn_gap, intraclass_variance
from ..measure.plan import make_plan
from ..measure.regression import TransferabilityModel, fit_transferability_model
from ..measure.score_stats import ScoreStats
from ..ops.devices import resolve_device
from ..train.finetune import finetune, pretrain
from ..train.models import build_model
from .experiment_config import config_cost, load_config
from .experiment_data import apply_shift, load_source, split, subset
from .experiment_records import (
    ExperimentResult,
    Provenance,
    RunRecord,
    ScoreAgreement,
    TaskMeasures,
)
from .scan import scan

BOOTSTRAP = 1000  # cluster (task) resamples for the model's confidence intervals
# Static baselines a score must beat: task properties known before any training, signed so
# that larger means "expected more transferable". -G: the first consensus (smaller gap,
# higher T). -classes: every run trains on N images drawn from its task's pool with the
# same N grid for every task, so the pool size never reaches a run; the number of classes
# does (chance accuracy is 1/C, and there is more to learn).
MAX_CLASS_GRAM_BYTES = 1 << 30  # TransRate's per-class Grams, per task, at most
BASELINES = {"-G": lambda task: -task.G, "-classes": lambda task: -float(task.classes)}


def _grid(cfg: dict) -> list[RunRecord]:
    e = cfg["experiment"]
    lrs = e["learning_rates"] or [cfg["finetune"]["lr"]]
    return [RunRecord(f"{task['name']}-n{n}-s{seed}" + (f"-lr{lr:g}" if len(lrs) > 1 else ""),
                      task["name"], n, seed, lr)
            for task in cfg["task"] for n in e["data_amounts"] for seed in e["seeds"]
            for lr in lrs]


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
        ExperimentResult (runs, per-task measures, the model, the scores' agreement,
        provenance, the report's path).
    Raises:
        TransferFastError: a bad config or data, or a folder of another config or in use.
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cfg = load_config(config, allow_code=allow_code, allow_large=allow_large)
    out = Path(out or Path("runs") / cfg["experiment"]["name"])
    if progress:
        print(config_cost(cfg).describe())
    data, classes = _load_tasks(cfg)  # before anything is written: bad data fails fast
    with claim(out, cfg, marker="experiment.json", require_empty=True):
        return _run(cfg, out, data, classes, html=html, progress=progress,
                    provenance=_provenance(cfg, started))


def _command() -> str:
    """The command line when the CLI runs (`transfer-fast ...` or `python -m
    transfer_fast ...`); 'Python API' when run_experiment is called from other code."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if argv0.name == "__main__.py" and argv0.parent.name == "transfer_fast":
        return shlex.join(["python", "-m", "transfer_fast", *sys.argv[1:]])
    if argv0.name.startswith("transfer-fast"):
        return shlex.join(["transfer-fast", *sys.argv[1:]])
    return "Python API"


def _provenance(cfg: dict, started: str) -> Provenance:
    from .. import __version__  # the package root, imported by the time this runs

    canonical = json.dumps(json_safe(cfg), sort_keys=True, separators=(",", ":"))
    return Provenance(package=__version__, torch=torch.__version__,
                      python=platform.python_version(), date=started, command=_command(),
                      config_hash=hashlib.sha256(canonical.encode()).hexdigest()[:12])


def _run(cfg: dict, out: Path, data: dict, classes: dict, *, html: bool, progress: bool,
         provenance: Provenance) -> ExperimentResult:
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
    for run in bar:
        bar.set_postfix_str(run.run)
        train = subset(data[run.task][0], run.N, run.seed)
        done = finetune(model_fn, pre.checkpoint, train, data[run.task][1],
                        num_classes=classes[run.task], out=out / "runs" / run.run,
                        epochs=f["epochs"], lr=run.lr, batch_size=f["batch_size"],
                        seed=run.seed, random=pre.random, preset=e["preset"],
                        metric=e["metric"], device=device, progress=progress)
        run.status, run.reason, run.val_acc = done.status, done.reason or "", done.best_acc
        run.checkpoint, run.trajectory = done.checkpoint, done.trajectory

    groups, classifier = _measure_t(out, runs, pre, e, progress)
    notes: list[str] = []
    tasks = _measure_data(out, cfg, data, classes, pre.checkpoint, model_fn, device, progress,
                          notes)
    for run in runs:
        task = tasks[run.task]
        run.G, run.G_frechet, run.D = task.G, task.G_frechet, task.D
    _summarise_tasks(tasks, runs)
    _write_runs_csv(out / "runs.csv", runs)
    result = ExperimentResult(out, runs, tasks, groups, classifier, out / "report.md",
                              model=_fit(runs, notes), notes=notes,
                              agreements=_agreements(tasks), provenance=provenance)
    write_report(result, cfg, html=html)
    return result


def _measure_t(out: Path, runs: list[RunRecord], pre, e: dict, progress: bool
               ) -> tuple[list[str], str | None]:
    """T per run and per group, from the records of one scan of every finished run; the
    groups in network order and the classifier group (not in the overall)."""
    done = [r for r in runs if r.status == "done"]
    if not done:
        raise TransferFastError("every fine-tuning run failed: nothing to measure "
                                f"(see the sidecars under {out / 'runs'})")
    manifest = out / "manifest.csv"
    write_csv(manifest, ["path", "run"],
              [[str(Path(r.checkpoint).resolve()), r.run] for r in done])
    scanned = scan(manifest=manifest, random=pre.random, pretrained=pre.checkpoint,
                   out=out / "scan", preset=e["preset"], metric=e["metric"], progress=progress)
    records = {rec.path: rec for rec in scanned.records}  # keyed by resolved path
    groups: list[str] = []
    for run in done:
        rec = records.get(str(Path(run.checkpoint).resolve()))
        if rec is None or rec.status != "ok":
            run.status = "failed"
            run.reason = rec.error if rec is not None else "not measured by the scan"
            continue
        run.T, run.T_groups = float(rec.overall), dict(zip(rec.groups, map(float, rec.T)))
        groups += [g for g in rec.groups if g not in groups]
    if not any(r.measured for r in runs):
        raise TransferFastError(f"no fine-tuned run has a finite positive T (see "
                                f"{out / 'scan' / 'summary.csv'}): nothing to report")
    if scanned.plan is not None:
        return groups, scanned.plan.classifier
    # Every run was measured before: plan from the names and shapes of the three files.
    states = []
    for path in (pre.random, pre.checkpoint, done[0].checkpoint):
        with StreamedCheckpoint(path) as ck:
            states.append({n: ck.meta(n) for n in ck.shapes})
    return groups, make_plan(states, e["preset"]).classifier


def _measure_data(out: Path, cfg: dict, data: dict, classes: dict, pretrained: Path, model_fn,
                  device: str, progress: bool, notes: list[str]) -> dict[str, TaskMeasures]:
    """G (BN gap and Fréchet against the pre-training data), D, the pool size and the
    transferability scores per task, from one pass of the pre-trained network over each
    training pool; warnings (an ill-conditioned Fréchet distance, a score that cannot be
    computed) go to `notes` for the report."""
    model = model_fn()
    model.load_state_dict(load_state(pretrained))
    model.to(device).eval()
    (out / "stats").mkdir(exist_ok=True)
    metric = cfg["experiment"]["gap_metric"]

    def stats_of(name: str, scores: ScoreStats | None = None) -> FeatureStats:
        x, y = data[name][0]
        # The pre-trained head's softmax is the source model's prediction (NCE, LEEP).
        with FeatureStats(model, num_classes=int(y.max()) + 1, scores=scores,
                          source_probs=scores is not None) as stats:
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
        name = task["name"]
        scores = ScoreStats(per_class_gram=_class_grams_fit(model, classes[name], name, notes))
        stats = stats_of(name, scores)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fd = frechet_distance(reference, stats)
        notes += [f"task {name}: {w.message}" for w in caught]
        try:
            values = scores.compute()
        except TransferFastError as exc:
            notes.append(f"task {name}: no transferability scores ({exc})")
            values = {}
        tasks[name] = TaskMeasures(
            name=name, shift=task["shift"], data=task["data"], pool=len(data[name][0][0]),
            classes=classes[name],
            G=bn_gap(model, stats, metric=metric).mean if has_bn else fd.distance,
            G_frechet=fd.distance, D=intraclass_variance(stats).normalised, scores=values)
    return tasks


def _class_grams_fit(model, classes: int, task: str, notes: list[str]) -> bool:
    """Whether TransRate's per-class Grams (classes x D^2 float64) stay within
    MAX_CLASS_GRAM_BYTES; if not, the task's scores go without TransRate (noted)."""
    head = penultimate_layer(model)
    dim = getattr(dict(model.named_modules())[head], "in_features", 0) if head else 0
    need = classes * dim * dim * 8
    if need > MAX_CLASS_GRAM_BYTES:
        notes.append(f"task {task}: no TransRate (its {classes} class Grams of {dim} features "
                     f"would take {need / 2**30:.1f} GiB)")
    return need <= MAX_CLASS_GRAM_BYTES


def _finite_mean(values) -> float:
    values = [float(v) for v in values if math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _summarise_tasks(tasks: dict[str, TaskMeasures], runs: list[RunRecord]) -> None:
    """Per task, in place: its measured runs, their mean T and mean validation accuracy."""
    for task in tasks.values():
        mine = [r for r in runs if r.task == task.name and r.measured]
        task.measured = len(mine)
        task.mean_T = _finite_mean(r.T for r in mine)
        task.mean_acc = _finite_mean(r.val_acc for r in mine if r.val_acc >= 0)


def _taus(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    if len(pairs) < 2:
        return math.nan, math.nan
    x, y = zip(*pairs)
    return kendall_tau(x, y), weighted_tau(x, y)


def _agreements(tasks: dict[str, TaskMeasures]) -> list[ScoreAgreement]:
    """Every score and baseline against the tasks' mean T and mean accuracy, over the tasks
    where all three are finite."""
    names = list(dict.fromkeys(k for t in tasks.values() for k in t.scores))
    values = [(k, False, lambda t, k=k: t.scores.get(k, math.nan)) for k in names]
    values += [(k, True, fn) for k, fn in BASELINES.items()]
    out = []
    for name, baseline, value in values:
        rows = [(value(t), t.mean_T, t.mean_acc) for t in tasks.values()]
        rows = [r for r in rows if all(math.isfinite(v) for v in r)]
        tau_t, wtau_t = _taus([(v, t) for v, t, _ in rows])
        tau_a, wtau_a = _taus([(v, a) for v, _, a in rows])
        out.append(ScoreAgreement(name, baseline, len(rows), tau_t, wtau_t, tau_a, wtau_a))
    return out


def _fit(runs: list[RunRecord], notes: list[str]) -> TransferabilityModel | None:
    """log T ~ G + D + log N over the measured runs, errors clustered by task (G and D
    take one value per task); None, with the reason in `notes`, when it cannot be fitted."""
    rows = [r for r in runs if r.measured]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the model's own notes say the same
            model = fit_transferability_model(rows, groups=[r.task for r in rows],
                                              bootstrap=BOOTSTRAP, seed=0)
    except TransferFastError as exc:
        notes.append(f"the explanatory model was not fitted: {exc}")
        return None
    notes += model.warnings
    return model


RUN_COLUMNS = ("run", "task", "N", "seed", "lr", "status", "T", "G", "G_frechet", "D",
               "val_acc", "reason")


def _write_runs_csv(path: Path, runs: list[RunRecord]) -> None:
    write_csv(path, RUN_COLUMNS, [[getattr(r, c) for c in RUN_COLUMNS] for r in runs])
