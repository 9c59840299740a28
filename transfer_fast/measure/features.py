"""FeatureStats: forward hooks that accumulate activation statistics of a model over data.

By default it watches the input of every BatchNorm layer (what the layer normalises,
to compare with its running statistics) and the penultimate features (the input of
the last Linear layer), whose full covariance is kept for the Fréchet distance and
whose per-class moments give the intraclass variance. Statistics of a large sample
are computed once, saved, and reused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import ops
from ..errors import TransferFastError, first_few
from ..io.files import save_tensors
from .stats import ChannelStats, CovarianceStats, check_labels

FORMAT = "transfer_fast.FeatureStats/1"
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
    """Per layer ChannelStats of the watched modules' inputs, and the penultimate covariance.

    `layers`: {module name: ChannelStats} (per class when labels are given);
    `penultimate`: the module whose input is the penultimate features (or None);
    `covariance`: CovarianceStats of those features; `samples`: samples seen.
    Hooks record only inside update(); a module that runs several times in one forward
    pass (a shared block) adds each of its inputs.
    """

    def __init__(self, model: nn.Module | None = None, modules: Sequence[str] | None = None, *,
                 penultimate: str | None | bool = True, num_classes: int | None = None,
                 backend: str = "auto"):
        self.model, self.backend, self.num_classes = model, backend, num_classes
        self._fixed_classes = num_classes is not None  # else it grows with the labels seen
        self._labelled: bool | None = None  # labelled and unlabelled batches do not mix
        self._layers: dict[str, ChannelStats] = {}
        # Per layer, the batches not yet merged in: merging is deferred to a read (or
        # every MAX_PARTS batches) so the forward pass pays only for the kernel.
        self._parts: dict[str, list[ChannelStats]] = {}
        self._shift: dict[str, torch.Tensor] = {}
        self.covariance: CovarianceStats | None = None
        self.samples = 0
        self.metadata: dict = {}
        self._handles: list = []
        self._active = False  # hooks record only inside update(), never a stray forward
        self._labels: torch.Tensor | None = None
        self._pending: list[tuple[str, ChannelStats]] = []  # this batch's, until it is checked
        self._pending_features: torch.Tensor | None = None
        if model is None:
            self.modules, self.penultimate = list(modules or []), None
            return
        self.modules = list(batchnorm_layers(model) if modules is None else modules)
        self.penultimate = penultimate_layer(model) if penultimate is True else (
            penultimate or None)
        named = dict(model.named_modules())
        missing = [m for m in [*self.modules, self.penultimate] if m and m not in named]
        if missing:
            raise TransferFastError(f"{type(model).__name__} has no module {first_few(missing)}")
        watched = dict.fromkeys([*self.modules, *([self.penultimate] if self.penultimate else [])])
        if not watched:
            raise TransferFastError(f"{type(model).__name__}: no module to watch (no BatchNorm "
                                    "and no Linear layer); name the modules explicitly")
        for name in watched:
            # BatchNorm normalises dim 1 whatever the rank: (N, C, L) for BatchNorm1d.
            first = isinstance(named[name], _BN)
            self._handles.append(named[name].register_forward_pre_hook(self._hook(name, first)))
        self.metadata = {"model": type(model).__name__}

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

    def _commit(self) -> None:
        """Adds this batch's statistics, once every layer's are known to be finite.

        One finiteness check per batch over every layer, so a GPU synchronises once.
        """
        pending, self._pending = self._pending, []
        features, self._pending_features = self._pending_features, None
        if pending and not torch.isfinite(torch.cat([p.class_m2.flatten()
                                                     for _, p in pending])).all():
            bad = [not torch.isfinite(p.class_m2).all() for _, p in pending]
            if any(bad):
                names = [name for (name, _), b in zip(pending, bad) if b]
                raise TransferFastError(f"activations with NaN or Inf at the input of "
                                        f"{first_few(names)}")
        for name, part in pending:
            if name not in self._shift:  # the first batch's mean keeps later sums near zero
                self._shift[name] = part.mean
            parts = self._parts.setdefault(name, [])
            parts.append(part)
            if len(parts) >= MAX_PARTS:
                self._consolidate(name)
        if features is not None:
            if self.covariance is None:
                self.covariance = CovarianceStats.empty(features.shape[1], features.device)
            self.covariance.add_batch(features)

    def _consolidate(self, name: str) -> None:
        parts = self._parts.pop(name, [])
        if name in self._layers:
            parts.insert(0, self._layers[name])
        if parts:
            self._layers[name] = ChannelStats.combine(parts)

    @property
    def layers(self) -> dict[str, ChannelStats]:
        """{module name: ChannelStats} of everything accumulated so far."""
        for name in list(self._parts):
            self._consolidate(name)
        return self._layers

    @torch.no_grad()
    def update(self, batch: torch.Tensor, labels=None):
        """Runs the model on a batch (in eval mode) and accumulates; returns the model's output.

        Labels (N,) give per-class statistics; without `num_classes` the number of classes
        grows with the largest label seen. A batch whose activations hold NaN or Inf is
        refused whole, and the statistics so far stay as they were.
        """
        if self.model is None:
            raise TransferFastError("these statistics were loaded from a file: no model to run")
        if self._labelled is not None and self._labelled != (labels is not None):
            raise TransferFastError("labelled and unlabelled batches cannot be mixed: class "
                                    "statistics would be wrong")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        if labels is not None:
            labels, k = check_labels(labels, len(batch),
                                     self.num_classes if self._fixed_classes else None)
            self.num_classes = max(self.num_classes or 1, k)
            labels = labels.to(device)
        was_training = self.model.training
        if was_training:  # eval()/train() walk every module: skip them when already in eval
            self.model.eval()
        self._labels, self._batch_size, self._active = labels, len(batch), True
        try:
            out = self.model(batch.to(device))
            self._active = False
            self._commit()
        finally:
            self._active, self._labels = False, None
            self._pending, self._pending_features = [], None
            if was_training:
                self.model.train()
        self._labelled = self._labelled if self._labelled is not None else labels is not None
        self.samples += len(batch)
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

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Adds another accumulator's statistics (e.g. another shard of the data) into this one."""
        if set(other.layers) != set(self.layers) and self.layers and other.layers:
            raise TransferFastError("cannot merge statistics of different layers: "
                                    f"{first_few(set(self.layers) ^ set(other.layers))}")
        mine = self.layers
        for name, stats in other.layers.items():
            mine[name] = stats if name not in mine else mine[name].merge(stats)
        if other.covariance is not None:  # merge() returns new tensors: nothing is shared
            start = self.covariance or CovarianceStats.empty(other.covariance.mean.shape[0],
                                                             other.covariance.mean.device)
            self.covariance = start.merge(other.covariance)
        self.samples += other.samples
        return self

    def all_reduce(self) -> FeatureStats:
        """Merges the statistics of every rank (torch.distributed) into each, in rank order."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        world = dist.get_world_size()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, self._state_cpu())
        merged = FeatureStats()
        for state in gathered:  # rank order on every rank: the same result everywhere
            merged.merge(FeatureStats._from_state(state))
        self._layers, self.covariance, self.samples = (merged.layers, merged.covariance,
                                                       merged.samples)
        return self

    def close(self) -> None:
        """Removes the hooks; the statistics stay."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FeatureStats:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, covariance) of the penultimate features, for frechet_distance."""
        if self.covariance is None or self.covariance.count < 2:
            raise TransferFastError("no penultimate features were accumulated (needs a Linear "
                                    "layer and at least 2 samples)")
        return self.covariance.gaussian()

    @property
    def features(self) -> ChannelStats:
        """Per class moments of the penultimate features (for intraclass_variance)."""
        if self.penultimate is None or self.penultimate not in self.layers:
            raise TransferFastError("no penultimate features were accumulated")
        return self.layers[self.penultimate]

    # Save / load: one .safetensors file, the layer list and metadata as JSON in its header.
    def _state_cpu(self) -> dict:
        tensors = {}
        for name, s in self.layers.items():
            tensors.update({f"{name}/class_count": s.class_count.cpu(),
                            f"{name}/class_mean": s.class_mean.cpu(),
                            f"{name}/class_m2": s.class_m2.cpu()})
        cov = self.covariance
        if cov is not None:
            tensors.update({"covariance/mean": cov.mean.cpu(),
                            "covariance/comoment": cov.comoment.cpu()})
        meta = {"format": FORMAT, "layers": list(self.layers), "modules": self.modules,
                "penultimate": self.penultimate, "samples": self.samples,
                "covariance_count": cov.count if cov is not None else None,
                "num_classes": self.num_classes, "metadata": self.metadata}
        return {"tensors": tensors, "meta": meta}

    @classmethod
    def _from_state(cls, state: dict) -> FeatureStats:
        t, meta = state["tensors"], state["meta"]
        stats = cls(modules=meta["modules"])
        stats.penultimate, stats.samples = meta["penultimate"], meta["samples"]
        stats.num_classes, stats.metadata = meta["num_classes"], meta.get("metadata", {})
        for name in meta["layers"]:
            stats._layers[name] = ChannelStats(t[f"{name}/class_count"], t[f"{name}/class_mean"],
                                              t[f"{name}/class_m2"])
        if meta["covariance_count"] is not None:
            stats.covariance = CovarianceStats(meta["covariance_count"], t["covariance/mean"],
                                               t["covariance/comoment"])
        return stats

    def save(self, path: str | Path) -> Path:
        """A .safetensors file, the layout in its metadata; written atomically."""
        state = self._state_cpu()
        return save_tensors(path, state["tensors"],
                            metadata={"transfer_fast": json.dumps(state["meta"])})

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Statistics saved by save(); no model attached (merge, gaps and distances work)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("transfer_fast")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError as exc:
            raise TransferFastError(f"{path}: no such file") from exc
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise TransferFastError(f"{path}: not a readable .safetensors file ({exc})") from exc
        try:
            meta = json.loads(raw or "")
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            return cls._from_state({"tensors": tensors, "meta": meta})
        except (ValueError, KeyError, TypeError) as exc:
            raise TransferFastError(f"{path}: not FeatureStats saved by transfer_fast "
                                    f"({exc})") from exc
