"""Pre-training and fine-tuning with the paper's protocol, checkpointed and resumable.

SGD (momentum 0.9, weight decay 1e-4) with the learning rate set per epoch: 'step'
divides it by 10 after each third of the epochs (pre-training: 40 of 120), 'cosine'
anneals it to 0 (fine-tuning). A run's folder `out` holds config-<kind>.json (its
options: a rerun with others is refused), resume-<kind>.pt (replaced atomically after
every epoch, removed at the end: a killed run goes on from there), the checkpoints
random.safetensors (θr, before the first step), pretrained.safetensors (θA) or
finetuned.safetensors (θB), each with a JSON sidecar written last (config, seed,
accuracy per epoch, N, classes, time, status: a rerun returns the recorded result),
and for fine-tuning trajectory.json/.png. A pre-training and its fine-tuning may share
a folder. On the CPU a seed fixes every bit (one machine, one thread count), and a
resumed run ends as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TransferFastError, check_labels
from ..io.checkpoints import load_state
from ..io.files import atomic_write, save_tensors, write_json
from ..io.runfolder import claim
from .batches import Batches, Data
from .resume import rng_state, set_rng_state
from .trajectory import Trajectory

ModelFn = Callable[[], nn.Module]
EpochHook = Callable[[dict], None]
_AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CHECKPOINT = {"pretrain": "pretrained", "finetune": "finetuned"}
_RANDOM = "random.safetensors"


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


@dataclass(frozen=True)
class _Options:
    """The protocol of one run; recorded in its config."""

    epochs: int
    lr: float
    batch_size: int
    seed: int
    schedule: str
    momentum: float
    weight_decay: float
    amp: str | None
    channels_last: bool

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 \
                or self.schedule not in ("step", "cosine") or self.amp not in _AMP:
            raise TransferFastError(
                f"bad options: epochs {self.epochs}, batch_size {self.batch_size} (at least 1), "
                f"lr {self.lr} (above 0), schedule {self.schedule!r} ('step', 'cosine'), "
                f"amp {self.amp!r} (None, 'bf16', 'fp16')")

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of `lr` in epoch `epoch` (0-based)."""
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return 0.1 ** (3 * epoch // self.epochs)


# ---- the classifier head -----------------------------------------------------------

def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier: the module `name`, else the last nn.Linear in registration order."""
    if name is not None:
        try:
            head = model.get_submodule(name)
        except AttributeError as exc:
            raise TransferFastError(f"the model has no submodule {name!r}") from exc
        if not isinstance(head, nn.Linear):
            raise TransferFastError(f"head {name!r} is a {type(head).__name__}, not nn.Linear")
        return name, head
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TransferFastError(f"{type(model).__name__} has no nn.Linear classifier to "
                                "replace; name it with head=...")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int, name: str | None = None) -> str:
    """Puts a fresh nn.Linear(in_features, num_classes) in place of the head; its name."""
    name, old = find_head(model, name)
    model.set_submodule(name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return name


# ---- the run -----------------------------------------------------------------------

class _Run:
    """One training run bound to its folder: the loop, its resume state and its outputs."""

    def __init__(self, kind: str, model: nn.Module, train: Data, val: Data, opts: _Options, *,
                 out: str | Path, head: str, num_classes: int, device: str | torch.device,
                 num_workers: int, extra: dict):
        self.kind, self.opts, self.num_classes = kind, opts, num_classes
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.amp = _AMP[opts.amp] if cuda else None  # CPU runs stay in float32
        self.channels_last = opts.channels_last and cuda
        batches = dict(batch_size=opts.batch_size, seed=opts.seed, num_workers=num_workers,
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
            "kind": kind, "model": type(model).__qualname__, **asdict(opts), "head": head,
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
              on_epoch: EpochHook | None) -> TrainResult:
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
        atomic_write(self.resume_path, lambda p: torch.save(state, p))

    def _restore(self, opt, sched, scaler, trajectory) -> dict:
        try:
            state = torch.load(self.resume_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TransferFastError(f"{self.resume_path}: unreadable resume state ({exc}); "
                                    "delete it to start this run fresh") from exc
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
            "random": _RANDOM if self.kind == "pretrain" else self.config["random"],
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


# ---- the public API ------------------------------------------------------------------

def pretrain(model_fn: ModelFn, train: Data, val: Data, *, out: str | Path, epochs: int = 120,
             lr: float = 0.1, batch_size: int = 256, seed: int = 0, schedule: str = "step",
             momentum: float = 0.9, weight_decay: float = 1e-4, head: str | None = None,
             device: str | torch.device = "cpu", amp: str | None = None,
             channels_last: bool = False, num_workers: int = 0, resume: bool = True,
             progress: bool = True, on_epoch: EpochHook | None = None) -> TrainResult:
    """Trains `model_fn()` from its initialisation θr (saved before the first step) and
    keeps the best-validation parameters θA.

    train, val: a Dataset, a DataLoader (used as given) or an (x, y) pair of tensors
    (moved to `device` once). The classes are the head's out_features (the last
    nn.Linear, or the module `head`); labels outside them raise TransferFastError
    before training (for a Dataset without `targets`, at its first batch). amp
    ('bf16', 'fp16' with a GradScaler) and channels_last apply on CUDA only.
    `resume=False` skips the per-epoch resume state; `on_epoch(record)` runs after
    each epoch's state is written. A NaN/Inf loss ends the run with status 'failed'
    instead of raising. Rerunning a finished folder returns its result.
    """
    opts = _Options(epochs, lr, batch_size, seed, schedule, momentum, weight_decay, amp,
                    channels_last)
    torch.manual_seed(seed)  # θr is a function of the seed alone
    model = model_fn()
    head, linear = find_head(model, head)
    run = _Run("pretrain", model, train, val, opts, out=out, head=head,
               num_classes=linear.out_features, device=device, num_workers=num_workers,
               extra={})
    with run.claim:  # the folder is locked until the run returns
        if (done := run.finished()) is not None:
            return done
        if not run.resuming:
            save_tensors(run.out / _RANDOM, model.state_dict())
            write_json(run.out / "random.json", {
                "kind": "random", "config": run.config, "seed": seed,
                "classes": linear.out_features, "N": run.train_set.n,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return run.train(None, resume=resume, progress=progress, on_epoch=on_epoch)


def finetune(model: ModelFn | nn.Module, pretrained: str | Path, train: Data, val: Data, *,
             num_classes: int, out: str | Path, epochs: int = 100, lr: float = 0.01,
             batch_size: int = 256, seed: int = 0, schedule: str = "cosine",
             momentum: float = 0.9, weight_decay: float = 1e-4, head: str | None = None,
             random: str | Path | None = None, trajectory: bool = True, preset: str = "auto",
             metric: str = "l1_mean", device: str | torch.device = "cpu",
             amp: str | None = None, channels_last: bool = False, num_workers: int = 0,
             resume: bool = True, progress: bool = True,
             on_epoch: EpochHook | None = None) -> TrainResult:
    """Loads θA (`pretrained`) into `model` (a factory, or a module trained in place),
    replaces its classifier by a fresh nn.Linear(in_features, num_classes), trains
    every layer and keeps the best-validation parameters θB.

    The classifier is the last nn.Linear in registration order, or the module named
    `head` (e.g. 'fc', 'head.fc'). With `trajectory`, T per layer group (`preset`,
    `metric`) of the parameters against θr (`random`, default random.safetensors
    beside θA) and θA is recorded after every epoch into trajectory.json/.png.
    Everything else as `pretrain`.
    """
    opts = _Options(epochs, lr, batch_size, seed, schedule, momentum, weight_decay, amp,
                    channels_last)
    torch.manual_seed(seed)  # the new head's initialisation
    model = model if isinstance(model, nn.Module) else model()
    theta_a = load_state(pretrained)
    head = replace_head(model, num_classes, head)
    head_names = [n for n in model.state_dict() if n.startswith(head + ".")]
    _load_body(model, theta_a, head, pretrained)
    random_path = Path(random) if random is not None else Path(pretrained).with_name(_RANDOM)
    extra = {"pretrained": str(Path(pretrained).resolve()),
             "random": str(random_path.resolve()) if trajectory else None,
             "trajectory": {"preset": preset, "metric": metric} if trajectory else None}
    if trajectory and not random_path.is_file():  # before the run folder is claimed
        raise TransferFastError(f"{random_path}: θr not found for the trajectory; pass "
                                "random=<the pre-training's random.safetensors> or "
                                "trajectory=False")
    run = _Run("finetune", model, train, val, opts, out=out, head=head,
               num_classes=num_classes, device=device, num_workers=num_workers, extra=extra)
    with run.claim:  # the folder is locked until the run returns
        if (done := run.finished()) is not None:
            return done
        traj = None
        if trajectory:
            traj = Trajectory(load_state(random_path), theta_a, run.model.state_dict(),
                              replaced=head_names, preset=preset, metric=metric)
        return run.train(traj, resume=resume, progress=progress, on_epoch=on_epoch)


def _load_body(model: nn.Module, state: dict[str, torch.Tensor], head: str,
               origin: str | Path) -> None:
    """θA into every module but the new head; the rest of θA must fit exactly."""
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith(head + ".")}
    body = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    try:
        model.load_state_dict({**body, **fresh})
    except RuntimeError as exc:  # torch lists the missing, unexpected and reshaped names
        detail = " ".join(str(exc).split())
        raise TransferFastError(f"{origin}: does not fit the model: {detail[:300]}") from exc
