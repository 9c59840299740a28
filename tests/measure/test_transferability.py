"""T per group and the metrics, against float64 formulas written out here."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import backend_of
from torch import nn

from transfer_fast import METRICS, TransferFastError, layer_distances, testing, transferability

FORMULAS = {  # float64, per tensor
    "l1_mean": lambda p, q: (p - q).abs().mean(),
    "l2": lambda p, q: (p - q).norm(),
    "rms": lambda p, q: (p - q).pow(2).mean().sqrt(),
    "rel_l2": lambda p, q: (p - q).norm() / q.norm(),
    "cosine": lambda p, q: 1 - (p @ q) / (p.norm() * q.norm()),
}


def expected_groups(r, a, b, plan_groups, metric):
    """Group T from the formulas, grouping ResNet names by their first two components."""
    out = {}
    for g in plan_groups:
        names = [n for n in b if not n.endswith(("running_mean", "running_var",
                                                 "num_batches_tracked"))
                 and (n.startswith(g + ".") or (g == "stem" and n.startswith(("conv1", "bn1"))))]
        f = FORMULAS[metric]
        d_r = sum(f(r[n].double().flatten(), b[n].double().flatten()) for n in names) / len(names)
        d_a = sum(f(a[n].double().flatten(), b[n].double().flatten()) for n in names) / len(names)
        out[g] = (d_r / d_a).item()
    return out


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_every_metric_matches_float64(metric, device):
    r, a, b = testing.triple(testing.resnet_shapes(18), finetuned_classes=10)
    r, a, b = ({k: v.to(device) for k, v in s.items()} for s in (r, a, b))
    got = transferability(r, a, b, metric=metric, backend=backend_of(device))
    want = expected_groups(r, a, b, got.groups, metric)
    assert list(want) == got.groups
    torch.testing.assert_close(torch.tensor(got.values), torch.tensor(list(want.values())),
                               rtol=1e-4, atol=0)
    assert got.overall == pytest.approx(sum(got.values) / len(got.values), rel=1e-12)


def test_modules_and_backends_agree():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))
            for _ in range(3)]
    for net in nets:  # fresh BatchNorm layers are identical (weight 1, bias 0)
        nn.init.normal_(net[1].weight)
    fast = transferability(*nets, backend="cpu")
    slow = transferability(*nets, backend="torch")
    torch.testing.assert_close(torch.tensor(fast.values), torch.tensor(slow.values), rtol=1e-5,
                               atol=0)
    assert fast.groups == ["0", "1", "3"] and fast.classifier == "3"


def test_zero_norm_tensors_leave_cosine_groups_instead_of_making_them_nan():
    """A fresh BatchNorm bias is all zeros: its cosine distance has no value."""
    torch.manual_seed(2)
    nets = [nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))
            for _ in range(3)]
    for net in nets[1:]:  # "trained" sets: every parameter moved away from its init
        for p in net.parameters():
            p.data += 0.1 * torch.randn_like(p)
    with pytest.warns(RuntimeWarning, match="cosine undefined for 1 zero-norm"):
        got = transferability(*nets, metric="cosine")
    assert all(math.isfinite(v) for v in got.values)
    assert got.excluded == {"1.bias": "cosine undefined (zero norm)"}
    w = [FORMULAS["cosine"](n[1].weight.double(), nets[2][1].weight.double()) for n in nets[:2]]
    assert got.values[1] == pytest.approx((w[0] / w[1]).item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("metric", sorted(METRICS))
def test_nan_and_inf_are_named_with_their_set(metric, backend):
    """Each metric reads (and checks) only its own sums; every one of them names the set."""
    r, a, b = testing.triple(testing.resnet_shapes(18))
    b["layer3.1.conv2.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(TransferFastError, match=r"layer3\.1\.conv2\.weight in finetuned"):
        transferability(r, a, b, metric=metric, backend=backend)
    r2, a2, b2 = testing.triple(testing.resnet_shapes(18))
    a2["conv1.weight"][1, 0, 0, 0] = float("inf")
    with pytest.raises(TransferFastError, match=r"conv1\.weight in pretrained"):
        transferability(r2, a2, b2, metric=metric, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_squares_that_overflow_float32_are_a_warning_naming_the_pair(backend):
    r, a, b = testing.triple(testing.resnet_shapes(18))
    b["layer4.0.conv1.weight"][0, 0, 0, 0] = 1e25  # finite, its square is not
    with pytest.warns(RuntimeWarning, match=r"overflowed for layer4\.0\.conv1\.weight between"):
        transferability(r, a, b, metric="l2", backend=backend)


def test_zero_denominator_gives_inf_and_a_warning_not_a_crash():
    r, a, b = testing.triple(testing.resnet_shapes(18))
    for name in b:
        if name.startswith("layer2.0."):
            b[name] = a[name].clone()
    with pytest.warns(RuntimeWarning, match="layer2.0"):
        got = transferability(r, a, b)
    assert got.values[got.groups.index("layer2.0")] == math.inf
    assert got.overall == math.inf and any("layer2.0" in w for w in got.warnings)


def test_layer_distances_are_per_tensor():
    torch.manual_seed(1)
    x, y = nn.Linear(5, 3), nn.Linear(5, 3)
    got = layer_distances(x, y, metrics=("l1_mean", "cosine"))
    assert got.names == ["weight", "bias"]
    w = FORMULAS["cosine"](x.weight.double().flatten(), y.weight.double().flatten()).item()
    assert got.values["cosine"][0] == pytest.approx(w, rel=1e-5)
    with pytest.raises(TransferFastError, match="unknown metric"):
        layer_distances(x, y, metrics=("manhattan",))


def test_forced_fallback_works_without_the_compiled_library():
    """With the library disabled, import still works, warns once, and gives the same T."""
    code = (
        "import json, transfer_fast as tf\n"
        "from transfer_fast import testing\n"
        "r, a, b = testing.triple(testing.resnet_shapes(18), finetuned_classes=10)\n"
        "res = tf.transferability(r, a, b)\n"
        "print(json.dumps({'status': tf.backend_status(), 'values': res.values}))\n"
    )
    env = {**os.environ, "TRANSFER_FAST_DISABLE_EXT": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)
    out = json.loads(proc.stdout)
    assert out["status"]["cpu"].startswith("unavailable") and out["status"]["torch"] == "available"
    assert proc.stderr.count("compiled kernels unavailable") == 1
    r, a, b = testing.triple(testing.resnet_shapes(18), finetuned_classes=10)
    compiled = transferability(r, a, b, backend="cpu")
    torch.testing.assert_close(torch.tensor(out["values"]), torch.tensor(compiled.values),
                               rtol=1e-5, atol=0)


def test_explicit_backend_that_cannot_run_is_a_clear_error():
    r, a, b = testing.triple(testing.resnet_shapes(18))
    with pytest.raises(TransferFastError, match="backend 'cuda' cannot reduce tensors on cpu"):
        transferability(r, a, b, backend="cuda")
