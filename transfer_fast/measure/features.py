"""FeatureStats: forward hooks that record activation statistics of a model over data.

By default it watches the input of every BatchNorm layer (what the layer normalises,
to compare with its running statistics) and the penultimate features (the input of
the last Linear layer), whose full covariance is kept for the Fréchet distance and
whose per-class moments give the intraclass variance. What it accumulates is a
FeatureState (feature_state.py): saved once, reloaded and merged without a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import ops
from ..errors import TransferFastError, check_labels, first_few
from .feature_state import FeatureState
from .stats import ChannelStats, CovarianceStats

MAX_PARTS = 64  # batches kept per layer before they are merged
_BN = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules that track running statistics, in module order."""
    return [name for name, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None]


def penultimate_layer(model: nn.Module) -> str | None:
    """Name of the last nn.Linear (its input is the penultimate features), or None."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


class FeatureStats:
    """Hooks that add the watched modules' inputs of every update() to a FeatureState.

    Args:
        model: the network to run; batches go to the device of its parameters.
        modules: names of the modules whose inputs are recorded (default: every
            BatchNorm layer that tracks running statistics).
        penultimate: True: the input of the last nn.Linear; a module name; or False.
        num_classes: fixed number of classes; None lets it grow with the labels seen.
        backend: the channel_stats backend.
        scores: a ScoreStats (measure.scores) fed the penultimate features and labels of
            every labelled batch in the same forward pass; `source_probs=True` also
            gives it softmax(model output) as the source model's predictions.
    Attributes:
        state: the FeatureState accumulated so far (`layers`, `covariance`, `samples`,
            ... are read through to it).
    Hooks record only inside update(); a module that runs several times in one forward
    pass (a shared block) adds each of its inputs.
    """

    def __init__(self, model: nn.Module, modules: Sequence[str] | None = None, *,
                 penultimate: str | None | bool = True, num_classes: int | None = None,
                 backend: str = "auto", scores=None, source_probs: bool = False):
        self.model, self.backend = model, backend
        self.scores, self.source_probs = scores, source_probs
        self._fixed_classes = num_classes is not None  # else it grows with the labels seen
        self._labelled: bool | None = None  # labelled and unlabelled batches do not mix
        # Per layer, the batches not yet merged in: merging is deferred to a read (or
        # every MAX_PARTS batches) so the forward pass pays only for the kernel.
        self._parts: dict[str, list[ChannelStats]] = {}
        self._shift: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._active = False  # hooks record only inside update(), never a stray forward
        self._labels: torch.Tensor | None = None
        self._pending: list[tuple[str, ChannelStats]] = []  # this batch's, until it is checked
        self._pending_features: torch.Tensor | None = None
        modules = list(batchnorm_layers(model) if modules is None else modules)
        penultimate = penultimate_layer(model) if penultimate is True else (penultimate or None)
        self.state = FeatureState(modules=modules, penultimate=penultimate,
                                  num_classes=num_classes,
                                  metadata={"model": type(model).__name__})
        self._attach(modules, penultimate)

    def _attach(self, modules: list[str], penultimate: str | None) -> None:
        named = dict(self.model.named_modules())
        missing = [m for m in [*modules, penultimate] if m and m not in named]
        if missing:
            raise TransferFastError(f"{type(self.model).__name__} has no module "
                                    f"{first_few(missing)}")
        watched = dict.fromkeys([*modules, *([penultimate] if penultimate else [])])
        if not watched:
            raise TransferFastError(f"{type(self.model).__name__}: no module to watch (no "
                                    "BatchNorm and no Linear layer); name the modules explicitly")
        for name in watched:
            # BatchNorm normalises dim 1 whatever the rank: (N, C, L) for BatchNorm1d.
            first = isinstance(named[name], _BN)
            self._handles.append(named[name].register_forward_pre_hook(self._hook(name, first)))

    # Read-through views of the state, so that a recorder reads like its statistics.
    modules = property(lambda self: self.state.modules)
    penultimate = property(lambda self: self.state.penultimate)
    covariance = property(lambda self: self.state.covariance)
    samples = property(lambda self: self.state.samples)
    num_classes = property(lambda self: self.state.num_classes)
    metadata = property(lambda self: self.state.metadata)

    @property
    def layers(self) -> dict[str, ChannelStats]:
        """{module name: ChannelStats} of everything accumulated so far."""
        for name in list(self._parts):
            self._consolidate(name)
        return self.state.layers

    def _hook(self, name: str, channels_first: bool):
        def hook(module, inputs):
            if not self._active:
                return
            if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < 2:
                raise TransferFastError(f"module {name!r}: expected a tensor input of shape "
                                        "(N, C, ...) to take statistics of")
            self._observe(name, inputs[0].detach(), channels_first)
        return hook

    def _observe(self, name: str, x: torch.Tensor, channels_first: bool) -> None:
        if name in self.modules:
            self._add(name, x, channels_first)
        if name == self.penultimate:
            feats = x.flatten(1) if x.dim() != 2 else x
            if name not in self.modules:
                self._add(name, feats, False)
            self._pending_features = feats

    def _add(self, name: str, x: torch.Tensor, channels_first: bool) -> None:
        if self._labels is not None and x.shape[0] != self._batch_size:
            raise TransferFastError(f"module {name!r} got {x.shape[0]} rows from a batch of "
                                    f"{self._batch_size} samples: class statistics need one "
                                    "row per labelled sample")
        k = self.num_classes if self._labels is not None else 1
        count, mean, m2 = ops.channel_stats(x, self._labels, k, shift=self._shift.get(name),
                                            channels_first=channels_first, backend=self.backend)
        self._pending.append((name, ChannelStats(count, mean, m2)))

    def _check_finite(self, pending: list[tuple[str, ChannelStats]]) -> None:
        """One finiteness check per batch over every layer, so a GPU synchronises once."""
        if pending and not torch.isfinite(torch.cat([p.class_m2.flatten()
                                                     for _, p in pending])).all():
            names = [name for name, p in pending if not torch.isfinite(p.class_m2).all()]
            raise TransferFastError(f"activations with NaN or Inf at the input of "
                                    f"{first_few(names)}")

    def _commit(self, output) -> None:
        """Adds this batch's statistics, once every layer's are known to be finite."""
        pending, self._pending = self._pending, []
        features, self._pending_features = self._pending_features, None
        self._check_finite(pending)
        for name, part in pending:
            if name not in self._shift:  # the first batch's mean keeps later sums near zero
                self._shift[name] = part.mean
            parts = self._parts.setdefault(name, [])
            parts.append(part)
            if len(parts) >= MAX_PARTS:
                self._consolidate(name)
        if features is None:
            return
        if self.state.covariance is None:
            self.state.covariance = CovarianceStats.empty(features.shape[1], features.device)
        self.state.covariance.add_batch(features)
        if self.scores is not None and self._labels is not None:
            probs = output.float().softmax(1) if self.source_probs else None
            self.scores.update(features, self._labels, probs)

    def _consolidate(self, name: str) -> None:
        parts = self._parts.pop(name, [])
        if name in self.state.layers:
            parts.insert(0, self.state.layers[name])
        if parts:
            self.state.layers[name] = ChannelStats.combine(parts)

    @torch.no_grad()
    def update(self, batch: torch.Tensor, labels=None):
        """Runs the model on a batch (in eval mode) and accumulates; returns the model's output.

        Args:
            batch: model inputs (N, ...).
            labels: integer (N,) for per-class statistics; without a fixed `num_classes`
                the number of classes grows with the largest label seen.
        Raises:
            TransferFastError: bad labels, mixing labelled and unlabelled batches, or
                activations with NaN/Inf (the whole batch is refused, the statistics
                stay as they were).
        """
        if self._labelled is not None and self._labelled != (labels is not None):
            raise TransferFastError("labelled and unlabelled batches cannot be mixed: class "
                                    "statistics would be wrong")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        if labels is not None:
            labels, k = check_labels(
                labels, num_samples=len(batch),
                num_classes=self.num_classes if self._fixed_classes else None)
            self.state.num_classes = max(self.num_classes or 1, k)
            labels = labels.to(device)
        was_training = self.model.training
        if was_training:  # eval()/train() walk every module: skip them when already in eval
            self.model.eval()
        self._labels, self._batch_size, self._active = labels, len(batch), True
        try:
            out = self.model(batch.to(device))
            self._active = False
            self._commit(out)
        finally:
            self._active, self._labels = False, None
            self._pending, self._pending_features = [], None
            if was_training:
                self.model.train()
        self._labelled = self._labelled if self._labelled is not None else labels is not None
        self.state.samples += len(batch)
        return out

    def accumulate(self, data: Iterable, *, labels: bool = True, progress: bool = True,
                   desc: str = "statistics") -> FeatureStats:
        """update() over every batch of data: batches x or (x, y) (a DataLoader, a list...);
        labels=False ignores the y of (x, y) batches (no class statistics)."""
        from tqdm.auto import tqdm

        for batch in tqdm(data, desc=desc, unit="batch", leave=False,
                          disable=None if progress else True):
            if isinstance(batch, (tuple, list)):
                self.update(batch[0], batch[1] if labels and len(batch) > 1 else None)
            else:
                self.update(batch)
        return self

    def merge(self, other: FeatureStats | FeatureState) -> FeatureStats:
        """Adds another recorder's or a loaded state's statistics into this one."""
        if isinstance(other, FeatureStats):
            other.layers  # noqa: B018  (consolidates its pending parts first)
            other = other.state
        self.layers  # noqa: B018
        self.state.merge(other)
        return self

    def all_reduce(self) -> FeatureStats:
        """Merges the statistics of every rank (torch.distributed) into each, in rank order."""
        self.layers  # noqa: B018
        self.state.all_reduce()
        return self

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, covariance) of the penultimate features, for frechet_distance."""
        return self.state.gaussian()

    @property
    def features(self) -> ChannelStats:
        """Per class moments of the penultimate features (for intraclass_variance)."""
        self.layers  # noqa: B018
        return self.state.features

    def save(self, path: str | Path) -> Path:
        """Writes the statistics (not the model) to a .safetensors file, atomically."""
        self.layers  # noqa: B018
        return self.state.save(path)

    @staticmethod
    def load(path: str | Path) -> FeatureState:
        """Statistics written by save(), as a FeatureState (no model attached)."""
        return FeatureState.load(path)

    def close(self) -> None:
        """Removes the hooks; the statistics stay."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FeatureStats:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
