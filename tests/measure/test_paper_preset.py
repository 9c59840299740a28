"""The `paper` preset against a straightforward re-implementation of the authors' script."""

import pytest
import torch

from transfer_fast import testing, transferability


def authors_script(random, pretrained, finetuned):
    """The script's semantics (PAPER.md section 1), written positionally like the original:
    conv tensors in order, stem = the first conv, then blocks of three convs; per-tensor
    mean |p - q| in float32; group T = ratio of the group's mean distances; overall = the
    mean over these body groups. (Its classifier group compares fresh random heads, ~1.0 by
    construction and outside the overall, so it is not reproduced here.)"""
    convs = [n for n in finetuned if "conv" in n]
    groups = [convs[:1]] + [convs[i:i + 3] for i in range(1, len(convs), 3)]

    def dist(p, q):
        return (p - q).abs().mean().item()

    values = []
    for group in groups:
        d_r = sum(dist(random[n], finetuned[n]) for n in group) / len(group)
        d_a = sum(dist(pretrained[n], finetuned[n]) for n in group) / len(group)
        values.append(d_r / d_a)
    return values, sum(values) / len(values)


@pytest.mark.parametrize("seed", [0, 1])
def test_resnet50_groups_and_overall_equal_the_authors_values(seed):
    r, a, b = testing.triple(testing.resnet_shapes(50), seed=seed, finetuned_classes=10)
    expected, expected_overall = authors_script(r, a, b)
    got = transferability(r, a, b, preset="paper")
    assert len(got.groups) == 17 and got.groups[0] == "stem" and got.groups[-1] == "layer4.2"
    assert "fc.weight" in got.excluded and "differs" in got.excluded["fc.weight"]
    torch.testing.assert_close(torch.tensor(got.values), torch.tensor(expected),
                               rtol=1e-5, atol=0)
    assert got.overall == pytest.approx(expected_overall, rel=1e-5)


def test_paper_preset_ignores_batchnorm_shortcuts_and_fc_bias():
    r, a, b = testing.triple(testing.resnet_shapes(50), finetuned_classes=10)
    base = transferability(r, a, b, preset="paper")
    # Changing tensors the script does not read must leave every value unchanged.
    b2 = dict(b)
    for name in ("layer1.0.downsample.0.weight", "bn1.weight", "layer2.0.bn2.bias"):
        b2[name] = b[name] + 10.0
    assert transferability(r, a, b2, preset="paper").values == base.values


def test_same_shaped_head_is_an_eighteenth_group_outside_the_overall():
    r, a, b = testing.triple(testing.resnet_shapes(50))
    got = transferability(r, a, b, preset="paper")
    assert len(got.groups) == 18 and got.groups[-1] == "fc" and got.classifier == "fc"
    assert got.overall == pytest.approx(sum(got.values[:17]) / 17)
