"""pretrain() and finetune(): the paper's protocol (train/config.py), checkpointed and
resumable (train/loop.py), with the classifier head replaced for the downstream task."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import TransferFastError
from ..io.checkpoints import load_state
from ..io.files import save_tensors, write_json
from ..measure.presets import find_head
from .batches import Data
from .config import FINETUNING, PRETRAINING, TrainConfig
from .loop import RANDOM, TrainingRun, TrainResult
from .trajectory import Trajectory

ModelFn = Callable[[], nn.Module]
EpochHook = Callable[[dict], None]

__all__ = ["TrainResult", "finetune", "find_head", "pretrain", "replace_head"]


def replace_head(model: nn.Module, num_classes: int, name: str | None = None) -> str:
    """Puts a fresh nn.Linear(in_features, num_classes) in place of the head; its name."""
    name, old = find_head(model, name)
    model.set_submodule(name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return name


# ---- the public API ------------------------------------------------------------------

def _config(base: TrainConfig, config: TrainConfig | None, options: dict) -> TrainConfig:
    """`config` (default: the paper's protocol `base`) with keyword overrides applied."""
    if isinstance(options.get("device"), torch.device):
        options["device"] = str(options["device"])
    return (config or base).replace(**options) if options else (config or base)


def pretrain(model_fn: ModelFn, train: Data, val: Data, *, out: str | Path,
             config: TrainConfig | None = None, head: str | None = None, resume: bool = True,
             progress: bool = True, on_epoch: EpochHook | None = None,
             **options) -> TrainResult:
    """Trains `model_fn()` from its initialisation θr (saved before the first step) and
    keeps the best-validation parameters θA.

    Args:
        model_fn: builds the network (called after seeding, so θr depends on the seed).
        train, val: a Dataset, a DataLoader (used as given) or an (x, y) pair of tensors
            (moved to the device once).
        out: the run folder (claimed and locked for the run).
        config: the protocol, default `PRETRAINING` (SGD lr 0.1, step schedule, 120
            epochs); `**options` override single fields (epochs=..., lr=..., device=...).
        head: the classifier module (default: the last nn.Linear); its out_features are
            the classes.
        resume: write the resume state after every epoch.
        on_epoch: called with each epoch's record after its state is written.
    Returns:
        TrainResult; a NaN/Inf loss ends the run with status 'failed' instead of raising,
        and rerunning a finished folder returns its recorded result.
    Raises:
        TransferFastError: bad options, labels outside the classes (for a Dataset without
            `targets`, at its first batch), a folder of other options or in use.
    """
    cfg = _config(PRETRAINING, config, options)
    torch.manual_seed(cfg.seed)  # θr is a function of the seed alone
    model = model_fn()
    head, linear = find_head(model, head)
    run = TrainingRun("pretrain", model, train, val, cfg, out=out, head=head,
                      num_classes=linear.out_features, extra={})
    with run.claim:  # the folder is locked until the run returns
        if (done := run.finished()) is not None:
            return done
        if not run.resuming:
            save_tensors(run.out / RANDOM, model.state_dict())
            write_json(run.out / "random.json", {
                "kind": "random", "config": run.config, "seed": cfg.seed,
                "classes": linear.out_features, "N": run.train_set.n,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return run.train(None, resume=resume, progress=progress, on_epoch=on_epoch)


def finetune(model: ModelFn | nn.Module, pretrained: str | Path, train: Data, val: Data, *,
             num_classes: int, out: str | Path, config: TrainConfig | None = None,
             head: str | None = None, random: str | Path | None = None,
             trajectory: bool = True, preset: str = "auto", metric: str = "l1_mean",
             resume: bool = True, progress: bool = True, on_epoch: EpochHook | None = None,
             **options) -> TrainResult:
    """Loads θA (`pretrained`) into `model` (a factory, or a module trained in place),
    replaces its classifier by a fresh nn.Linear(in_features, num_classes), trains
    every layer and keeps the best-validation parameters θB.

    Args:
        num_classes: classes of the downstream task (the new head's outputs).
        config: the protocol, default `FINETUNING` (SGD lr 0.01, cosine to 0, 100
            epochs); `**options` override single fields.
        head: the classifier module to replace (default: the last nn.Linear).
        random: θr for the trajectory (default random.safetensors beside θA).
        trajectory: record T per layer group (`preset`, `metric`) against θr and θA
            after every epoch into trajectory.json/.png.
        Everything else as `pretrain`.
    Returns:
        TrainResult (with `trajectory`, the path of trajectory.json).
    Raises:
        TransferFastError: as `pretrain`, and θA that does not fit the model.
    """
    cfg = _config(FINETUNING, config, options)
    torch.manual_seed(cfg.seed)  # the new head's initialisation
    model = model if isinstance(model, nn.Module) else model()
    theta_a = load_state(pretrained)
    head = replace_head(model, num_classes, head)
    head_names = [n for n in model.state_dict() if n.startswith(head + ".")]
    _load_body(model, theta_a, head, pretrained)
    random_path = Path(random) if random is not None else Path(pretrained).with_name(RANDOM)
    extra = {"pretrained": str(Path(pretrained).resolve()),
             "random": str(random_path.resolve()) if trajectory else None,
             "trajectory": {"preset": preset, "metric": metric} if trajectory else None}
    if trajectory and not random_path.is_file():  # before the run folder is claimed
        raise TransferFastError(f"{random_path}: θr not found for the trajectory; pass "
                                "random=<the pre-training's random.safetensors> or "
                                "trajectory=False")
    run = TrainingRun("finetune", model, train, val, cfg, out=out, head=head,
                      num_classes=num_classes, extra=extra)
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
