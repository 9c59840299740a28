"""`transfer-fast demo`: the method end to end on scikit-learn's bundled digits (no download).

A tiny ResNet (torchvision names, so the resnet and paper presets apply) is
pre-trained on digits 0-4 from a saved random init, fine-tuned on digits 5-9,
and the three parameter sets are measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import report
from .errors import TransferFastError
from .finetune import fit
from .transferability import transferability


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """ResNet-shaped CNN for 8x8 images, with torchvision's parameter names."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 2 * width))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, 2),
                                    BasicBlock(4 * width, 4 * width))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def digits_split(classes: range, seed: int):
    """Train/validation tensors of the chosen digit classes, labels renumbered from 0."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - 0.5) / 0.225  # the paper's input normalisation
    y = torch.tensor(digits.target)
    keep = (y >= classes.start) & (y < classes.stop)
    x, y = x[keep], y[keep] - classes.start
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = len(x) // 5
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def _save(state: dict, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def run_demo(out: str | Path = "runs/demo", *, seed: int = 0, epochs: int = 30,
             backend: str = "auto") -> dict:
    """Writes random/pretrained/finetuned .safetensors, result.json/.csv, T.png and summary.json."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TransferFastError(f"{out}: cannot create the run folder ({exc.strerror})") from exc
    start = time.perf_counter()
    torch.manual_seed(seed)
    task_a, task_b = digits_split(range(0, 5), seed), digits_split(range(5, 10), seed)

    model = TinyResNet(num_classes=5)
    _save(model.state_dict(), out / "random.safetensors")  # θr: before the first step
    theta_a, acc_a = fit(model, *task_a, epochs=epochs, lr=0.1, seed=seed, desc="pre-train 0-4")
    _save(theta_a, out / "pretrained.safetensors")

    model.load_state_dict(theta_a)
    model.fc = nn.Linear(model.fc.in_features, 5)  # a new head for the downstream classes
    theta_b, acc_b = fit(model, *task_b, epochs=epochs, lr=0.01, seed=seed + 1,
                         desc="fine-tune 5-9")
    _save(theta_b, out / "finetuned.safetensors")

    result = transferability(out / "random.safetensors", out / "pretrained.safetensors",
                             out / "finetuned.safetensors", backend=backend)
    report.write_json(result, out / "result.json")
    report.write_csv(result, out / "result.csv")
    report.plot(result, out / "T.png", title="Tiny ResNet, digits 0-4 -> 5-9")
    summary = {"seed": seed, "epochs": epochs, "pretrain_best_val_acc": max(acc_a),
               "finetune_best_val_acc": max(acc_b), "overall_T": result.overall,
               "seconds": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report.format_table(result))
    print(f"pre-train val acc {summary['pretrain_best_val_acc']:.3f}, fine-tune val acc "
          f"{summary['finetune_best_val_acc']:.3f}, {summary['seconds']} s; wrote {out}/")
    return summary
