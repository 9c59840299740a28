"""FeatureStats: forward hooks that record activation statistics of a model over data.

By default it watches the input of every BatchNorm layer (what the layer normalises,
to compare with its running statistics) and the penultimate features (the input of
the last Linear layer), whose full covariance is kept for the Fréchet distance and
whose per-class moments give the intraclass variance. What it accumulates is a
FeatureState (feature_state.py): saved once, reloaded and merged without a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import ops
from ..errors import TransferFastError, check_labels, first_few
from .feature_state import FeatureState
from .presets import find_head
from .stats import ChannelStats, CovarianceStats

MAX_PARTS = 64  # batches kept per layer before they are merged
# On a GPU the statistics kernels run on a second stream, beside the layers that follow
# in the same forward pass: they only read memory, the convolutions mostly compute.
SIDE_STREAM = True
_BN = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules that track running statistics, in module order."""
    return [name for name, m in model.named_modules()
            if isinstance(m, _BN) and m.track_running_stats and m.running_mean is not None]


def penultimate_layer(model: nn.Module) -> str | None:
    """The classifier module (presets.find_head), whose input is the penultimate
    features; None for a model without an nn.Linear."""
    try:
        return find_head(model)[0]
    except TransferFastError:
        return None


@dataclass
class _Batch:
    """One update()'s results, held back until they are known to be finite."""

    parts: list[tuple[str, ChannelStats]]
    features: torch.Tensor | None
    labels: torch.Tensor | None
    probs: torch.Tensor | None
    samples: int
    call: int  # which update() call it came from, from 1
    finite: torch.Tensor | None = None  # CUDA: pinned host copy of the device flag
    ready: object = None  # CUDA: event recorded after the flag's copy


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

    A batch whose activations hold a NaN or an Inf is refused whole: the statistics stay
    as they were before it. On the CPU update() checks its own batch. On a GPU that
    check would wait for the whole forward pass every batch, so update() launches a
    finiteness flag and checks it one batch later, when the GPU has long computed it:
    a batch is added only once checked, by the next update() or by any read of the
    statistics (`layers`, `state`, `samples`, `save`, ...). A bad batch raises there;
    an update() that raises for the batch before it does not add its own batch either,
    so passing that batch again is always safe. Also on a GPU, the statistics kernels
    run on a second stream beside the rest of the forward pass (SIDE_STREAM); the batch
    waits for them before its flag is taken.
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
        self._classes = 1  # classes of the batch being recorded
        self._batch_size = 0
        self._pending: list[tuple[str, ChannelStats]] = []  # this batch's, until it is checked
        self._pending_features: torch.Tensor | None = None
        self._unchecked: _Batch | None = None  # CUDA: the last batch, its flag in flight
        self._updates = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._side: torch.cuda.Stream | None = None  # this batch's statistics stream
        modules = list(batchnorm_layers(model) if modules is None else modules)
        penultimate = penultimate_layer(model) if penultimate is True else (penultimate or None)
        self._state = FeatureState(modules=modules, penultimate=penultimate,
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
        recorded = set(modules)
        for name in watched:
            # BatchNorm normalises dim 1 whatever the rank: (N, C, L) for BatchNorm1d.
            first = isinstance(named[name], _BN)
            hook = self._hook(name, first, name in recorded, name == penultimate)
            self._handles.append(named[name].register_forward_pre_hook(hook))

    @property
    def state(self) -> FeatureState:
        """The FeatureState accumulated so far (every checked batch added)."""
        self._check_pending()
        return self._state

    # Read-through views of the state, so that a recorder reads like its statistics.
    modules = property(lambda self: self._state.modules)
    penultimate = property(lambda self: self._state.penultimate)
    covariance = property(lambda self: self.state.covariance)
    samples = property(lambda self: self.state.samples)
    num_classes = property(lambda self: self._state.num_classes)
    metadata = property(lambda self: self._state.metadata)

    @property
    def layers(self) -> dict[str, ChannelStats]:
        """{module name: ChannelStats} of everything accumulated so far."""
        self._check_pending()
        for name in list(self._parts):
            self._consolidate(name)
        return self._state.layers

    def _hook(self, name: str, channels_first: bool, recorded: bool, penultimate: bool):
        """The forward pre-hook of one module; what it records is decided here, once."""
        def hook(module, inputs):
            if not self._active:
                return
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2:
                raise TransferFastError(f"module {name!r}: expected a tensor input of shape "
                                        "(N, C, ...) to take statistics of")
            x = x.detach()
            if recorded:
                self._add(name, x, channels_first)
            if penultimate:
                feats = x.flatten(1) if x.dim() != 2 else x
                if not recorded:
                    self._add(name, feats, False)
                self._pending_features = feats
        return hook

    def _add(self, name: str, x: torch.Tensor, channels_first: bool) -> None:
        if self._labels is not None and x.shape[0] != self._batch_size:
            raise TransferFastError(f"module {name!r} got {x.shape[0]} rows from a batch of "
                                    f"{self._batch_size} samples: class statistics need one "
                                    "row per labelled sample")
        args = (x, self._labels, self._classes)
        kwargs = dict(shift=self._shift.get(name), channels_first=channels_first,
                      backend=self.backend)
        if self._side is None or x.device != self._side.device:
            stats = ops.channel_stats(*args, **kwargs)
        else:
            # The side stream starts after what produced x; x (and the labels) must
            # outlive its reads there, the results their uses on the main stream.
            main = torch.cuda.current_stream(x.device)
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                stats = ops.channel_stats(*args, **kwargs)
            x.record_stream(self._side)
            if self._labels is not None:
                self._labels.record_stream(self._side)
            for t in stats:
                t.record_stream(main)
        self._pending.append((name, ChannelStats(*stats)))

    def _finite_flag(self, parts: list[tuple[str, ChannelStats]]) -> torch.Tensor:
        """0-dim bool on the statistics' device: every layer's m2 finite (a NaN or an Inf in
        the activations reaches it). One reduction per batch, no synchronisation."""
        norms = torch._foreach_norm([p.class_m2 for _, p in parts], 1)
        return torch.stack(norms).sum().isfinite()

    def _refuse(self, batch: _Batch, later: str = "") -> TransferFastError:
        """The error for a batch that is not finite; `later`: said when it is reported
        after the call that ran it."""
        names = [name for name, p in batch.parts if not torch.isfinite(p.class_m2).all()]
        where = f" in the batch of update() call {batch.call}" if later else ""
        return TransferFastError(f"activations with NaN or Inf at the input of "
                                 f"{first_few(names)}{where}: that batch is not added{later}")

    def _collect(self, output) -> _Batch:
        """This batch's results, with its finiteness flag on the way to the host."""
        parts, self._pending = self._pending, []
        features, self._pending_features = self._pending_features, None
        if self._side is not None:  # this batch's statistics, before anything reads them
            torch.cuda.current_stream(self._side.device).wait_stream(self._side)
        probs = None
        if features is not None and self.scores is not None and self._labels is not None \
                and self.source_probs:
            probs = output.float().softmax(1)
        batch = _Batch(parts, features, self._labels, probs, self._batch_size, self._updates)
        if parts and parts[0][1].class_m2.is_cuda:
            flag = self._finite_flag(parts)
            batch.finite = flag.to("cpu", non_blocking=True)
            batch.ready = torch.cuda.Event()
            batch.ready.record()
        return batch

    def _is_finite(self, batch: _Batch) -> bool:
        if not batch.parts:
            return True
        if batch.finite is None:  # CPU: the flag costs no wait
            return bool(self._finite_flag(batch.parts))
        batch.ready.synchronize()  # the flag's copy, not the work queued after it
        return bool(batch.finite)

    def _check_pending(self, later: str = " (found on reading the statistics)") -> None:
        """Adds the batch whose flag was in flight, or raises if it was not finite."""
        batch, self._unchecked = self._unchecked, None
        if batch is not None:
            if not self._is_finite(batch):
                raise self._refuse(batch, later)
            self._apply(batch)

    def _apply(self, batch: _Batch) -> None:
        """Adds a batch known to be finite."""
        for name, part in batch.parts:
            if name not in self._shift:  # the first batch's mean keeps later sums near zero
                self._shift[name] = part.mean
            parts = self._parts.setdefault(name, [])
            parts.append(part)
            if len(parts) >= MAX_PARTS:
                self._consolidate(name)
        self._state.samples += batch.samples
        features = batch.features
        if features is None:
            return
        if self._state.covariance is None:
            self._state.covariance = CovarianceStats.empty(features.shape[1], features.device)
        self._state.covariance.add_batch(features)
        if self.scores is not None and batch.labels is not None:
            self.scores.update(features, batch.labels, batch.probs)

    def _consolidate(self, name: str) -> None:
        parts = self._parts.pop(name, [])
        if name in self._state.layers:
            parts.insert(0, self._state.layers[name])
        if parts:
            self._state.layers[name] = ChannelStats.combine(parts)

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
                stay as they were; on a GPU this may be reported by the next update(),
                see the class docstring).
        """
        if self._labelled is not None and self._labelled != (labels is not None):
            raise TransferFastError("labelled and unlabelled batches cannot be mixed: class "
                                    "statistics would be wrong")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        if labels is not None:
            labels, k = check_labels(
                labels, num_samples=len(batch),
                num_classes=self.num_classes if self._fixed_classes else None)
            self._state.num_classes = max(self.num_classes or 1, k)
            labels = labels.to(device)
        was_training = self.model.training
        if was_training:  # eval()/train() walk every module: skip them when already in eval
            self.model.eval()
        self._updates += 1
        self._side = None
        if SIDE_STREAM and device.type == "cuda":
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            self._side = self._streams[device]
        self._labels, self._batch_size, self._active = labels, len(batch), True
        self._classes = self.num_classes if labels is not None else 1
        try:
            out = self.model(batch.to(device))
            self._active = False
            current = self._collect(out)
        finally:
            self._active, self._labels = False, None
            self._pending, self._pending_features = [], None
            if was_training:
                self.model.train()
        self._labelled = self._labelled if self._labelled is not None else labels is not None
        # The previous batch's flag was computed long ago: checking it now does not wait
        # for this batch. If it raises, this batch is dropped too (see the class docstring).
        self._check_pending(", nor the batch of this call: pass it again")
        if current.finite is None:
            if not self._is_finite(current):
                raise self._refuse(current)
            self._apply(current)
        else:
            self._unchecked = current
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
        self._state.merge(other)
        return self

    def all_reduce(self) -> FeatureStats:
        """Merges the statistics of every rank (torch.distributed) into each, in rank order."""
        self.layers  # noqa: B018
        self._state.all_reduce()
        return self

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, covariance) of the penultimate features, for frechet_distance."""
        return self.state.gaussian()

    @property
    def features(self) -> ChannelStats:
        """Per class moments of the penultimate features (for intraclass_variance)."""
        self.layers  # noqa: B018
        return self._state.features

    def save(self, path: str | Path) -> Path:
        """Writes the statistics (not the model) to a .safetensors file, atomically."""
        self.layers  # noqa: B018
        return self._state.save(path)

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
