"""similarity() against float64 cosine / L2 written out here, and the scan plots."""

import csv
import math

import pytest
import torch
from conftest import backend_of

from transfer_fast import TransferFastError, testing
from transfer_fast.measure.similarity import similarity
from transfer_fast.report.figures import group_curves_figure, heatmap_figure, save_figure

PNG = b"\x89PNG\r\n\x1a\n"
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
SHAPES = testing.resnet_shapes(18)
GROUPS = ["stem", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)), "fc"]


@pytest.fixture(scope="module")
def sets():
    """θA and four fine-tuned sets θA + u_i: u_1 shares most of u_0 (cos ~ 0.6), u_3 moves
    partly against u_2 (cos ~ -0.45), the other pairs are nearly orthogonal."""
    a = testing.random_state(SHAPES, seed=0)
    n = [testing.random_state(SHAPES, seed=s) for s in (1, 2, 3, 4)]
    mixes = [((0.2, 0),), ((0.12, 0), (0.16, 1)), ((0.1, 2),), ((-0.05, 2), (0.1, 3))]
    finetuned = []
    for mix in mixes:
        b = dict(a)  # integer buffers (num_batches_tracked) stay
        for k, v in a.items():
            if v.is_floating_point():
                (c, i), *rest = mix
                b[k] = torch.add(v, n[i][k], alpha=c)
                for c, i in rest:
                    b[k].add_(n[i][k], alpha=c)
        finetuned.append(b)
    return a, finetuned


def group_of(name: str) -> str:
    """ResNet groups written out: conv1/bn1 -> stem, fc, else the first two components."""
    head = name.split(".")[0]
    if head in ("conv1", "bn1"):
        return "stem"
    return head if head == "fc" else ".".join(name.split(".")[:2])


