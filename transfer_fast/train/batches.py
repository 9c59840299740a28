"""Training and validation data for `pretrain`/`finetune`: (x, y) batches from a Dataset,
a DataLoader or an (x, y) pair of tensors, with the labels checked before training."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..errors import TransferFastError

Data = Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor]


def known_labels(data: Dataset) -> torch.Tensor | None:
    """The labels of a data set where they can be had without loading the inputs."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[1]
    if isinstance(data, Subset):
        inner = known_labels(data.dataset)
        return None if inner is None else inner[torch.as_tensor(data.indices)]
    targets = getattr(data, "targets", None)  # torchvision's convention
    return torch.as_tensor(targets) if targets is not None else None


class Batches:
    """(x, y) batches of one data set; `generator` reshuffles the training set each epoch."""

    def __init__(self, data: Data, role: str, *, batch_size: int, shuffle: bool, seed: int,
                 num_workers: int, device: torch.device):
        self.role, self.batch_size = role, batch_size
        self.pair, self.loader, self.labels, self.generator = None, None, None, None
        if isinstance(data, (tuple, list)):
            if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data) \
                    or len(data[0]) != len(data[1]):
                raise TransferFastError(f"{role} data: expected (x, y) tensors of one length")
            self.pair = (data[0].to(device), data[1].to(device))  # moved once, sliced per step
            self.labels, self.n = data[1], len(data[0])
            if shuffle:
                self.generator = torch.Generator().manual_seed(seed)
        elif isinstance(data, DataLoader):
            self.loader, self.generator = data, data.generator
            self.labels, self.n = known_labels(data.dataset), len(data.dataset)
        elif isinstance(data, Dataset):
            if shuffle:
                self.generator = torch.Generator().manual_seed(seed)
            self.loader = DataLoader(data, batch_size, shuffle=shuffle, generator=self.generator,
                                     num_workers=num_workers, pin_memory=device.type == "cuda")
            self.labels, self.n = known_labels(data), len(data)
        else:
            raise TransferFastError(f"{role} data: expected a Dataset, a DataLoader or an (x, y) "
                                    f"pair of tensors, got {type(data).__name__}")
        if self.n == 0:
            raise TransferFastError(f"{role} data is empty")

    def __iter__(self):
        if self.loader is not None:
            return iter(self.loader)
        x, y = self.pair
        if self.generator is None:
            return zip(x.split(self.batch_size), y.split(self.batch_size))
        order = torch.randperm(self.n, generator=self.generator).to(x.device)
        return ((x[i], y[i]) for i in order.split(self.batch_size))
