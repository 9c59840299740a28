"""transfer_fast: how transferable is a pre-trained network, layer by layer, fast.

T = D(θr, θB) / D(θA, θB) per layer (Chen et al., "Rethinking Two Consensuses of
the Transferability in Deep Learning"), from one fused pass over the parameters.
"""

from .errors import TransferFastError
from .io.checkpoints import load_state
from .measure.feature_state import FeatureState
from .measure.features import FeatureStats
from .measure.frechet import FrechetResult, frechet_distance
from .measure.gap import BNGapResult, IntraclassVariance, bn_gap, data_amount, intraclass_variance
from .measure.plan import PRESETS, Plan, make_plan
from .measure.regression import TransferabilityModel, fit_transferability_model
from .measure.scores import ScoreStats, hscore, leep, logme, nce, regularized_hscore, transrate
from .measure.similarity import SimilarityResult, similarity
from .measure.stats import ChannelStats, CovarianceStats, channel_stats
from .measure.transferability import (
    METRICS,
    LayerDistances,
    TransferabilityResult,
    layer_distances,
    transferability,
    transferability_from_states,
)
from .ops.dispatch import BACKENDS, backend_status, multi_tensor_distance
from .pipelines.experiment import ExperimentResult, run_experiment
from .pipelines.scan import ScanResult, scan
from .train.config import TrainConfig
from .train.finetune import TrainResult, finetune, pretrain

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BNGapResult",
    "ChannelStats",
    "CovarianceStats",
    "ExperimentResult",
    "FeatureState",
    "FeatureStats",
    "FrechetResult",
    "IntraclassVariance",
    "LayerDistances",
    "METRICS",
    "PRESETS",
    "Plan",
    "ScanResult",
    "ScoreStats",
    "SimilarityResult",
    "TrainConfig",
    "TrainResult",
    "TransferFastError",
    "TransferabilityModel",
    "TransferabilityResult",
    "backend_status",
    "bn_gap",
    "channel_stats",
    "data_amount",
    "finetune",
    "fit_transferability_model",
    "frechet_distance",
    "hscore",
    "intraclass_variance",
    "layer_distances",
    "leep",
    "load_state",
    "logme",
    "make_plan",
    "multi_tensor_distance",
    "nce",
    "pretrain",
    "regularized_hscore",
    "run_experiment",
    "scan",
    "similarity",
    "transferability",
    "transferability_from_states",
    "transrate",
]
