"""MoE routing and dispatch ops: top-k ties, gates, capacity, auxiliary losses, grouped matmul."""

from __future__ import annotations

import math

import pytest
import torch

from padnet.ops import dispatch as dsp
from padnet.ops import routing as rt
from reference_moe import capacity_oracle, load_balance_oracle

TIED = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0]])


def test_top_k_ties_go_to_the_lower_expert_index() -> None:
    for _ in range(3):  # deterministic from run to run
        _, experts = rt.top_k_gating(TIED, 2)
        assert experts.tolist() == [[0, 1], [1, 2], [0, 1]]
    big = torch.zeros(1000, 8)  # all tied, many tokens: still expert 0, 1, 2
    assert (rt.top_k_gating(big, 3)[1] == torch.tensor([0, 1, 2])).all()


def test_tied_experts_get_equal_gates() -> None:
    gates, _ = rt.top_k_gating(TIED, 2)
    torch.testing.assert_close(gates, torch.full((3, 2), 0.5))


def test_gates_are_the_softmax_over_the_kept_logits() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    gates, experts = rt.top_k_gating(logits, 2)
    assert experts.tolist() == [[1, 3]]
    torch.testing.assert_close(gates, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))


def test_top_1_gate_is_the_kept_probability() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    gates, experts = rt.top_k_gating(logits, 1)
    assert experts.tolist() == [[1]]
    torch.testing.assert_close(gates, torch.softmax(logits, -1)[:, 1:2])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_gates_pass_a_task_gradient_to_the_logits_at_every_k(k) -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0], [1.0, 0.0, 0.3, -0.2]], requires_grad=True)
    gates, _ = rt.top_k_gating(logits, k)
    weights = torch.tensor([[1.0, -2.0, 0.5][:k], [0.3, 1.0, -1.0][:k]])
    (gates * weights).sum().backward()
    assert float(logits.grad.abs().sum()) > 0


def test_router_logits_are_at_least_fp32() -> None:
    x, w = torch.randn(5, 4, dtype=torch.bfloat16), torch.randn(3, 4, dtype=torch.bfloat16)
    out = rt.router_logits(x, w)
    assert out.dtype == torch.float32 and out.shape == (5, 3)
    torch.testing.assert_close(out, x.float() @ w.float().t())
    assert rt.router_logits(x.double(), w.double()).dtype == torch.float64


def test_load_balancing_hand_computed() -> None:
    # token 0: probs (0.75, 0.25) -> expert 0; token 1: probs (0.5, 0.5), a tie -> expert 0
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    _, experts = rt.top_k_gating(logits, 1)
    # f = (1, 0), P = (0.625, 0.375): 2 * (1 * 0.625)
    assert rt.load_balancing_loss(logits, experts).item() == pytest.approx(1.25)
    # perfectly even router: loss 1
    even = torch.zeros(4, 4)
    experts = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert rt.load_balancing_loss(even, experts).item() == pytest.approx(1.0)


def test_load_balancing_matches_loop_oracle_top2() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 5, dtype=torch.float64)
    valid = torch.rand(12) > 0.3
    _, experts = rt.top_k_gating(logits, 2)
    got = rt.load_balancing_loss(logits, experts, valid).item()
    assert got == pytest.approx(load_balance_oracle(logits, 2, valid.tolist()), rel=1e-12)


def test_z_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected = (math.log(2.0) ** 2 + (1 + math.log(2.0)) ** 2) / 2
    assert rt.router_z_loss(logits).item() == pytest.approx(expected)


