"""transfer_fast: how transferable is a pre-trained network, layer by layer, fast.

T = D(θr, θB) / D(θA, θB) per layer (Chen et al., "Rethinking Two Consensuses of
the Transferability in Deep Learning"), from one fused pass over the parameters.
"""

from .checkpoints import load_state
from .errors import TransferFastError
from .experiment import ExperimentResult, run_experiment
from .features import FeatureStats
from .finetune import TrainResult, finetune, pretrain
from .frechet import FrechetResult, frechet_distance
from .gap import BNGapResult, IntraclassVariance, bn_gap, data_amount, intraclass_variance
from .layers import PRESETS, Plan, make_plan
from .ops import BACKENDS, backend_status, multi_tensor_distance
from .regression import TransferabilityModel, fit_transferability_model
from .scan import ScanResult, scan
from .similarity import SimilarityResult, similarity
from .stats import ChannelStats, CovarianceStats, channel_stats
from .transferability import (
    METRICS,
    LayerDistances,
    TransferabilityResult,
    layer_distances,
    transferability,
    transferability_from_states,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BNGapResult",
    "ChannelStats",
    "CovarianceStats",
    "ExperimentResult",
    "FeatureStats",
    "FrechetResult",
    "IntraclassVariance",
    "LayerDistances",
    "METRICS",
    "PRESETS",
    "Plan",
    "ScanResult",
    "SimilarityResult",
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
    "intraclass_variance",
    "layer_distances",
    "load_state",
    "make_plan",
    "multi_tensor_distance",
    "pretrain",
    "run_experiment",
    "scan",
    "similarity",
    "transferability",
    "transferability_from_states",
]
