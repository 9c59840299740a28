"""FeatureStats hooks, merge, save/load and all_reduce against float64 statistics of the inputs."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import transfer_fast as tf


class SmallNet(nn.Module):
    """conv-BN stages, a BN1d on the pooled features, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.bn3 = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.bn3(x.mean((2, 3))))


def model(seed=0):
    torch.manual_seed(seed)
    return SmallNet().eval()


def captured_inputs(net, x):
    """The inputs of every BN layer and of fc, captured with plain hooks (independent)."""
    seen, handles = {}, []
    for name, m in net.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.Linear)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.setdefault(name, []).append(inp[0].double())))
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_statistics_of_every_bn_input_and_the_penultimate_features():
    net = model()
    x, y = data()
    stats = tf.FeatureStats(net)
    for xb, yb in zip(x.split(10), y.split(10)):
        stats.update(xb, yb)
    stats.close()
    ref = captured_inputs(net, x)
    assert set(stats.layers) == set(ref) and stats.penultimate == "fc" and stats.samples == 48
    for name, act in ref.items():
        per_channel = act.movedim(1, -1).reshape(-1, act.shape[1])
        got = stats.layers[name]
        assert torch.allclose(got.mean, per_channel.mean(0), rtol=1e-10, atol=1e-12), name
        assert torch.allclose(got.variance(unbiased=True), per_channel.var(0), rtol=1e-9), name
        for k in range(4):  # class statistics too
            rows = act[y == k].movedim(1, -1).reshape(-1, act.shape[1])
            assert torch.allclose(got.class_mean[k], rows.mean(0), rtol=1e-10, atol=1e-12)
    feats = ref["fc"]
    mean, cov = stats.gaussian()
    assert torch.allclose(mean, feats.mean(0), atol=1e-12)
    assert torch.allclose(cov, torch.cov(feats.T), rtol=1e-9, atol=1e-12)


def test_model_mode_restored_and_hooks_removed():
    net = model().train()
    with tf.FeatureStats(net) as stats:
        stats.update(data(8)[0])
        assert net.training
    before = stats.layers["bn1"].count
    with torch.no_grad():
        net(data(8)[0])
    assert stats.layers["bn1"].count == before  # closed: no more accumulation


def test_merge_of_shards_equals_one_pass_and_save_load_round_trip(tmp_path):
    net = model()
    x, y = data(60)
    whole = tf.FeatureStats(net)
    whole.update(x, y)
    a, b = tf.FeatureStats(net), tf.FeatureStats(net)
    a.update(x[:25], y[:25])
    b.update(x[25:], y[25:])
    merged = a.merge(b)
    for name in whole.layers:
        assert torch.allclose(merged.layers[name].class_m2, whole.layers[name].class_m2,
                              rtol=1e-10, atol=1e-12)
    assert torch.allclose(merged.covariance.comoment, whole.covariance.comoment, rtol=1e-10,
                          atol=1e-12)
    path = tmp_path / "stats.safetensors"
    merged.save(path)
    back = tf.FeatureStats.load(path)
    assert back.samples == 60 and back.penultimate == "fc" and list(back.layers) == list(
        merged.layers)
    for name in merged.layers:
        assert torch.equal(back.layers[name].class_mean, merged.layers[name].class_mean)
    assert torch.equal(back.gaussian()[1], merged.gaussian()[1])
    assert isinstance(back, tf.FeatureState) and not hasattr(back, "update")  # no model


def test_bad_inputs(tmp_path):
    net = model()
    x, y = data(10)
    stats = tf.FeatureStats(net, num_classes=4)
    with pytest.raises(tf.TransferFastError, match="outside"):
        stats.update(x, torch.full((10,), 4))
    with pytest.raises(tf.TransferFastError, match="shape"):
        stats.update(x, y[:5])
    bad = x.clone()
    bad[3, 0, 2, 2] = float("nan")
    with pytest.raises(tf.TransferFastError, match="NaN or Inf at the input of 'bn1'"):
        stats.update(bad)
    with pytest.raises(tf.TransferFastError, match="no module 'nope'"):
        tf.FeatureStats(net, ["nope"])
    with pytest.raises(tf.TransferFastError, match="no module to watch"):
        tf.FeatureStats(nn.Sequential(nn.ReLU()))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(tf.TransferFastError, match="junk.safetensors"):
        tf.FeatureStats.load(tmp_path / "junk.safetensors")
    with pytest.raises(tf.TransferFastError, match="missing.safetensors: cannot open"):
        tf.FeatureStats.load(tmp_path / "missing.safetensors")


def _rank(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = data(40)
    stats = tf.FeatureStats(model())
    stats.update(x[rank::world], y[rank::world])
    stats.all_reduce()
    if rank == 0:
        stats.save(out)
    dist.destroy_process_group()


def test_all_reduce_across_two_gloo_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "reduced.safetensors"
    mp.spawn(_rank, args=(2, port, str(out)), nprocs=2, join=True)
    reduced = tf.FeatureStats.load(out)
    x, y = data(40)
    whole = tf.FeatureStats(model())
    whole.update(x, y)
    assert reduced.samples == 40
    for name in whole.layers:
        assert torch.allclose(reduced.layers[name].m2, whole.layers[name].m2, rtol=1e-9)


def test_periodic_consolidation_gives_the_same_statistics(monkeypatch):
    import transfer_fast.measure.features as features

    net = model()
    x, y = data(50)
    with tf.FeatureStats(net) as lazy:
        for xb, yb in zip(x.split(10), y.split(10)):
            lazy.update(xb, yb)
    monkeypatch.setattr(features, "MAX_PARTS", 2)
    with tf.FeatureStats(net) as eager:
        for xb, yb in zip(x.split(10), y.split(10)):
            eager.update(xb, yb)
    ref = captured_inputs(net, x)
    for name in ref:
        want = ref[name].movedim(1, -1).reshape(-1, ref[name].shape[1]).var(0)
        for stats in (lazy, eager):
            got = stats.layers[name].variance(unbiased=True)
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), name


