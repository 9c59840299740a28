"""TrainConfig: the protocol of one training run (the paper's, PAPER.md section 4)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import TransferFastError

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("step", "cosine")
# An epoch count above this is a typo, not a plan; it would hold a machine for weeks.
MAX_EPOCHS = 100_000


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum and weight decay, the learning rate set per epoch by `schedule`:
    'step' divides it by 10 after each third of the epochs (pre-training: 40 of 120),
    'cosine' anneals it to 0 (fine-tuning). `amp` ('bf16', or 'fp16' with a GradScaler)
    and `channels_last` apply on CUDA only. `device` and `num_workers` say where the
    run goes, not what it computes: they are not recorded as options of the run."""

    epochs: int
    lr: float
    batch_size: int = 256
    seed: int = 0
    schedule: str = "step"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    amp: str | None = None
    channels_last: bool = False
    device: str = "cpu"
    num_workers: int = 0

    def __post_init__(self):
        problems = []
        if not isinstance(self.epochs, int) or not 1 <= self.epochs <= MAX_EPOCHS:
            problems.append(f"epochs {self.epochs!r} (1 to {MAX_EPOCHS})")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size {self.batch_size!r} (at least 1)")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr {self.lr!r} (a finite number above 0)")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} ({', '.join(SCHEDULES)})")
        if self.amp not in AMP_DTYPES:
            problems.append(f"amp {self.amp!r} (None, 'bf16', 'fp16')")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            problems.append(f"num_workers {self.num_workers!r} (0 or more)")
        if problems:
            raise TransferFastError("bad training options: " + "; ".join(problems))

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of `lr` in epoch `epoch` (0-based)."""
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return 0.1 ** (3 * epoch // self.epochs)

    def replace(self, **options) -> TrainConfig:
        """A copy with some options changed; an unknown option is a TransferFastError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TransferFastError(f"unknown training option(s) {', '.join(unknown)}: "
                                    f"expected some of {', '.join(sorted(known))}")
        return dataclasses.replace(self, **options)

    def recorded(self) -> dict:
        """The options a run's results depend on (what its folder is bound to)."""
        record = dataclasses.asdict(self)
        del record["device"], record["num_workers"]
        return record


# The paper's two protocols; pretrain()/finetune() start from these.
PRETRAINING = TrainConfig(epochs=120, lr=0.1, schedule="step")
FINETUNING = TrainConfig(epochs=100, lr=0.01, schedule="cosine")
