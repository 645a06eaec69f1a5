"""MoE / PAD-MoE layer against the per-token and per-expert oracles, and its degenerate cases."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.layers.auxiliary import aux_loss, aux_losses
from padnet.layers.moe import MoE
from reference_moe import per_expert_moe, per_token_moe, scale_factors

H, I, E = 6, 10, 4


def build(**kwargs) -> MoE:
    torch.manual_seed(0)
    kwargs.setdefault("num_experts", E)
    layer = MoE(H, I, **kwargs).double()
    with torch.no_grad():  # lam_d != lam_s != 1, different per matrix, so scale mistakes show
        layer.mode_mask1.phi.fill_(0.4)
        layer.mode_mask2.phi.fill_(-0.3)
    return layer


def params_of(layer: MoE) -> list[torch.Tensor]:
    return [p for p in layer.parameters() if p.requires_grad]


def assert_matches_oracle(layer: MoE, x: torch.Tensor, padding_mask=None) -> None:
    """Outputs and gradients (input and every parameter) equal the per-token oracle."""
    x = x.detach().requires_grad_()
    out = layer(x, padding_mask)
    ref = per_token_moe(layer, x, padding_mask)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    inputs = [x, *params_of(layer)]
    got = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), inputs, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("static_path", ["fold", "shared"])
def test_matches_per_token_oracle(top_k: int, ratio: float, static_path: str) -> None:
    layer = build(top_k=top_k, dynamic_ratio=ratio, static_path=static_path)
    assert_matches_oracle(layer, torch.randn(2, 5, H, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": "bmm", "dynamic_ratio": 0.3},
        {"path": "bmm"},
        {"bias": False},
        {"bias": False, "path": "bmm", "top_k": 3},
        {"bias": False, "dynamic_ratio": 0.6},
        {"capacity_factor": 0.6, "dynamic_ratio": 0.5},
        {"capacity_factor": 1.0, "top_k": 1, "path": "bmm"},
        {"activation": "relu", "dynamic_ratio": 0.5, "static_path": "shared"},
        {"activation": nn.SiLU(), "top_k": 1},
        {"activation": nn.ReLU(inplace=True), "top_k": 2},
        {"num_experts": 1, "top_k": 1, "dynamic_ratio": 0.5},
    ],
)
def test_variants_match_per_token_oracle(kwargs: dict) -> None:
    assert_matches_oracle(build(**kwargs), torch.randn(13, H, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["both", "static_only", "dynamic_only", "none", "prune"])
def test_scale_modes_match_oracle(mode: str) -> None:
    layer = build(dynamic_ratio=0.5, scale_mode=mode)
    assert_matches_oracle(layer, torch.randn(7, H, dtype=torch.float64))


def test_padding_mask_and_capacity_match_oracle() -> None:
    layer = build(capacity_factor=0.75, dynamic_ratio=0.5)
    mask = torch.rand(3, 6) > 0.3
    assert_matches_oracle(layer, torch.randn(3, 6, H, dtype=torch.float64), mask)


def test_probe_mask_gets_a_gradient_and_matches_oracle() -> None:
    layer = build(dynamic_ratio=0.5)
    for pad in (layer.mode_mask1, layer.mode_mask2):
        pad.mask_override = pad.mask.to(torch.float64).requires_grad_()
    x = torch.randn(9, H, dtype=torch.float64)
    out, ref = layer(x), per_token_moe(layer, x)
    torch.testing.assert_close(out, ref)
    probes = [layer.mode_mask1.mask_override, layer.mode_mask2.mask_override]
    got = torch.autograd.grad(out.sum(), probes)
    torch.testing.assert_close(got, torch.autograd.grad(ref.sum(), probes))
    assert all(g.abs().sum() > 0 for g in got)


def test_pinned_routing_matches_per_expert_oracle() -> None:
    layer = build(top_k=2, dynamic_ratio=0.5)
    x = torch.randn(11, H, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(11)])
    gates = torch.rand(11, 2, generator=gen, dtype=torch.float64)  # need not sum to 1
    for static_path in ("fold", "shared"):
        layer.static_path = static_path
        out = layer.experts_forward(x, gates, experts)
        torch.testing.assert_close(out, per_expert_moe(layer, x, gates, experts))


def test_gradcheck_tiny() -> None:
    torch.manual_seed(0)
    layer = MoE(3, 4, 3, 2, dynamic_ratio=0.5).double()
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    inputs = (x, layer.w1, layer.w2_static, layer.b2, layer.mode_mask1.phi, layer.router.weight)
    assert torch.autograd.gradcheck(lambda *args: layer(x), inputs)


# ---- degenerate equivalences -----------------------------------------------------------------
def test_kappa_one_is_the_fully_dynamic_moe_times_lam_d() -> None:
    pad = build(top_k=2, dynamic_ratio=1.0)
    plain = build(top_k=2, dynamic_ratio=1.0, scale_mode="none")
    lam1, _ = scale_factors(pad.mode_mask1.phi, "both")
    lam2, _ = scale_factors(pad.mode_mask2.phi, "both")
    with torch.no_grad():
        plain.w1.mul_(lam1)
        plain.w2.mul_(lam2)
    x = torch.randn(12, H, dtype=torch.float64)
    torch.testing.assert_close(pad(x), plain(x))


def test_kappa_one_skips_the_static_weights() -> None:
    pad = build(top_k=2, dynamic_ratio=1.0)
    pad(torch.randn(12, H, dtype=torch.float64)).sum().backward()
    assert pad.w1_static.grad is None and pad.w2_static.grad is None  # static part skipped


def static_layer() -> MoE:
    """kappa = 0 and equal expert biases: the only per-expert part left is the unused experts."""
    layer = build(top_k=2, dynamic_ratio=0.0)
    with torch.no_grad():
        layer.b1.copy_(layer.b1[0].expand_as(layer.b1))
        layer.b2.copy_(layer.b2[0].expand_as(layer.b2))
    return layer


@pytest.mark.parametrize("static_path", ["fold", "shared"])
def test_kappa_zero_is_a_static_ffn_with_lam_s(static_path: str) -> None:
    layer = static_layer()
    _, lam_s1 = scale_factors(layer.mode_mask1.phi, "both")
    _, lam_s2 = scale_factors(layer.mode_mask2.phi, "both")
    x = torch.randn(12, H, dtype=torch.float64)
    dense = F.linear(F.gelu(F.linear(x, lam_s1 * layer.w1_static, layer.b1[0])),
                     lam_s2 * layer.w2_static, layer.b2[0])
    layer.static_path = static_path
    torch.testing.assert_close(layer(x), dense)


@pytest.mark.parametrize("static_path", ["fold", "shared"])
def test_kappa_zero_gives_the_expert_weights_no_gradient(static_path: str) -> None:
    layer = static_layer()
    layer.static_path = static_path
    out = layer(torch.randn(12, H, dtype=torch.float64))
    grad_w1 = torch.autograd.grad(out.sum(), layer.w1)[0]
    assert (grad_w1 == 0).all()  # the expert weights no longer matter


@pytest.mark.parametrize("ratio", [1.0, 0.4])
def test_one_expert_moe_equals_dense_ffn(ratio: float) -> None:
    torch.manual_seed(1)
    fc1, fc2 = nn.Linear(H, I), nn.Linear(I, H)
    layer = MoE.from_dense(fc1, fc2, "gelu", num_experts=1, top_k=1, dynamic_ratio=ratio)
    x = torch.randn(3, 7, H)
    torch.testing.assert_close(layer(x), fc2(F.gelu(fc1(x))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("top_k", "ratio"), [(1, 1.0), (2, 0.5), (3, 0.0), (2, 0.1)])
def test_upcycled_moe_equals_dense_ffn(top_k: int, ratio: float) -> None:
    torch.manual_seed(2)
    fc1, fc2 = nn.Linear(H, I), nn.Linear(I, H)
    layer = MoE.from_dense(fc1, fc2, nn.GELU(), num_experts=E, top_k=top_k, dynamic_ratio=ratio)
    x = torch.randn(64, H)
    ref = fc2(F.gelu(fc1(x)))
    for static_path in ("fold", "shared"):
        layer.static_path = static_path
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_upcycling_with_noise_changes_the_experts_only() -> None:
    fc1, fc2 = nn.Linear(H, I), nn.Linear(I, H)
    layer = MoE.from_dense(fc1, fc2, num_experts=E, init="copy_noise", copy_noise_std=0.1)
    assert torch.equal(layer.w1_static, fc1.weight) and not torch.equal(layer.w1[0], fc1.weight)
    assert not torch.equal(layer.w1[0], layer.w1[1])


# ---- auxiliary losses ------------------------------------------------------------------------
def aux_layer_and_input() -> tuple[MoE, torch.Tensor, torch.Tensor]:
    """A layer with both auxiliary losses, an input of 2 x 5 tokens and its z-loss by hand."""
    layer = build(top_k=2, load_balance_coef=0.5, z_loss_coef=0.1)
    x = torch.randn(2, 5, H, dtype=torch.float64)
    logits = x.reshape(-1, H) @ layer.router.weight.t()
    return layer, x, torch.logsumexp(logits, -1).square().mean()


def test_aux_loss_is_the_weighted_sum_of_z_loss_and_load_balance() -> None:
    layer, x, z = aux_layer_and_input()
    layer(x)
    torch.testing.assert_close(layer.aux_terms["z_loss"], z)
    torch.testing.assert_close(layer.aux_loss, 0.5 * layer.aux_terms["load_balance"] + 0.1 * z)


def test_expert_counts_count_every_routed_slot() -> None:
    layer, x, _ = aux_layer_and_input()
    layer(x)
    assert int(layer.aux_terms["expert_counts"].sum()) == 2 * 5 * 2


def test_padding_tokens_change_neither_outputs_nor_aux_losses() -> None:
    layer, x, z = aux_layer_and_input()
    out = layer(x)
    # append padding tokens (garbage values): real outputs and aux losses unchanged
    xp = torch.cat([x, 30 * torch.randn(2, 3, H, dtype=torch.float64)], dim=1)
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], dim=1).bool()
    outp = layer(xp, mask)
    torch.testing.assert_close(outp[:, :5], out)
    torch.testing.assert_close(layer.aux_terms["z_loss"], z)
    torch.testing.assert_close(layer.aux_loss, 0.5 * layer.aux_terms["load_balance"] + 0.1 * z)


def two_moe_model() -> nn.Sequential:
    return nn.Sequential(build(load_balance_coef=1.0), nn.Identity(), build(z_loss_coef=1.0))


def test_aux_loss_is_zero_before_any_forward() -> None:
    assert aux_loss(two_moe_model()).item() == 0.0


def test_aux_losses_are_keyed_by_layer_name() -> None:
    model = two_moe_model()
    model(torch.randn(8, H, dtype=torch.float64))
    assert set(aux_losses(model)) == {"0", "2"}


def test_aux_loss_helper_sums_the_layers() -> None:
    model = two_moe_model()
    model(torch.randn(8, H, dtype=torch.float64))
    torch.testing.assert_close(aux_loss(model), model[0].aux_loss + model[2].aux_loss)


def test_aux_loss_helper_is_differentiable_to_the_router() -> None:
    model = two_moe_model()
    model(torch.randn(8, H, dtype=torch.float64))
    (grad,) = torch.autograd.grad(aux_loss(model), model[0].router.weight)
    assert grad.abs().sum() > 0


def test_aux_loss_of_a_model_without_moe_is_a_scalar() -> None:
    assert aux_loss(nn.Linear(2, 2)).shape == ()


def tied_layer() -> tuple[MoE, torch.Tensor]:
    """All router logits tied (experts 0 and 1 for every token), capacity 1 per expert."""
    layer = build(top_k=2, capacity_factor=0.25)
    with torch.no_grad():
        layer.router.weight.zero_()
    return layer, torch.randn(8, H, dtype=torch.float64)


def test_tied_logits_pick_the_lowest_experts_with_equal_gates() -> None:
    layer, x = tied_layer()
    _, gates, experts, _ = layer.route(x)
    assert (experts == torch.tensor([0, 1])).all()
    torch.testing.assert_close(gates, torch.full_like(gates, 0.5))


def test_capacity_keeps_the_first_tokens_of_each_expert() -> None:
    layer, x = tied_layer()
    _, _, _, keep = layer.route(x)
    cap = 1  # ceil(0.25 * 8 * 2 / 4): only token 0 gets an expert per slot
    assert keep[:, 0].tolist() == [True] + [False] * 7 and keep.sum() == 2 * cap


def test_tokens_dropped_by_capacity_give_zero() -> None:
    layer, x = tied_layer()
    out = layer(x)
    assert (out[1:] == 0).all() and out[0].abs().sum() > 0  # tokens with no expert give 0


def noisy_layer(kind: str) -> MoE:
    return build(router_noise=kind, router_noise_std=1.0, top_k=1, num_experts=8)


@pytest.mark.parametrize("kind", ["jitter", "gaussian"])
def test_router_noise_is_off_in_eval(kind: str) -> None:
    layer = noisy_layer(kind).eval()
    x = torch.randn(64, H, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer(x))
    torch.testing.assert_close(layer(x), per_token_moe(layer, x))


@pytest.mark.parametrize("kind", ["jitter", "gaussian"])
def test_router_noise_is_on_in_training(kind: str) -> None:
    layer = noisy_layer(kind).train()
    x = torch.randn(64, H, dtype=torch.float64)
    torch.manual_seed(3)
    assert not torch.equal(layer(x), layer(x))


def test_state_dict_round_trip_keeps_the_function() -> None:
    layer = build(dynamic_ratio=0.25)
    other = build(dynamic_ratio=1.0)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(5, H, dtype=torch.float64)
    torch.testing.assert_close(other(x), layer(x))


def test_deepcopy_after_a_forward_drops_the_aux_loss_and_keeps_the_function() -> None:
    layer = build(dynamic_ratio=0.25)
    x = torch.randn(5, H, dtype=torch.float64)
    layer(x)
    clone = copy.deepcopy(layer)  # after a forward: the graph-holding aux loss is not copied
    assert clone.aux_loss is None and isinstance(layer.aux_loss, torch.Tensor)
    torch.testing.assert_close(clone(x), layer(x))


def test_stats_count_the_expert_weights() -> None:
    stats = padnet.stats(build(dynamic_ratio=0.25))
    n1 = I * H
    by_name = {s.name: s for s in stats.layers}
    assert by_name["w1"].num_factors == E and by_name["w1"].numel == n1
    assert by_name["w1"].stored_params == E * round(0.25 * n1) + (n1 - round(0.25 * n1))
    assert stats.other_params == E * H + E * I + E * H + 2  # router, biases, two phi


def test_bfloat16_input_gives_bfloat16_output_and_float32_aux_loss() -> None:
    layer = MoE(H, I, 4, 2).to(torch.bfloat16)
    out = layer(torch.randn(3, 4, H, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 4, H)
    assert layer.aux_loss.dtype == torch.float32 and torch.isfinite(out.float()).all()


def test_empty_input_gives_empty_output() -> None:
    layer = MoE(H, I, 4, 2).to(torch.bfloat16)
    assert layer(torch.randn(0, H, dtype=torch.bfloat16)).shape == (0, H)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 5}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"capacity_factor": -2.0}, "capacity_factor"),
        ({"activation": "gelu_fast"}, "activation"),
        ({"router_noise": "uniform"}, "router_noise"),
        ({"router_noise_std": -1.0}, "router_noise_std"),
        ({"load_balance_coef": -0.1}, "load_balance_coef"),
        ({"path": "scatter"}, "path"),
        ({"static_path": "split"}, "static_path"),
        ({"dynamic_ratio": 1.5}, "dynamic_ratio"),
        ({"scale_mode": "half"}, "scale_mode"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MoE(H, I, **{"num_experts": 4, **kwargs})


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: MoE(H, I, 4, 2, activation=3), TypeError, "activation"),
        (lambda: MoE(0, I), ValueError, "hidden_size"),
        (lambda: MoE(H, I, 4, 2)(torch.randn(3, H + 1)), ValueError, r"\(\.\.\., 6\)"),
        (lambda: MoE(H, I, 4, 2)(torch.randn(2, 3, H), torch.ones(2, 4, dtype=torch.bool)),
         ValueError, "padding_mask"),
        (lambda: MoE.from_dense(nn.Linear(H, I), nn.Linear(I, H + 1)), ValueError, "not an FFN"),
        (lambda: MoE.from_dense(nn.Linear(H, I), nn.Linear(I, H), init="zeros"), ValueError,
         "init"),
    ],
    ids=["activation-type", "hidden-size", "input-width", "padding-mask-shape",
         "from-dense-not-ffn", "from-dense-init"],
)
def test_bad_inputs(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_expert_counts_leave_out_padding_tokens() -> None:
    torch.manual_seed(0)
    layer = MoE(6, 10, num_experts=3, top_k=2)
    x = torch.randn(2, 5, 6)
    real = torch.tensor([[True] * 5, [True, True, False, False, False]])
    layer(x, real)
    assert int(layer.aux_terms["expert_counts"].sum()) == 7 * 2
