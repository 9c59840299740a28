"""PackedAnchors (the trajectory's packed path) against the list route and float64."""

import pytest
import torch

from transfer_fast import TransferFastError, testing
from transfer_fast.measure.plan import make_plan
from transfer_fast.measure.transferability import PackedAnchors, transferability_from_states
from transfer_fast.train.trajectory import Trajectory

SHAPES = testing.resnet_shapes(18, width=16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_measure_equals_the_list_route_bit_for_bit_and_float64(device):
    r, a, b = testing.triple(SHAPES, seed=1)
    plan = make_plan([r, a, b])
    packed = PackedAnchors([r, a], plan, device)
    for step in range(3):  # the reused target buffer: a fresh set every time
        b = {n: (t + 0.01 * step if t.is_floating_point() else t) for n, t in b.items()}
        live = {n: t.to(device) for n, t in b.items()}
        got = packed.measure(live)
        want = transferability_from_states([r, a, live], plan)
        assert got.values == want.values and got.d_random == want.d_random
        d = {s: [float((x[n].double() - b[n].double()).abs().mean()) for n in plan.names]
             for s, x in (("r", r), ("a", a))}
        per_group = [[i for i, g in enumerate(plan.group_index) if g == k]
                     for k in range(len(plan.groups))]
        t64 = [sum(d["r"][i] for i in idx) / sum(d["a"][i] for i in idx) for idx in per_group]
        torch.testing.assert_close(torch.tensor(got.values, dtype=torch.float64),
                                   torch.tensor(t64, dtype=torch.float64), rtol=1e-6, atol=0)


def test_mixed_dtypes_and_a_channels_last_live_set():
    r, a, b = testing.triple(SHAPES, seed=2)
    plan = make_plan([r, a, b])
    live = {n: (t.to(memory_format=torch.channels_last) if t.dim() == 4 else t)
            for n, t in b.items()}
    got = PackedAnchors([r, a], plan, "cpu").measure(live)
    assert got.values == transferability_from_states([r, a, b], plan).values
    half = {n: (t.bfloat16() if t.is_floating_point() else t) for n, t in b.items()}
    got = PackedAnchors([r, a], plan, "cpu").measure(half)
    assert got.values == transferability_from_states([r, a, half], plan).values


def test_missing_reshaped_and_non_finite_tensors_are_named():
    r, a, b = testing.triple(SHAPES, seed=3)
    traj = Trajectory(r, a, b)
    name = traj.plan.names[3]
    with pytest.raises(TransferFastError, match=f"lacks 1 tensor.*{name}"):
        traj.record(1, {n: t for n, t in b.items() if n != name})
    with pytest.raises(TransferFastError, match=f"differ in shape.*{name}"):
        traj.record(1, {**b, name: torch.zeros(3)})
    bad = b[name].clone()
    bad.view(-1)[0] = float("nan")
    with pytest.raises(TransferFastError, match=f"NaN or Inf.*{name} in fine-tuning model"):
        traj.record(1, {**b, name: bad})
    assert traj.epochs == []


@pytest.mark.parametrize("classes", [10, 1000])  # another class count than θA's, and the same
@pytest.mark.parametrize("head", ["fc", "decoder.proj"])  # a name the rules know, and not
def test_the_replaced_head_is_left_out_whatever_its_name_and_shape(head, classes):
    shapes = {n: s for n, s in SHAPES.items() if not n.startswith("fc.")}
    shapes.update({f"{head}.weight": (1000, 128), f"{head}.bias": (1000,)})
    r, a, b = testing.triple(shapes, seed=6)
    b[f"{head}.weight"], b[f"{head}.bias"] = torch.randn(classes, 128), torch.zeros(classes)
    traj = Trajectory(r, a, b, replaced=[f"{head}.weight", f"{head}.bias"])
    assert not any(n.startswith(head + ".") for n in traj.plan.names)
    assert {f"{head}.weight", f"{head}.bias"} <= set(traj.plan.excluded)
    plan = traj.plan  # T per group from float64 math over the tensors the plan kept
    d = {s: [float((x[n].double() - b[n].double()).abs().mean()) for n in plan.names]
         for s, x in (("r", r), ("a", a))}
    groups = [[i for i, g in enumerate(plan.group_index) if g == k]
              for k in range(len(plan.groups))]
    t64 = [sum(d["r"][i] for i in idx) / sum(d["a"][i] for i in idx) for idx in groups]
    got = traj.record(1, b)
    assert got.values == pytest.approx(t64, rel=1e-6)
    body = [t for g, t in zip(plan.groups, t64) if g != plan.classifier]
    assert got.overall == pytest.approx(sum(body) / len(body), rel=1e-6)