class Conv1dNet(nn.Module):
    """BatchNorm1d on (N, C, L) sequences: channels at dim 1, not last."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv1d(2, 5, 3), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(2))


def test_batchnorm1d_on_sequences_takes_channels_from_dim_1():
    torch.manual_seed(0)
    net = Conv1dNet().eval()
    x = torch.randn(6, 2, 9)
    with tf.FeatureStats(net) as stats:
        stats.update(x)
    act = net.conv(x).detach().double()
    want = act.transpose(1, 2).reshape(-1, 5)
    assert stats.layers["bn"].channels == 5
    assert torch.allclose(stats.layers["bn"].mean, want.mean(0), atol=1e-12)
    assert tf.bn_gap(net, stats).channels == [5]


def test_class_sorted_batches_grow_the_classes_and_stray_forwards_are_ignored():
    net = model()
    x, y = data(40)
    order = torch.argsort(y)
    x, y = x[order], y[order]
    with tf.FeatureStats(net) as stats:
        for xb, yb in zip(x.split(10), y.split(10)):
            stats.update(xb, yb)
        with torch.no_grad():
            net(x)  # outside update(): not recorded
        with pytest.raises(tf.TransferFastError, match="cannot be mixed"):
            stats.update(x)
    assert stats.samples == 40 and stats.layers["bn1"].num_classes == 4
    assert stats.layers["bn1"].count == 40 * 8 * 8
    # bn_gap on a class-sorted loader needs no labels at all.
    assert len(tf.bn_gap(net, list(zip(x.split(10), y.split(10))), progress=False).values) == 3


def test_a_batch_with_nan_leaves_the_statistics_unchanged():
    net = model()
    x, _ = data(20)
    with tf.FeatureStats(net) as stats:
        stats.update(x[:10])
        before = stats.layers["bn2"].m2.clone()
        bad = x[10:].clone()
        bad[0, 0, 0, 0] = float("inf")
        with pytest.raises(tf.TransferFastError, match="NaN or Inf"):
            stats.update(bad)
    assert torch.equal(stats.layers["bn2"].m2, before) and stats.samples == 10


def test_scores_are_fed_the_penultimate_features_in_the_same_forward_pass():
    """ScoreStats fed by the hooks equals the in-memory scores of the captured fc inputs,
    whose float64 references are tested in tests/measure/test_scores.py."""
    net = model()
    x, y = data(60)
    scores = tf.ScoreStats()
    with tf.FeatureStats(net, scores=scores, source_probs=True) as stats:
        for xb, yb in zip(x.split(16), y.split(16)):
            stats.update(xb, yb)
    feats = captured_inputs(net, x)["fc"]
    with torch.no_grad():
        probs = net(x).double().softmax(1)
    got = scores.compute()
    assert got["hscore"] == pytest.approx(tf.hscore(feats, y), rel=1e-6)
    assert got["logme"] == pytest.approx(tf.logme(feats, y), rel=1e-6)
    assert got["leep"] == pytest.approx(tf.leep(probs, y), rel=1e-5)
    assert got["nce"] == pytest.approx(tf.nce(probs.argmax(1), y), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_a_nan_batch_is_refused_by_the_next_call_or_read():
    """The finiteness flag of a GPU batch is checked one call later (no synchronisation
    per batch): the bad batch and the batch of the call that reports it are not added."""
    net = model().cuda()
    x, _ = data(30)
    bad = x[10:20].clone()
    bad[0, 0, 0, 0] = float("nan")
    with tf.FeatureStats(net) as stats:
        stats.update(x[:10])
        try:
            stats.update(bad)
            stats.update(x[20:])
        except tf.TransferFastError as exc:
            assert "NaN or Inf at the input of 'bn1'" in str(exc)
        else:
            pytest.fail("the NaN batch was accepted")
        assert stats.samples == 10
    with tf.FeatureStats(net) as clean:
        clean.update(x[:10])
    assert torch.equal(stats.layers["bn2"].m2, clean.layers["bn2"].m2)
    with tf.FeatureStats(net) as read:
        read.update(x[:10])
        read.update(bad)
        with pytest.raises(tf.TransferFastError, match="NaN or Inf"):
            read.layers  # noqa: B018
        assert read.samples == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_statistics_equal_the_cpu_ones(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions
    net = model()
    x, y = data(40)
    with tf.FeatureStats(net) as cpu:
        for xb, yb in zip(x.split(10), y.split(10)):
            cpu.update(xb, yb)
    with tf.FeatureStats(net.cuda()) as gpu:
        for xb, yb in zip(x.split(10), y.split(10)):
            gpu.update(xb, yb)
    assert gpu.samples == 40
    for name, want in cpu.layers.items():
        got = gpu.layers[name]
        assert torch.allclose(got.class_mean.cpu(), want.class_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got.variance().cpu(), want.variance(), rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_side_stream_gives_the_same_bits_as_one_stream(monkeypatch):
    """The statistics kernels run beside the forward pass on a second stream; the results
    are those of the same kernels on the main stream, bit for bit."""
    import transfer_fast.measure.features as features

    net = model().cuda()
    x, y = data(40)
    results = []
    for side in (True, False):
        monkeypatch.setattr(features, "SIDE_STREAM", side)
        with tf.FeatureStats(net) as stats:
            for xb, yb in zip(x.split(10), y.split(10)):
                stats.update(xb, yb)
            results.append({k: v.class_m2.clone() for k, v in stats.layers.items()})
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
