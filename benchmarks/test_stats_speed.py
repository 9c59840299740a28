"""Speed of channel_stats and of FeatureStats hooks against the baselines of the issue.

  channel_stats          ops.channel_stats(x): count, mean, m2 per channel, on the host
  channel_stats_10       the same per class, 10 classes
  channel_stats_classes  the same, 1000 classes
  channel_stats_torch    the pure-torch fallback (backend="torch"; ops/fallback.py)
  var_mean               torch.var_mean(x, dim=(0, 2, 3)): the best single torch call
                         (no class statistics, no merge)
  masked_loop            per class: x[labels == k] then var_mean, for every class
  bare_forward           the model's forward pass without hooks (for the hook overhead)

Activations (256, 1024, 14, 14) float32 (205 MB): a ResNet-50 layer3 output of a batch.
"""

from __future__ import annotations

import pytest
import torch

import transfer_fast as tf
from transfer_fast import ops

from .conftest import DEVICES, measure

SHAPE = (256, 1024, 14, 14)
CLASSES = 1000


@pytest.fixture(scope="module")
def activations():
    cache = {}

    def get(device: str):
        if device not in cache:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(SHAPE, generator=g)
            labels = torch.randint(0, CLASSES, (SHAPE[0],), generator=g)
            cache[device] = x.to(device), labels.to(device)
        return cache[device]

    return get


def masked_loop(x, labels):
    return [torch.var_mean(x[labels == k], dim=(0, 2, 3)) for k in range(CLASSES)]


FUNCTIONS = {
    "channel_stats": lambda x, y: ops.channel_stats(x)[2].cpu(),
    "channel_stats_10": lambda x, y: ops.channel_stats(x, y % 10, 10)[2].cpu(),
    "channel_stats_classes": lambda x, y: ops.channel_stats(x, y, CLASSES)[2].cpu(),
    "channel_stats_torch": lambda x, y: ops.channel_stats(x, backend="torch")[2].cpu(),
    "var_mean": lambda x, y: torch.var_mean(x, dim=(0, 2, 3))[0].cpu(),
    "masked_loop": masked_loop,
}
# (group kind, entry): var_mean is in both groups as the single-call yardstick.
CASES = [("all", "channel_stats"), ("all", "channel_stats_10"), ("all", "channel_stats_torch"),
         ("all", "var_mean"), ("classes", "channel_stats_classes"), ("classes", "var_mean"),
         ("classes", "masked_loop")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("kind", "entry"), CASES, ids=[f"{k}-{e}" for k, e in CASES])
def test_channel_stats(benchmark, activations, device, kind, entry):
    x, labels = activations(device)
    group = f"channel_stats {SHAPE}" + (f" {CLASSES} classes" if kind == "classes" else "")
    measure(benchmark, lambda: FUNCTIONS[entry](x, labels), group=f"{group} [{device}]",
            entry=entry, device=device, nbytes=x.numel() * x.element_size())


def make_resnet_batch():
    from transfer_fast.train.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet50", 1000).eval()
    return model, torch.randn(8, 3, 160, 160)


@pytest.fixture(scope="module")
def resnet_batch():
    return make_resnet_batch()


@pytest.mark.parametrize("entry", ["bare_forward", "feature_stats"])
def test_hook_overhead(benchmark, resnet_batch, entry):
    """Statistics at every BN input (53 layers) and the penultimate covariance of a
    ResNet-50 on the CPU, against the same forward pass without hooks."""
    model, x = resnet_batch
    if entry == "feature_stats":
        stats = tf.FeatureStats(model)

        def fn():
            return stats.update(x)
    else:

        def fn():
            with torch.no_grad():
                return model(x)
    try:
        measure(benchmark, fn, group="resnet50 forward, batch 8x3x160x160 [cpu]", entry=entry,
                device="cpu", nbytes=x.numel() * 4)
    finally:
        if entry == "feature_stats":
            stats.close()


def main() -> None:
    """Paired cross-check of the hook overhead: the bare forward and FeatureStats.update
    alternate within each round, so a drift of the shared machine hits both alike."""
    import argparse
    import statistics
    import time

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    model, x = make_resnet_batch()
    stats = tf.FeatureStats(model)

    def bare():
        with torch.no_grad():
            model(x)

    runs = {"bare_forward": bare, "feature_stats": lambda: stats.update(x)}
    for fn in runs.values():  # warm up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    ratios = [s / b for s, b in zip(times["feature_stats"], times["bare_forward"])]
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    print(f"resnet50 8x3x160x160, {torch.get_num_threads()} threads, {args.rounds} rounds: "
          f"bare {statistics.median(times['bare_forward']) * 1e3:.1f} ms, with FeatureStats "
          f"{statistics.median(times['feature_stats']) * 1e3:.1f} ms; time ratio q1 / median / "
          f"q3 = {q1:.3f} / {med:.3f} / {q3:.3f}")


if __name__ == "__main__":
    main()
