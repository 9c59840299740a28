"""Planning time: linear in the number of tensors, and a cached plan costs one hash.

Workloads (names and shapes only matter; the tensors are tiny):

  modules_100k     100,000 one-tensor modules `blocks_{i}.weight`, the generic preset's
                   worst case (one group per module), three sets
  llama_80         an 80-layer Llama's names (723 tensors), the transformer preset

Entries: `plan` (the cache emptied every round: the full planning) and `cached` (the
same call again: the signature hash and a lookup). Goal (issue 11): 100,000 modules
plan in well under 2 s (it took 101 s before planning was made linear).
"""

from __future__ import annotations

import pytest
import torch

import transfer_fast
from transfer_fast.measure import plan as plan_module
from transfer_fast.testing import llama_shapes

WORKLOADS = {
    "modules_100k": lambda: {f"blocks_{i}.weight": torch.empty(4) for i in range(100_000)},
    "llama_80": lambda: {n: torch.empty(s) for n, s in llama_shapes(layers=80, dim=8, vocab=16,
                                                                      hidden=8).items()},
}


@pytest.fixture(scope="module", params=list(WORKLOADS))
def states(request):
    state = WORKLOADS[request.param]()
    return request.param, [state, dict(state), dict(state)]


def test_plan(benchmark, states):
    name, sets = states
    benchmark.group = f"plan_{name}"
    benchmark.extra_info.update(entry="plan", tensors=len(sets[0]))

    def fresh():
        plan_module._cache.clear()
        return transfer_fast.make_plan(sets)

    plan = benchmark.pedantic(fresh, rounds=5, iterations=1, warmup_rounds=1)
    assert len(plan.names) == len(sets[0])


def test_cached(benchmark, states):
    name, sets = states
    benchmark.group = f"plan_{name}"
    benchmark.extra_info.update(entry="cached", tensors=len(sets[0]))
    first = transfer_fast.make_plan(sets)
    assert benchmark(transfer_fast.make_plan, sets) is first
