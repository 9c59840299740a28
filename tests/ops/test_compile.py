"""torch.compile(fullgraph=True) traces through the public op functions (no graph break in
the backend routing), and the compiled results equal the eager ones."""

import pytest
import torch

import transfer_fast as tf


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("sums", [None, ("abs_diff", "dot")])
def test_multi_tensor_distance_compiles_without_graph_breaks(sums):
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(100, generator=g), torch.randn(7, 3, generator=g)]
    b = [torch.randn(100, generator=g), torch.randn(7, 3, generator=g)]
    fn = torch.compile(lambda a, b: tf.multi_tensor_distance([a], [b], sums=sums),
                       fullgraph=True, backend="aot_eager")
    got = fn(a, b)
    want = torch.stack([torch.stack([(x - y).abs().sum(), ((x - y) ** 2).sum(), (x * y).sum(),
                                     (x * x).sum(), (y * y).sum()]).double()
                        for x, y in zip(a, b)])
    asked = [0, 2] if sums else list(range(5))
    torch.testing.assert_close(got[0, 0][:, asked], want[:, asked], rtol=1e-5, atol=1e-5)
    assert got[0, 0][:, [c for c in range(5) if c not in asked]].isnan().all()


def test_channel_stats_compiles_without_graph_breaks():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    fn = torch.compile(lambda x, y: tf.ops.channel_stats(x, y, 3), fullgraph=True,
                       backend="aot_eager")
    count, mean, m2 = fn(x, y)
    for k in range(3):
        rows = x[y == k].transpose(0, 1).reshape(4, -1).double()
        if rows.shape[1]:
            torch.testing.assert_close(mean[k], rows.mean(1))
            torch.testing.assert_close(m2[k], ((rows - rows.mean(1, keepdim=True)) ** 2).sum(1))
