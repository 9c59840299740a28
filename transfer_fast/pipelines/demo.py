"""`transfer-fast demo`: the paper's study in miniature, on data that ships with scikit-learn.

A tiny ResNet is pre-trained on digits 0-4 and fine-tuned on digits 5-9 under
controlled domain shifts (unchanged, inverted, transposed, blurred, noisy) and data
amounts (50 to 400 images), two seeds each; then T, G, D and N are measured and the
explanatory model fitted (`experiment_config.DEMO_CONFIG`, run by `run_experiment`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import TransferFastError
from .experiment import ExperimentResult, run_experiment
from .experiment_config import DEMO_CONFIG, tomllib


def demo_config(epochs: int | None = None) -> dict:
    """The demo's config as a dict; `epochs` overrides both training stages (quick runs)."""
    raw = tomllib.loads(DEMO_CONFIG)
    if epochs is not None:
        raw["pretrain"]["epochs"] = raw["finetune"]["epochs"] = epochs
    return raw


def run_demo(out: str | Path = "runs/demo", *, epochs: int | None = None, html: bool = False,
             progress: bool = True) -> ExperimentResult:
    """Runs (or resumes) the demo experiment into `out`: report.md, figures/, runs.csv...

    Raises TransferFastError, before anything runs, when scikit-learn (whose digits
    data set the demo uses) is not installed: it is an optional dependency."""
    if importlib.util.find_spec("sklearn") is None:
        raise TransferFastError("the demo needs scikit-learn: pip install scikit-learn")
    return run_experiment(demo_config(epochs), out, html=html, progress=progress)