def expected(a: dict, finetuned: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (G + 1, K, K) cosine and L2 of the updates per group, the last entry over
    all learned tensors: dot products and squared distances add up over tensors."""
    k = len(finetuned)
    dot = torch.zeros(len(GROUPS) + 1, k, k, dtype=torch.float64)
    sq = torch.zeros_like(dot)
    for name in a:
        if name.endswith(BUFFERS):
            continue
        u = (torch.stack([b[name] for b in finetuned]).double() - a[name].double()).flatten(1)
        gram = u @ u.T  # (K, K)
        sq_dist = torch.cdist(u, u, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        for g in (GROUPS.index(group_of(name)), -1):
            dot[g] += gram
            sq[g] += sq_dist
    norm = dot.diagonal(dim1=1, dim2=2).sqrt()
    return dot / (norm[:, :, None] * norm[:, None, :]), sq.sqrt()


@pytest.fixture(scope="module")
def want(sets):
    return expected(*sets)


def test_matches_float64(sets, want, device):
    a, finetuned = sets
    a, finetuned = {k: v.to(device) for k, v in a.items()}, [
        {k: v.to(device) for k, v in b.items()} for b in finetuned]
    got = similarity(finetuned, a, backend=backend_of(device))
    want_cos, want_l2 = want
    assert got.groups == [*GROUPS, "network"]
    assert got.labels == ["0", "1", "2", "3"]
    assert got.excluded == {} and got.warnings == []
    assert got.cosine.dtype == got.l2.dtype == torch.float64
    torch.testing.assert_close(got.cosine, want_cos, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.l2, want_l2, rtol=1e-5, atol=0)
    # The mixes above: meaningfully different cosines for the whole network.
    assert got.cosine[-1, 0, 1] == pytest.approx(0.6, abs=0.01)
    assert got.cosine[-1, 2, 3] == pytest.approx(-0.447, abs=0.01)
    assert abs(got.cosine[-1, 0, 2]) < 0.01


def test_symmetric_with_unit_diagonal(sets):
    a, finetuned = sets
    got = similarity(finetuned, a)
    assert torch.equal(got.cosine, got.cosine.mT) and torch.equal(got.l2, got.l2.mT)
    diagonal = got.cosine.diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(diagonal, torch.ones_like(diagonal), rtol=0, atol=1e-12)
    assert (got.l2.diagonal(dim1=1, dim2=2) == 0).all()
    assert got.cosine.abs().max() <= 1.0


def test_zero_update_gives_nan_cosine_and_warning(sets):
    a, finetuned = sets
    frozen_stem = {k: a[k] if k.startswith(("conv1.", "bn1.")) else v
                   for k, v in finetuned[0].items()}
    with pytest.warns(RuntimeWarning, match="zero update"):
        got = similarity([frozen_stem, finetuned[1], dict(a)], a, labels=["frozen", "b", "same"])
    stem, network = got.groups.index("stem"), got.groups.index("network")
    assert got.cosine[stem, 0].isnan().all() and got.cosine[stem, :, 0].isnan().all()
    assert not got.cosine[network, 0, :2].isnan().any()  # the rest of the network moved
    assert got.cosine[:, 2].isnan().all()  # no update anywhere
    moved = math.sqrt(sum((finetuned[1][n].double() - a[n].double()).square().sum().item()
                          for n in a if not n.endswith(BUFFERS)))
    assert got.l2[network, 2, 1].item() == pytest.approx(moved, rel=1e-6)  # ||u_b - 0||
    assert len(got.warnings) == 2
    assert "checkpoint frozen" in got.warnings[0] and "'stem'" in got.warnings[0]
    assert "checkpoint same: identical to the reference" in got.warnings[1]


@pytest.mark.parametrize("checkpoints", [[], [{}], "one.pt"], ids=["none", "one", "str"])
def test_fewer_than_two_checkpoints(sets, checkpoints):
    with pytest.raises(TransferFastError, match="checkpoint"):
        similarity(checkpoints, sets[0])


def test_bad_input(sets):
    a, finetuned = sets
    missing = {k: v for k, v in finetuned[1].items() if not k.startswith("layer4.1.")}
    with pytest.raises(TransferFastError, match="checkpoint 1 lacks .*layer4.1"):
        similarity([finetuned[0], missing], a)
    reshaped = dict(finetuned[1], **{"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(TransferFastError, match="layer1.0.conv1.weight"):
        similarity([finetuned[0], reshaped], a)
    with pytest.raises(TransferFastError, match="3 labels for 2"):
        similarity(finetuned[:2], a, labels=["x", "y", "z"])
    poisoned = dict(finetuned[1], **{"fc.bias": torch.full((1000,), math.nan)})
    with pytest.raises(TransferFastError, match="fc.bias in checkpoint 1"):
        similarity([finetuned[0], poisoned], a)


def test_new_classifier_left_out_and_paths_labelled(tmp_path):
    small = {k: v for k, v in SHAPES.items() if k.startswith(("conv1.", "bn1.", "layer1.0.",
                                                              "fc."))}
    _, a, b = testing.triple(small, finetuned_classes=10)
    torch.manual_seed(0)
    paths = [tmp_path / "run_lr1.pt", tmp_path / "run_lr2.pt", tmp_path / "x" / "run_lr1.pt"]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        torch.save({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                    for k, v in b.items()}, path)
    got = similarity(paths[:2], a)
    assert got.labels == ["run_lr1", "run_lr2"]
    assert got.groups == ["stem", "layer1.0", "network"]
    assert set(got.excluded) == {"fc.weight", "fc.bias"}
    assert "classifier shape differs" in got.excluded["fc.weight"]
    # The same stem twice: the shortest unique path suffixes tell the checkpoints apart.
    assert similarity(paths, a).labels == [f"{tmp_path.name}/run_lr1", "run_lr2", "x/run_lr1"]


def test_files_and_hf_folders_give_the_in_memory_numbers_bit_for_bit(sets, tmp_path):
    a, finetuned = sets
    torch.save(finetuned[0], tmp_path / "b0.pt")
    testing.save_hf_folder(finetuned[1], tmp_path / "b1", shards=3)
    testing.save_hf_folder(finetuned[2], tmp_path / "b2", shards=2, fmt="bin")
    testing.save_hf_folder(a, tmp_path / "a", shards=2)
    paths = [tmp_path / "b0.pt", tmp_path / "b1", tmp_path / "b2"]
    on_disk = similarity(paths, tmp_path / "a", labels=["0", "1", "2"])
    in_memory = similarity(finetuned[:3], a)
    assert torch.equal(on_disk.cosine, in_memory.cosine)
    assert torch.equal(on_disk.l2, in_memory.l2)
    # A task model nesting the network under 'model.' beside plain ones: lined up.
    testing.save_hf_folder({f"model.{n}": t for n, t in finetuned[2].items()}, tmp_path / "m")
    nested = similarity([*paths[:2], tmp_path / "m"], tmp_path / "a", labels=["0", "1", "2"])
    assert torch.equal(nested.cosine, in_memory.cosine)


def test_half_precision_updates_are_taken_in_float32(sets):
    a, finetuned = sets
    half = [{k: v.bfloat16() if v.is_floating_point() else v for k, v in b.items()}
            for b in finetuned[:2]]
    got = similarity(half, {k: v.bfloat16() if v.is_floating_point() else v
                            for k, v in a.items()})
    want_cos, _ = expected({k: v.bfloat16().float() if v.is_floating_point() else v
                            for k, v in a.items()},
                           [{k: v.float() if v.is_floating_point() else v for k, v in b.items()}
                            for b in half])
    torch.testing.assert_close(got.cosine, want_cos, rtol=1e-5, atol=1e-6)


def test_custom_groups_and_classifier(sets):
    a, finetuned = sets
    groups = [("stem", r"^(conv1|bn1)\."), ("body", r"^layer\d\."), ("head", r"^fc\.")]
    got = similarity(finetuned[:2], a, groups=groups, classifier="head")
    assert got.groups == ["stem", "body", "head", "network"]
    default = similarity(finetuned[:2], a)
    assert torch.equal(got.l2[-1], default.l2[-1])  # the same tensors, grouped otherwise


def test_csv_dict_and_plot(sets, tmp_path):
    got = similarity(sets[1][:3], sets[0], labels=["x", "y", "z"])
    got.write_csv(tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["group", "a", "b", "cosine", "l2"]
    assert len(rows) == 1 + len(got.groups) * 9
    last = rows[-2]  # network, z, y
    assert last[:3] == ["network", "z", "y"]
    assert float(last[3]) == got.cosine[-1, 2, 1].item()
    assert float(last[4]) == got.l2[-1, 2, 1].item()
    d = got.to_dict()
    assert d["labels"] == ["x", "y", "z"] and len(d["cosine"]) == len(got.groups)
    got.plot(tmp_path / "s.png")
    got.plot(tmp_path / "stem.png", group="stem")
    for name in ("s.png", "stem.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    with pytest.raises(TransferFastError, match="unknown group"):
        got.plot(tmp_path / "x.png", group="layer9.9")


@pytest.mark.parametrize("rows", [3, 45])
def test_report_plots(tmp_path, rows):
    labels = [f"checkpoint_{k}" for k in range(rows)]
    values = [[1.0 + 0.1 * g + 0.01 * k for g in range(len(GROUPS))] for k in range(rows)]
    values[0][1], values[1][2] = math.nan, math.inf
    save_figure(heatmap_figure(labels, GROUPS, values, title="T"), tmp_path / "heat.png")
    save_figure(group_curves_figure(labels, GROUPS, values, max_curves=12),
                tmp_path / "curves.png")
    for name in ("heat.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    with pytest.raises(TransferFastError, match="rows"):
        heatmap_figure(labels, GROUPS, values[:-1])
