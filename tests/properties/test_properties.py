"""Property-based tests (hypothesis): layer arguments against the per-sample oracle, exact IMP
counts, the routing functions' invariants and the compact storage round trip, over generated
inputs rather than a hand-picked list."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from padnet.deploy.compact import pack, unpack
from padnet.layers import DynamicConv2d, mask_from_scores
from padnet.ops import routing as rt
from padnet.partition import partition_model
from reference import make_routing, per_sample_conv

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = settings(max_examples=25, deadline=None)


@st.composite
def conv_arguments(draw) -> dict:
    groups = draw(st.sampled_from([1, 2]))
    return {
        "in_channels": groups * draw(st.integers(1, 3)),
        "out_channels": groups * draw(st.integers(1, 3)),
        "kernel_size": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "stride": draw(st.integers(1, 2)),
        "padding": draw(st.integers(0, 2)),
        "dilation": draw(st.integers(1, 2)),
        "groups": groups,
        "bias": draw(st.booleans()),
        "num_kernels": draw(st.integers(1, 3)),
        "routing": draw(st.sampled_from(["softmax", "sigmoid"])),
        "dynamic_ratio": draw(st.floats(0.0, 1.0)),
        "path": draw(st.sampled_from(["grouped", "mixture", "unfold"])),
    }


@FAST
@given(args=conv_arguments(), batch=st.integers(1, 3), size=st.integers(5, 8),
       seed=st.integers(0, 2**16))
def test_dynamic_conv_equals_the_per_sample_oracle_for_any_arguments(args, batch, size,
                                                                     seed) -> None:
    torch.manual_seed(seed)
    layer = DynamicConv2d(**args).double()
    x = torch.randn(batch, args["in_channels"], size, size, dtype=torch.float64)
    routing = make_routing(layer, batch, torch.Generator().manual_seed(seed), torch.float64)
    plain = nn.Conv2d(args["in_channels"], args["out_channels"], args["kernel_size"],
                      args["stride"], args["padding"], args["dilation"], args["groups"])
    out = layer(x, routing)
    assert out.shape == plain.double()(x).shape
    torch.testing.assert_close(out, per_sample_conv(layer, x, routing))


@FAST
@given(scores=st.lists(st.integers(0, 4), min_size=1, max_size=40), data=st.data())
def test_mask_from_scores_keeps_exactly_the_highest_with_ties_to_the_lower_index(scores,
                                                                                 data) -> None:
    k = data.draw(st.integers(0, len(scores)))
    mask = mask_from_scores(torch.tensor(scores, dtype=torch.float64), k)
    assert int(mask.sum()) == k
    chosen = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    assert mask.nonzero().view(-1).tolist() == sorted(chosen)


@FAST
@given(channels=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       ratio=st.floats(0.0, 1.0), iterations=st.integers(1, 3),
       scope=st.sampled_from(["global", "layer"]), seed=st.integers(0, 100))
def test_imp_counts_are_exact_for_any_sizes_ratios_and_iterations(channels, ratio, iterations,
                                                                  scope, seed) -> None:
    torch.manual_seed(seed)
    layers, c = [], 1
    for out in channels:
        layers += [DynamicConv2d(c, out, 3, padding=1, num_kernels=2), nn.ReLU()]
        c = out
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 16, 2))
    data = [(torch.randn(4, 1, 4, 4), torch.randint(0, 2, (4,)))]
    result = partition_model(model, data, dynamic_ratio=ratio, iterations=iterations,
                             scope=scope, score="random", seed=seed)
    sizes = result.numel
    if scope == "global":
        assert sum(result.num_dynamic) == round(ratio * sum(sizes))
    else:
        assert result.num_dynamic == [round(ratio * n) for n in sizes]


@FAST
@given(n=st.integers(1, 30), e=st.integers(1, 6), data=st.data())
def test_top_k_gating_picks_distinct_best_experts_with_their_gates(n, e, data) -> None:
    k = data.draw(st.integers(1, e))
    logits = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=n * e,
                                             max_size=n * e)), dtype=torch.float64).view(n, e)
    gates, experts = rt.top_k_gating(logits, k)
    assert gates.shape == experts.shape == (n, k)
    assert all(len(set(row)) == k for row in experts.tolist())
    kept = logits.gather(1, experts)
    assert bool((kept[:, :-1] >= kept[:, 1:]).all())  # decreasing logits
    outside = logits.scatter(1, experts, float("-inf")).max(1).values
    assert bool((kept[:, -1] >= outside).all())  # nothing better left out
    if k == 1:  # the kept probability
        torch.testing.assert_close(gates, logits.softmax(-1).gather(1, experts))
    else:
        torch.testing.assert_close(gates.sum(1), torch.ones(n, dtype=torch.float64))


@FAST
@given(n=st.integers(1, 40), e=st.integers(1, 6), factor=st.floats(0.1, 3.0), data=st.data())
def test_capacity_keep_never_exceeds_capacity_and_keeps_earlier_slots(n, e, factor,
                                                                      data) -> None:
    k = data.draw(st.integers(1, e))
    experts = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    cap = rt.expert_capacity(n, k, e, factor)
    keep = rt.capacity_keep(experts, e, cap)
    counts = torch.bincount(experts[keep], minlength=e)
    assert int(counts.max()) <= cap
    for expert in range(e):  # an expert drops an assignment only when it is full
        assigned = int((experts == expert).sum())
        assert int(counts[expert]) == min(assigned, cap)


@FAST
@given(n=st.integers(1, 30), e=st.integers(2, 6), data=st.data())
def test_load_balancing_loss_is_e_times_f_dot_p(n, e, data) -> None:
    k = data.draw(st.integers(1, e))
    logits = torch.randn(n, e, dtype=torch.float64)
    _, experts = rt.top_k_gating(logits, k)
    f = torch.zeros(e, dtype=torch.float64)
    for row in experts.tolist():
        for x in row:
            f[x] += 1 / (n * k)
    p = logits.softmax(-1).mean(0)
    loss = rt.load_balancing_loss(logits, experts)
    assert math.isclose(float(loss), e * float((f * p).sum()), rel_tol=1e-12)


@FAST
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), k=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_compact_storage_round_trips_any_mask(shape, k, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < 0.5
    dynamic = torch.randn(k, *shape, generator=gen) * mask
    static = torch.randn(shape, generator=gen) * ~mask
    got_dynamic, got_static, got_mask = unpack(pack(dynamic, static, mask), tuple(shape))
    assert torch.equal(got_mask, mask)
    assert torch.equal(got_dynamic, dynamic) and torch.equal(got_static, static)
