"""The training loop of pretrain/finetune: epochs, validation, best parameters, resume.

A run's folder `out` holds config-<kind>.json (its options: the folder is claimed with a
lock, and a rerun with other options is refused), resume-<kind>.pt (replaced atomically
after every epoch, removed at the end: a killed run goes on from there), the best
checkpoint (pretrained.safetensors or finetuned.safetensors) and its JSON sidecar,
written last (config, seed, accuracy per epoch, N, classes, time, status: a rerun
returns the recorded result). On the CPU a seed fixes every bit (one machine, one
thread count), and a resumed run ends as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TransferFastError, check_labels
from ..io.files import save_tensors, write_json
from ..io.runfolder import claim
from ..ops.devices import resolve_device
from .batches import Batches, Data
from .config import AMP_DTYPES, TrainConfig
from .resume import load_resume, rng_state, save_resume, set_rng_state
from .trajectory import Trajectory

_CHECKPOINT = {"pretrain": "pretrained", "finetune": "finetuned"}
RANDOM = "random.safetensors"


@dataclass
class TrainResult:
    """What a pretrain/finetune run produced; `status` 'done' or 'failed' (see `reason`)."""

    kind: str
    status: str
    reason: str | None
    out: Path
    checkpoint: Path | None  # θA (pretrain) or θB (finetune); None when failed
    random: Path | None  # θr: written by pretrain, the trajectory's anchor in finetune
    history: list[dict]  # per epoch: epoch, lr, train_loss, val_acc
    best_acc: float
    best_epoch: int
    seconds: float
    trajectory: Path | None = None

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}



class TrainingRun:
    """One training run bound to its (claimed) folder: the epochs, the best parameters, the
    resume state after each epoch and the sidecar that marks the run ended."""

    def __init__(self, kind: str, model: nn.Module, train: Data, val: Data, opts: TrainConfig, *,
                 out: str | Path, head: str, num_classes: int, extra: dict):
        self.kind, self.opts, self.num_classes = kind, opts, num_classes
        self.device = resolve_device(opts.device, what="device")
        cuda = self.device.type == "cuda"
        self.amp = AMP_DTYPES[opts.amp] if cuda else None  # CPU runs stay in float32
        self.channels_last = opts.channels_last and cuda
        batches = dict(batch_size=opts.batch_size, seed=opts.seed, num_workers=opts.num_workers,
                       device=self.device)
        self.train_set = Batches(train, "training", shuffle=True, **batches)
        self.val_set = Batches(val, "validation", shuffle=False, **batches)
        for b in (self.train_set, self.val_set):
            if b.labels is not None:
                check_labels(b.labels, num_classes=num_classes, what=f"{b.role} labels")
        # Unknown labels (a generic Dataset) are checked batch by batch in the first epoch.
        self.unchecked = [b for b in (self.train_set, self.val_set) if b.labels is None]
        self.model = model.to(self.device, memory_format=torch.channels_last) \
            if self.channels_last else model.to(self.device)
        self.config = json.loads(json.dumps({
            "kind": kind, "model": type(model).__qualname__, **opts.recorded(), "head": head,
            "classes": num_classes, "N": self.train_set.n, "N_val": self.val_set.n, **extra}))
        self.out = Path(out)
        self.name = _CHECKPOINT[kind]
        self.resume_path = self.out / f"resume-{kind}.pt"
        self._prepare()
        self.resuming = self.resume_path.exists()

    def _prepare(self) -> None:
        """Claims the folder for this run: locked, and refused when made with other options."""
        self.claim = claim(self.out, self.config, marker=f"config-{self.kind}.json")

    def finished(self) -> TrainResult | None:
        """The recorded result when this run already ended (done or failed)."""
        path = self.out / f"{self.name}.json"
        return _result(self.out, json.loads(path.read_text())) if path.exists() else None

    def _autocast(self):
        return (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                else contextlib.nullcontext())

    def _inputs(self, x: torch.Tensor, y: torch.Tensor):
        if self.channels_last and x.dim() == 4:
            x = x.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _epoch(self, opt: torch.optim.Optimizer, scaler) -> float:
        """One pass over the training data; the mean batch loss (one host sync)."""
        check = self.train_set in self.unchecked
        self.model.train()
        total, steps = torch.zeros((), device=self.device), 0
        for x, y in self.train_set:
            if check:
                check_labels(y, num_classes=self.num_classes, what="training labels")
            x, y = self._inputs(x, y)
            with self._autocast():
                loss = nn.functional.cross_entropy(self.model(x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            total += loss.detach()
            steps += 1
        if steps == 0:
            raise TransferFastError("the training data gave no batch (fewer samples than one "
                                    "batch with drop_last?)")
        return (total / steps).item()

    @torch.no_grad()
    def _evaluate(self) -> float:
        check = self.val_set in self.unchecked
        self.model.eval()
        correct, seen = torch.zeros((), dtype=torch.int64, device=self.device), 0
        for x, y in self.val_set:
            if check:
                check_labels(y, num_classes=self.num_classes, what="validation labels")
            x, y = self._inputs(x, y)
            with self._autocast():
                correct += (self.model(x).argmax(1) == y).sum()
            seen += len(y)  # a loader may drop a last partial batch
        if seen == 0:
            raise TransferFastError("the validation data gave no batch")
        return correct.item() / seen

    def train(self, trajectory: Trajectory | None, *, resume: bool, progress: bool,
              on_epoch) -> TrainResult:
        """Runs the remaining epochs; `resume` writes the resume state after each one."""
        o, model = self.opts, self.model
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                              weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: o.lr_factor(epoch))
        scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        s = {"epoch": 0, "best": None, "best_acc": -1.0, "best_epoch": 0, "history": [],
             "seconds": 0.0}
        if self.resuming:
            s = self._restore(opt, sched, scaler, trajectory)
        status, reason = "done", None
        with tqdm(total=o.epochs, initial=s["epoch"], desc=self.kind, unit="epoch",
                  leave=False, disable=None if progress else True) as bar:
            for epoch in range(s["epoch"] + 1, o.epochs + 1):
                start, lr = time.perf_counter(), opt.param_groups[0]["lr"]
                loss = self._epoch(opt, scaler)
                sched.step()
                if not math.isfinite(loss):  # diverged: recorded, not raised
                    status, reason = "failed", f"loss is {loss} in epoch {epoch}"
                    break
                acc = self._evaluate()
                self.unchecked = []
                if acc > s["best_acc"]:  # the paper keeps the best-validation parameters
                    s["best"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    s["best_acc"], s["best_epoch"] = acc, epoch
                if trajectory is not None:
                    trajectory.record(epoch, model.state_dict())
                record = {"epoch": epoch, "lr": lr, "train_loss": loss, "val_acc": acc}
                s["history"].append(record)
                s["epoch"] = epoch
                s["seconds"] += time.perf_counter() - start
                if resume:
                    self._save_resume(s, opt, sched, scaler, trajectory)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{acc:.3f}",
                                best=f"{s['best_acc']:.3f}")
                if on_epoch is not None:
                    on_epoch(dict(record))
        return self._finish(s, status, reason, trajectory)

    def _save_resume(self, s: dict, opt, sched, scaler, trajectory) -> None:
        state = {**s, "model": self.model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else {},
                 "rng": rng_state(self.train_set.generator),
                 "trajectory": trajectory.records() if trajectory is not None else None}
        save_resume(self.resume_path, state)

    def _restore(self, opt, sched, scaler, trajectory) -> dict:
        state = load_resume(self.resume_path)
        self.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.train_set.generator)
        if trajectory is not None:
            trajectory.restore(state["trajectory"])
        self.unchecked = []  # the first epoch, which checked them, is done
        best = {k: v.to(self.device) for k, v in state["best"].items()}
        return {**{k: state[k] for k in ("epoch", "best_acc", "best_epoch", "history",
                                         "seconds")}, "best": best}

    def _finish(self, s: dict, status: str, reason: str | None,
                trajectory: Trajectory | None) -> TrainResult:
        """Writes θ (when done), the trajectory, then the sidecar that marks the run ended."""
        checkpoint = f"{self.name}.safetensors" if status == "done" else None
        if checkpoint:
            save_tensors(self.out / checkpoint, s["best"])
        if trajectory is not None:
            trajectory.save(self.out / "trajectory.json")
            trajectory.plot(self.out / "trajectory.png",
                            title=f"Transferability during fine-tuning ({self.out.name})")
        sidecar = {
            "kind": self.kind, "status": status, "reason": reason, "checkpoint": checkpoint,
            "random": RANDOM if self.kind == "pretrain" else self.config["random"],
            "config": self.config,
            "seed": self.opts.seed, "classes": self.num_classes, "N": self.train_set.n,
            "N_val": self.val_set.n, "epochs_done": s["epoch"],
            "val_acc": [r["val_acc"] for r in s["history"]], "history": s["history"],
            "best_acc": s["best_acc"], "best_epoch": s["best_epoch"],
            "seconds": round(s["seconds"], 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": str(self.device), "amp": self.opts.amp if self.amp else None,
            "torch": torch.__version__,
            "trajectory": "trajectory.json" if trajectory is not None else None}
        write_json(self.out / f"{self.name}.json", sidecar)
        self.resume_path.unlink(missing_ok=True)
        return _result(self.out, sidecar)


def _result(out: Path, sidecar: dict) -> TrainResult:
    # Names of files in `out`; finetune's θr is absolute, and out / absolute is itself.
    paths = {k: out / sidecar[k] if sidecar[k] else None
             for k in ("checkpoint", "random", "trajectory")}
    return TrainResult(kind=sidecar["kind"], status=sidecar["status"], reason=sidecar["reason"],
                       out=out, history=sidecar["history"], best_acc=sidecar["best_acc"],
                       best_epoch=sidecar["best_epoch"], seconds=sidecar["seconds"], **paths)
