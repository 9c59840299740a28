"""FeatureState: accumulated activation statistics of a model, without the model.

Per watched layer a ChannelStats (per class x channel count, mean, centred sum of
squares), the float64 covariance of the penultimate features, and where they came
from. It merges (Chan's update), all-reduces under torch.distributed and round-trips
through one .safetensors file; it is what the gaps and distances read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TransferFastError, first_few
from ..io.files import save_tensors
from ..io.safetensors import load_with_metadata
from .stats import ChannelStats, CovarianceStats

FORMAT = "transfer_fast.FeatureStats/1"


@dataclass
class FeatureState:
    """Statistics of the watched layers' inputs.

    Attributes:
        layers: {module name: ChannelStats}, per class when labels were given.
        covariance: CovarianceStats of the penultimate features (D,) and (D, D), or None.
        modules: the watched modules, in model order.
        penultimate: the module whose input is the penultimate features, or None.
        samples: the number of samples seen.
        num_classes: classes of the labels seen, or None when unlabelled.
        metadata: free-form provenance (data set, model, architecture).
    """

    layers: dict[str, ChannelStats] = field(default_factory=dict)
    covariance: CovarianceStats | None = None
    modules: list[str] = field(default_factory=list)
    penultimate: str | None = None
    samples: int = 0
    num_classes: int | None = None
    metadata: dict = field(default_factory=dict)

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (D,), covariance (D, D)) of the penultimate features, for frechet_distance."""
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

    def merge(self, other: FeatureState) -> FeatureState:
        """Adds another state's statistics (another shard of the data) into this one.

        Raises:
            TransferFastError: when the two watched different layers.
        """
        if set(other.layers) != set(self.layers) and self.layers and other.layers:
            raise TransferFastError("cannot merge statistics of different layers: "
                                    f"{first_few(set(self.layers) ^ set(other.layers))}")
        for name, stats in other.layers.items():
            mine = self.layers.get(name)
            self.layers[name] = stats if mine is None else mine.merge(stats)
        if other.covariance is not None:  # merge() returns new tensors: nothing is shared
            start = self.covariance or CovarianceStats.empty(other.covariance.mean.shape[0],
                                                             other.covariance.mean.device)
            self.covariance = start.merge(other.covariance)
        self.modules = self.modules or list(other.modules)
        self.penultimate = self.penultimate or other.penultimate
        self.samples += other.samples
        if other.num_classes is not None:
            self.num_classes = max(self.num_classes or 0, other.num_classes)
        return self

    def all_reduce(self) -> FeatureState:
        """Merges the statistics of every rank (torch.distributed) into each, in rank order,
        so every rank gets the same result. A no-op outside a process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._to_tensors())
        merged = FeatureState()
        for tensors, meta in gathered:
            merged.merge(FeatureState._from_tensors(tensors, meta))
        self.layers, self.covariance = merged.layers, merged.covariance
        self.samples, self.num_classes = merged.samples, merged.num_classes
        return self

    # One .safetensors file: the tensors, and the layer list and metadata as JSON.
    def _to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
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
        return tensors, meta

    @classmethod
    def _from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> FeatureState:
        layers = {name: ChannelStats(tensors[f"{name}/class_count"],
                                     tensors[f"{name}/class_mean"], tensors[f"{name}/class_m2"])
                  for name in meta["layers"]}
        cov = None
        if meta["covariance_count"] is not None:
            cov = CovarianceStats(meta["covariance_count"], tensors["covariance/mean"],
                                  tensors["covariance/comoment"])
        return cls(layers, cov, list(meta["modules"]), meta["penultimate"], meta["samples"],
                   meta["num_classes"], dict(meta.get("metadata", {})))

    def save(self, path: str | Path) -> Path:
        """Writes the statistics to a .safetensors file (atomically); returns its path."""
        tensors, meta = self._to_tensors()
        return save_tensors(path, tensors, {"transfer_fast": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> FeatureState:
        """Statistics written by save().

        Raises:
            TransferFastError: naming the file when it is missing, unreadable or not saved
                by transfer_fast.
        """
        tensors, header = load_with_metadata(path)
        raw = header.get("transfer_fast")
        try:
            meta = json.loads(raw or "")
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            return cls._from_tensors(tensors, meta)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TransferFastError(f"{path}: not FeatureStats saved by transfer_fast "
                                    f"({exc})") from exc
