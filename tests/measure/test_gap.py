"""bn_gap and intraclass_variance against the formulas written out in float64/numpy."""

import numpy as np
import pytest
import torch
from test_features import captured_inputs, data, model
from torch import nn

import transfer_fast as tf


def pretrained_like(seed=0):
    """A model whose running statistics differ from what the test data produces."""
    net = model(seed)
    g = torch.Generator().manual_seed(seed + 10)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def expected_gap(net, x, metric):
    acts = captured_inputs(net, x)
    out = []
    for name, m in net.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        a = acts[name].movedim(1, -1).reshape(-1, m.num_features).numpy()
        mu_b, var_b = a.mean(0), a.var(0, ddof=1) + m.eps
        mu_a = m.running_mean.double().numpy()
        var_a = m.running_var.double().numpy() + m.eps
        if metric == "w2":
            w2 = (mu_a - mu_b) ** 2 + (np.sqrt(var_a) - np.sqrt(var_b)) ** 2
            out.append(np.sqrt(np.mean(w2)))
        else:
            kl_ab = 0.5 * (var_a / var_b + (mu_b - mu_a) ** 2 / var_b - 1 + np.log(var_b / var_a))
            kl_ba = 0.5 * (var_b / var_a + (mu_a - mu_b) ** 2 / var_a - 1 + np.log(var_a / var_b))
            out.append(np.mean(kl_ab + kl_ba))
    return out


@pytest.mark.parametrize("metric", ["w2", "skl"])
def test_bn_gap_matches_the_formula(metric):
    net = pretrained_like()
    x, _ = data(40)
    result = tf.bn_gap(net, list(x.split(16)), metric=metric, progress=False)
    assert result.layers == ["bn1", "bn2", "bn3"] and result.channels == [8, 16, 16]
    np.testing.assert_allclose(result.values, expected_gap(net, x, metric), rtol=1e-9)
    assert result.mean == pytest.approx(np.mean(result.values))
    assert result.samples == 40


def test_bn_gap_is_zero_for_the_data_the_statistics_came_from():
    net = model()
    x, _ = data(64)
    with tf.FeatureStats(net, penultimate=False) as stats:
        stats.update(x)
    for name, m in net.named_modules():  # running stats := the data's own statistics
        if name in stats.layers:
            m.running_mean.copy_(stats.layers[name].mean)
            m.running_var.copy_(stats.layers[name].variance(unbiased=True))
    stats2 = tf.FeatureStats(net, penultimate=False)
    stats2.update(x)
    # bn1's input does not depend on BN statistics; later inputs do, so only bn1 is exact
    # (up to the float32 storage of the running statistics).
    assert tf.bn_gap(net, stats2).values[0] == pytest.approx(0.0, abs=1e-6)
    assert tf.bn_gap(pretrained_like(), stats2).values[0] > 0.1


def test_bn_gap_plot_table_json(tmp_path):
    result = tf.bn_gap(pretrained_like(), [data(16)[0]], progress=False)
    result.plot(tmp_path / "gap.png")
    result.write_json(tmp_path / "gap.json")
    assert (tmp_path / "gap.png").stat().st_size > 1000
    assert "bn3" in result.format_table() and (tmp_path / "gap.json").read_text().count("bn")


def test_bn_gap_without_batchnorm_names_the_alternative():
    with pytest.raises(tf.TransferFastError, match="frechet_distance"):
        tf.bn_gap(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), [torch.randn(2, 1, 8, 8)])


def test_intraclass_variance_matches_numpy():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 12, generator=g) * 3
    labels = torch.randint(0, 5, (400,), generator=g)
    spread = torch.rand(5, 1, generator=g) + 0.2
    x = centres[labels] + torch.randn(400, 12, generator=g) * spread[labels]
    got = tf.intraclass_variance(tf.channel_stats(x, labels, 5))
    xs, ys = x.double().numpy(), labels.numpy()
    per_class = [xs[ys == k].var(0).sum() for k in range(5)]
    total = xs.var(0).sum()
    assert got.raw == pytest.approx(np.mean(per_class), rel=1e-10)
    assert got.domain_width == pytest.approx(total, rel=1e-10)
    assert got.normalised == pytest.approx(np.mean(per_class) / total, rel=1e-10)
    assert got.num_classes == 5
    with pytest.raises(tf.TransferFastError, match="per-class"):
        tf.intraclass_variance(tf.channel_stats(x))


def test_intraclass_variance_of_feature_stats_and_data_amount():
    net = model()
    x, y = data(40)
    with tf.FeatureStats(net) as stats:
        stats.update(x, y)
    feats = captured_inputs(net, x)["fc"].numpy()
    want = np.mean([feats[y.numpy() == k].var(0).sum() for k in range(4)]) / feats.var(0).sum()
    assert tf.intraclass_variance(stats).normalised == pytest.approx(want, rel=1e-9)
    assert tf.data_amount(stats) == 40 and tf.data_amount(list(range(7))) == 7
