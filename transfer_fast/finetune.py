"""Training loops with the paper's protocol (SGD momentum 0.9, weight decay 1e-4, cosine to 0).

This first version trains in memory on tensors; a later issue adds datasets,
checkpoints with sidecars, resume and mixed precision.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def fit(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor], *, epochs: int, lr: float,
        batch_size: int = 64, seed: int = 0, desc: str = "train") -> tuple[dict, list[float]]:
    """Trains every parameter; returns the best-validation state dict and the accuracy per epoch."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    x, y = train
    best, best_acc, history = None, -1.0, []
    bar = tqdm(range(epochs), desc=desc, leave=False, unit="epoch", disable=None)
    for _ in bar:
        model.train()
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        acc = accuracy(model, *val)
        history.append(acc)
        bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}")
        if acc > best_acc:  # the paper keeps the best-validation checkpoint
            best_acc, best = acc, copy.deepcopy(model.state_dict())
    return best, history