def real_and_padded_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six real tokens' logits, the same with five padding tokens (extreme logits) in the middle,
    and the mask of real tokens."""
    torch.manual_seed(1)
    real = torch.randn(6, 4)
    padded = torch.cat([real[:3], 50 * torch.randn(5, 4), real[3:]])
    valid = torch.tensor([True] * 3 + [False] * 5 + [True] * 3)
    return real, padded, valid


@pytest.mark.parametrize("k", [1, 2])
def test_padding_tokens_do_not_change_the_load_balancing_loss(k: int) -> None:
    real, padded, valid = real_and_padded_logits()
    _, e_real = rt.top_k_gating(real, k)
    _, e_pad = rt.top_k_gating(padded, k)
    torch.testing.assert_close(
        rt.load_balancing_loss(padded, e_pad, valid), rt.load_balancing_loss(real, e_real)
    )


def test_padding_tokens_do_not_change_the_z_loss() -> None:
    real, padded, valid = real_and_padded_logits()
    torch.testing.assert_close(rt.router_z_loss(padded, valid), rt.router_z_loss(real))


def test_z_loss_without_real_tokens_is_zero() -> None:
    _, padded, _ = real_and_padded_logits()
    none_valid = torch.zeros(11, dtype=torch.bool)  # no real token at all: 0, not NaN
    assert rt.router_z_loss(padded, none_valid).item() == 0.0


def test_capacity_hand_computed_slot_priority() -> None:
    # capacity 1 per expert: slot 0 of every token comes before any slot 1
    experts = torch.tensor([[0, 1], [1, 0], [0, 2]])
    keep = rt.capacity_keep(experts, 3, 1)
    assert keep.tolist() == [[True, False], [True, False], [False, True]]


def test_expert_capacity_formula() -> None:
    assert rt.expert_capacity(3, 2, 3, 0.5) == 1
    assert rt.expert_capacity(10, 2, 4, 1.25) == math.ceil(1.25 * 10 * 2 / 4)
    assert rt.expert_capacity(10, 2, 4, None) is None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_capacity_matches_oracle_with_padding(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    experts = torch.stack([torch.randperm(5, generator=gen)[:k] for _ in range(20)])
    valid = torch.rand(20, generator=gen) > 0.25
    for cap in (0, 1, 3, 7, 100):
        keep = rt.capacity_keep(experts, 5, cap, valid)
        assert keep.tolist() == capacity_oracle(experts.tolist(), 5, cap, valid.tolist())


@pytest.mark.parametrize(
    ("num_experts", "top_k", "capacity", "match"),
    [
        (4, 5, None, "top_k"),
        (4, 0, None, "top_k"),
        (0, 1, None, "num_experts"),
        (2.0, 1, None, "num_experts"),
        (4, 2, 0.0, "capacity_factor"),
        (4, 2, -1.0, "capacity_factor"),
        (4, 2, float("nan"), "capacity_factor"),
        (4, 2, True, "capacity_factor"),
    ],
)
def test_bad_routing_arguments(num_experts, top_k, capacity, match) -> None:
    with pytest.raises(ValueError, match=match):
        rt.check_routing_args(num_experts, top_k, capacity)


ONES = torch.ones(1000, 4)


def test_jitter_noise_scales_within_its_band() -> None:
    jit = rt.add_router_noise(ONES, "jitter", 0.1)
    assert ((jit >= 0.9) & (jit <= 1.1)).all() and jit.std() > 0.01


def test_gaussian_noise_has_the_given_std() -> None:
    gauss = rt.add_router_noise(ONES, "gaussian", 0.5)
    assert abs((gauss - ONES).std().item() - 0.5) < 0.05


def test_zero_noise_returns_the_input() -> None:
    assert rt.add_router_noise(ONES, "gaussian", 0.0) is ONES


def test_unknown_router_noise_raises() -> None:
    with pytest.raises(ValueError, match="router_noise"):
        rt.add_router_noise(ONES, "uniform", 0.1)


# ---- dispatch -------------------------------------------------------------------------------
def _routing(n: int, k: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    return torch.rand(n, k, generator=gen, dtype=torch.float64), experts


SLOTS = torch.tensor([[2, 0], [0, 1], [2, 1]])


def test_sort_by_expert_groups_tokens_stably() -> None:
    d = dsp.sort_by_expert(SLOTS, 4)
    assert d.counts == [2, 2, 2, 0]
    assert d.expert.tolist() == [0, 0, 1, 1, 2, 2]
    assert d.token.tolist() == [0, 1, 1, 2, 0, 2]  # token order kept inside each expert
    assert d.flat.tolist() == [1, 2, 3, 5, 0, 4]


def test_sort_by_expert_leaves_out_dropped_slots() -> None:
    keep = torch.tensor([[True, False], [True, True], [False, True]])
    d = dsp.sort_by_expert(SLOTS, 4, keep)
    assert d.counts == [1, 2, 1, 0] and d.token.tolist() == [1, 1, 2, 0]


@pytest.mark.parametrize("path", dsp.GROUPED_PATHS)
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_and_combine_match_a_loop(path: str, bias: bool) -> None:
    torch.manual_seed(0)
    n, k, e, d_in, d_out = 9, 2, 4, 3, 5
    gates, experts = _routing(n, k, e, seed=3)
    keep = torch.rand(n, k) > 0.2
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(e, d_out, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(e, d_out, dtype=torch.float64, requires_grad=True) if bias else None
    d = dsp.sort_by_expert(experts, e, keep)
    out = dsp.combine(dsp.grouped_linear(x[d.token], d, w, b, path=path), d, gates)
    ref = torch.zeros(n, d_out, dtype=torch.float64)
    for t in range(n):
        for s in range(k):
            if keep[t, s]:
                i = experts[t, s]
                ref[t] += gates[t, s] * (w[i] @ x[t] + (b[i] if bias else 0))
    torch.testing.assert_close(out, ref)
    params = [x, w] + ([b] if bias else [])
    g_out = torch.autograd.grad(out.square().sum(), params)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, r in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, r)


def nothing_kept():
    """Gates, and a dispatch of 4 tokens x 2 slots over 3 experts that keeps no slot."""
    gates, experts = _routing(4, 2, 3, seed=0)
    return gates, dsp.sort_by_expert(experts, 3, torch.zeros(4, 2, dtype=torch.bool))


@pytest.mark.parametrize("path", dsp.GROUPED_PATHS)
def test_dispatch_with_nothing_kept(path: str) -> None:
    gates, d = nothing_kept()
    x = torch.randn(0, 6, dtype=torch.float64)
    y = dsp.grouped_linear(x, d, torch.randn(3, 5, 6, dtype=torch.float64), path=path)
    assert y.shape == (0, 5)
    assert (dsp.combine(y, d, gates) == 0).all()


def test_grouped_linear_rejects_an_unknown_path() -> None:
    _, d = nothing_kept()
    with pytest.raises(ValueError, match="path"):
        dsp.grouped_linear(torch.randn(0, 6), d, torch.randn(3, 5, 6), path="scatter")


def _ffn_case(bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n, k, e, h, i = 10, 2, 4, 3, 5
    experts = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    experts[experts == 3] = 2  # expert 3 gets no token
    d = dsp.sort_by_expert(experts, e)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, w1, w2 = rnd(n * k, h), rnd(e, i, h), rnd(e, h, i)
    b1, b2 = (rnd(e, i), rnd(e, h)) if bias else (None, None)
    return d, x, w1, b1, w2, b2


def _factor(kind: str | None, shape, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "scalar":
        return torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    return torch.rand(shape, generator=gen, dtype=torch.float64).requires_grad_()


FFN_CASES = pytest.mark.parametrize(
    ("bias", "factor", "static"),
    [(True, None, False), (True, "scalar", False), (False, "matrix", True),
     (True, "matrix", False), (True, None, True), (False, "scalar", True)],
)


def ffn_case_and_reference(bias: bool, factor, static: bool):
    """A grouped FFN's dispatch, input and two ``(weight, factor, static, bias)`` tuples, and the
    reference output built from ``grouped_linear`` on the effective weights."""
    d, x, w1, b1, w2, b2 = _ffn_case(bias)
    f1, f2 = _factor(factor, w1.shape[1:], 1), _factor(factor, w2.shape[1:], 2)
    s1 = torch.randn(w1.shape[1:], dtype=torch.float64, requires_grad=True) if static else None
    s2 = torch.randn(w2.shape[1:], dtype=torch.float64, requires_grad=True) if static else None

    def eff(w, f, s):
        w = w if f is None else w * f
        return w if s is None else w + s

    pre = dsp.grouped_linear(x, d, eff(w1, f1, s1), b1)
    ref = dsp.grouped_linear(torch.tanh(pre), d, eff(w2, f2, s2), b2)
    return d, x, (w1, f1, s1, b1), (w2, f2, s2, b2), ref


@pytest.mark.parametrize("path", dsp.GROUPED_PATHS)
@FFN_CASES
def test_grouped_ffn_matches_autograd_reference(path: str, bias: bool, factor, static) -> None:
    d, x, first, second, ref = ffn_case_and_reference(bias, factor, static)
    got = dsp.grouped_ffn(x, d, first, second, torch.tanh, path=path)
    torch.testing.assert_close(got, ref)
    inputs = [t for t in (x, *first, *second) if t is not None]
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((got * g).sum(), inputs),
                    torch.autograd.grad((ref * g).sum(), inputs), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", dsp.GROUPED_PATHS)
@FFN_CASES
def test_grouped_ffn_inference_branch_matches_the_reference(path: str, bias: bool, factor,
                                                            static) -> None:
    d, x, first, second, ref = ffn_case_and_reference(bias, factor, static)
    with torch.no_grad():
        nograd = dsp.grouped_ffn(x, d, first, second, torch.tanh, path=path)
    torch.testing.assert_close(nograd, ref.detach())


def test_grouped_ffn_gradcheck() -> None:
    d, x, w1, b1, w2, b2 = _ffn_case(True, seed=1)
    f1 = _factor("matrix", w1.shape[1:], 3)
    s1 = torch.randn(w1.shape[1:], dtype=torch.float64, requires_grad=True)
    f2 = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: dsp.GroupedFFN.apply(*t, None, b2, d.counts, torch.nn.functional.gelu),
        (x, w1, f1, s1, b1, w2, f2),
    )
