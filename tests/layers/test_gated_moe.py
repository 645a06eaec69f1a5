"""Gated MoE experts (``MoE(..., gated=True)``, docs/method.md §2.3) against slow per-token and
per-expert oracles written here from the formulas, their upcycling from a dense gated MLP, the
PAD-layer protocol (IMP sees the third matrix), deployment, and the aux pass."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.deploy import DeployedMoE
from padnet.layers.moe import MoE
from padnet.layers.protocol import find_pad_weights
from padnet.ops import dispatch as dsp
from padnet.ops import routing as rt
from reference_moe import capacity_oracle, route_token, scale_factors

H, I, E = 6, 10, 4


def build(**kwargs) -> MoE:
    torch.manual_seed(0)
    kwargs.setdefault("num_experts", E)
    layer = MoE(H, I, gated=True, **kwargs).double()
    with torch.no_grad():  # a different lam_d != lam_s per matrix, so scale mistakes show
        for mask, phi in ((layer.mode_mask1, 0.4), (layer.mode_mask2, -0.3),
                          (layer.mode_mask3, 0.7)):
            mask.phi.fill_(phi)
    return layer


def effective(mask, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``lam_d M * W_e + lam_s (1 - M) * W_s`` for every expert, ``(E, out, in)``."""
    lam_d, lam_s = scale_factors(mask.phi, mask.scale_mode)
    m = mask.mask_override if mask.mask_override is not None else mask.mask.to(w.dtype)
    return torch.stack([lam_d * m * w[e] + lam_s * (1 - m) * ws for e in range(len(w))])


def gated_expert(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on one token: ``W2 (act(W1 x + b1) * (W3 x + b3)) + b2``."""
    w1 = effective(layer.mode_mask1, layer.w1, layer.w1_static)[e]
    w2 = effective(layer.mode_mask2, layer.w2, layer.w2_static)[e]
    w3 = effective(layer.mode_mask3, layer.w3, layer.w3_static)[e]
    b = [0 if t is None else t[e] for t in (layer.b1, layer.b2, layer.b3)]
    return w2 @ (layer.act(w1 @ x + b[0]) * (w3 @ x + b[2])) + b[1]


def per_token_gated(layer: MoE, x: torch.Tensor, padding_mask=None) -> torch.Tensor:
    """The gated MoE one token at a time (router noise off)."""
    x2 = x.reshape(-1, H)
    n = x2.shape[0]
    valid = [True] * n if padding_mask is None else [bool(v) for v in padding_mask.reshape(-1)]
    routes = [route_token(x2[t] @ layer.router.weight.t(), layer.top_k) for t in range(n)]
    keep = [[True] * layer.top_k for _ in range(n)]
    if layer.capacity_factor is not None:
        cap = math.ceil(layer.capacity_factor * sum(valid) * layer.top_k / layer.num_experts)
        keep = capacity_oracle([r[0] for r in routes], layer.num_experts, cap, valid)
    rows = []
    for t, (experts, gates) in enumerate(routes):
        y = torch.zeros_like(x2[t])
        for s, e in enumerate(experts):
            if keep[t][s]:
                y = y + gates[s] * gated_expert(layer, e, x2[t])
        rows.append(y)
    return torch.stack(rows).view(x.shape)


def assert_matches_oracle(layer: MoE, x: torch.Tensor, padding_mask=None) -> None:
    """Outputs and gradients (input and every trainable parameter) equal the oracle's."""
    x = x.detach().requires_grad_()
    out, ref = layer(x, padding_mask), per_token_gated(layer, x, padding_mask)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]
    got = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True)
    want = torch.autograd.grad((ref * g).sum(), inputs, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        if a is None and b is None:
            continue
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a,
                                   torch.zeros_like(a) if b is None else b)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("static_path", ["fold", "shared"])
def test_gated_moe_matches_per_token_oracle(top_k: int, ratio: float, static_path: str) -> None:
    layer = build(top_k=top_k, dynamic_ratio=ratio, static_path=static_path)
    assert_matches_oracle(layer, torch.randn(2, 5, H, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": "bmm", "dynamic_ratio": 0.3},
        {"path": "bmm", "bias": False, "top_k": 3},
        {"bias": False, "dynamic_ratio": 0.6},
        {"bias": False, "dynamic_ratio": 0.6, "static_path": "shared"},
        {"activation": "silu", "dynamic_ratio": 0.5},
        {"activation": nn.PReLU(init=0.1), "dynamic_ratio": 0.5},  # its slope gets a gradient
        {"scale_mode": "prune", "dynamic_ratio": 0.5},
        {"scale_mode": "static_only", "dynamic_ratio": 0.5},
        {"scale_mode": "dynamic_only", "dynamic_ratio": 0.5, "static_path": "shared"},
        {"num_experts": 1, "top_k": 1, "dynamic_ratio": 0.5},
    ],
)
def test_gated_variants_match_per_token_oracle(kwargs: dict) -> None:
    assert_matches_oracle(build(**kwargs), torch.randn(13, H, dtype=torch.float64))


def test_gated_padding_mask_and_capacity_match_oracle() -> None:
    layer = build(capacity_factor=0.75, dynamic_ratio=0.5)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    assert_matches_oracle(layer, torch.randn(3, 6, H, dtype=torch.float64), mask)


def test_gated_pinned_routing_matches_per_expert_loop() -> None:
    layer = build(top_k=2, dynamic_ratio=0.5)
    x = torch.randn(11, H, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(11)])
    gates = torch.rand(11, 2, generator=gen, dtype=torch.float64)  # need not sum to 1
    ref = torch.zeros_like(x)
    for e in range(E):  # one expert at a time, its tokens gathered by a boolean mask
        tok, slot = torch.nonzero(experts == e, as_tuple=True)
        for t, s in zip(tok.tolist(), slot.tolist(), strict=True):
            ref[t] += gates[t, s] * gated_expert(layer, e, x[t])
    for static_path in ("fold", "shared"):
        layer.static_path = static_path
        torch.testing.assert_close(layer.experts_forward(x, gates, experts), ref)


def test_grouped_gated_ffn_gradcheck() -> None:
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    counts = [2, 0, 3]
    x = rnd(5, 3)
    w1, f1, s1, b1 = rnd(3, 4, 3), rnd(4, 3), rnd(4, 3), rnd(3, 4)
    w2, f2, b2 = rnd(3, 3, 4), torch.tensor(1.3, dtype=torch.float64, requires_grad=True), rnd(3, 3)
    w3, s3, b3 = rnd(3, 4, 3), rnd(4, 3), rnd(3, 4)
    assert torch.autograd.gradcheck(
        lambda *t: dsp.GroupedGatedFFN.apply(*t[:7], None, t[7], t[8], None, t[9], t[10],
                                             counts, F.silu),
        (x, w1, f1, s1, b1, w2, f2, b2, w3, s3, b3),
    )


def test_gated_grouped_ffn_without_autograd_equals_with() -> None:
    layer = build(dynamic_ratio=0.5)
    x = torch.randn(9, H, dtype=torch.float64)
    with torch.no_grad():
        nograd = layer(x)
    torch.testing.assert_close(nograd, layer(x).detach())


# ---- upcycling -------------------------------------------------------------------------------
class GatedMLP(nn.Module):
    """Llama's MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, I, bias=bias), nn.Linear(H, I, bias=bias)
        self.down_proj, self.act_fn = nn.Linear(I, H, bias=bias), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("ratio", [1.0, 0.5])
@pytest.mark.parametrize("bias", [False, True])
def test_upcycled_gated_moe_equals_the_dense_gated_mlp(top_k: int, ratio: float,
                                                       bias: bool) -> None:
    torch.manual_seed(0)
    dense = GatedMLP(bias).double()
    moe = MoE.from_dense(dense.up_proj, dense.down_proj, dense.act_fn, gate=dense.gate_proj,
                         num_experts=E, top_k=top_k, dynamic_ratio=ratio)
    assert moe.gated and (moe.b3 is not None) == bias
    x = torch.randn(3, 7, H, dtype=torch.float64)
    torch.testing.assert_close(moe(x), dense(x))
    torch.testing.assert_close(moe.w1_static, dense.gate_proj.weight * 1.0)  # W1: the gate
    torch.testing.assert_close(moe.w3[1], dense.up_proj.weight)  # W3: the up projection


def test_gated_copy_noise_goes_on_every_expert_copy_only() -> None:
    torch.manual_seed(0)
    dense = GatedMLP()
    moe = MoE.from_dense(dense.up_proj, dense.down_proj, "silu", gate=dense.gate_proj,
                         num_experts=3, init="copy_noise", copy_noise_std=0.05)
    assert torch.equal(moe.w3_static, dense.up_proj.weight)
    assert not torch.equal(moe.w3[0], moe.w3[1]) and not torch.equal(moe.w1[0], moe.w1[1])


# ---- protocol, partition, state --------------------------------------------------------------
def test_pad_weights_and_theta_terms_list_the_up_projection() -> None:
    layer = build(dynamic_ratio=0.5)
    assert [w.name for w in layer.pad_weights()] == ["w1", "w2", "w3"]
    w3 = layer.pad_weights()[2]
    assert w3.mode_mask is layer.mode_mask3 and w3.dynamic is layer.w3
    assert w3.static is layer.w3_static
    seen = []
    layer.register_routing_hook(lambda m, routing: seen.append(m.theta_terms(routing)))
    layer(torch.randn(5, H, dtype=torch.float64))
    assert len(seen[0]) == 3 and seen[0][2].coeffs.shape == (5, E)
    torch.testing.assert_close(seen[0][2].coeffs.sum(1), torch.ones(5, dtype=torch.float64))
    names = [w.name for w in find_pad_weights(nn.Sequential(layer))]
    assert names == ["0.w1", "0.w2", "0.w3"]


def test_plain_moe_keeps_its_two_matrices_and_state_dict_keys() -> None:
    layer = MoE(H, I, num_experts=E)
    assert not layer.gated and layer.w3 is None and layer.mode_mask3 is None
    assert [w.name for w in layer.pad_weights()] == ["w1", "w2"]
    assert not any("3" in k for k in layer.state_dict())


def test_imp_partitions_the_gated_experts_third_matrix() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MoE(H, I, num_experts=E, gated=True, activation="silu"),
                          nn.Flatten(), nn.Linear(4 * H, 3))
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, H, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(2)]
    padnet.partition_model(model, data, dynamic_ratio=0.25, scope="layer")
    mask3 = model[0].mode_mask3
    assert mask3.num_dynamic == round(0.25 * I * H)  # w3 took part in the partition


def test_gated_state_dict_round_trip_and_pickle_keep_the_function() -> None:
    layer = build(dynamic_ratio=0.5)
    x = torch.randn(7, H, dtype=torch.float64)
    ref = layer(x)
    assert {"w3", "b3", "w3_static", "mode_mask3.mask", "mode_mask3.phi"} <= set(
        layer.state_dict())
    fresh = MoE(H, I, num_experts=E, gated=True).double()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), ref)
    torch.testing.assert_close(pickle.loads(pickle.dumps(copy.deepcopy(layer)))(x), ref)


def test_a_layer_pickled_before_the_gated_kind_still_runs() -> None:
    layer = MoE(H, I, num_experts=E)
    state = layer.__getstate__()
    for key in ("gated", "_aux_pass", "w3", "b3", "w3_static", "mode_mask3"):
        state.pop(key)  # what an older padnet stored
    old = MoE.__new__(MoE)
    old.__setstate__(state)
    x = torch.randn(5, H)
    torch.testing.assert_close(old(x), layer(x))
    assert [w.name for w in old.pad_weights()] == ["w1", "w2"]


def test_gated_repr_says_gated() -> None:
    assert "gated=True" in repr(build())


# ---- deployment ------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_deployed_gated_moe_equals_the_layer_and_reloads(bias: bool) -> None:
    layer = build(dynamic_ratio=0.5, bias=bias).eval()
    deployed = padnet.export(layer)
    assert isinstance(deployed, DeployedMoE) and deployed.spec["gated"] is True
    x = torch.randn(3, 5, H, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), layer(x))
        fresh = DeployedMoE(deployed.spec).double()
        fresh.load_state_dict(deployed.state_dict())
        torch.testing.assert_close(fresh(x), layer(x))
    nd = layer.mode_mask3.num_dynamic
    assert deployed.state_dict()["w3_dynamic_values"].shape == (E, nd)


def test_a_deployed_spec_without_gated_is_a_plain_moe() -> None:
    layer = MoE(H, I, num_experts=E, dynamic_ratio=0.5).eval()
    spec = dict(padnet.export(layer).spec)
    spec.pop("gated")  # files written before the gated kind
    assert not DeployedMoE(spec).gated


# ---- aux pass --------------------------------------------------------------------------------
def test_an_aux_pass_adds_up_the_losses_of_repeated_forwards() -> None:
    layer = build(z_loss_coef=0.1)
    x1, x2 = torch.randn(5, H, dtype=torch.float64), torch.randn(7, H, dtype=torch.float64)
    layer(x1)
    first, counts1 = layer.aux_loss, layer.aux_terms["expert_counts"]
    layer(x2)
    second, counts2 = layer.aux_loss, layer.aux_terms["expert_counts"]
    layer.start_aux_pass()
    layer(x1)  # the first forward of a pass replaces what was stored
    torch.testing.assert_close(layer.aux_loss, first)
    layer(x2)
    torch.testing.assert_close(layer.aux_loss, first + second)
    assert torch.equal(layer.aux_terms["expert_counts"], counts1 + counts2)
    assert int(layer.aux_terms["expert_counts"].sum()) == 12 * 2
    layer.end_aux_pass()
    layer(x1)  # outside a pass: one forward's loss again
    torch.testing.assert_close(layer.aux_loss, first)


def test_the_router_gets_the_gradient_of_every_forward_of_a_pass() -> None:
    layer = build()
    x1, x2 = torch.randn(5, H, dtype=torch.float64), torch.randn(7, H, dtype=torch.float64)
    layer.start_aux_pass()
    layer(x1)
    layer(x2)
    got = torch.autograd.grad(layer.aux_loss, layer.router.weight)[0]
    want = torch.zeros_like(got)
    for x in (x1, x2):
        logits = rt.router_logits(x, layer.router.weight)
        _, experts = rt.top_k_gating(logits, 2)
        loss = layer.load_balance_coef * rt.load_balancing_loss(logits, experts)
        want += torch.autograd.grad(loss, layer.router.weight)[0]
    torch.testing.assert_close(got, want)


# ---- bad input -------------------------------------------------------------------------------
def test_bad_gated_arguments() -> None:
    with pytest.raises(TypeError, match="gated must be a bool, got 'yes'"):
        MoE(H, I, gated="yes")
    dense = GatedMLP()
    with pytest.raises(ValueError, match="gate must map like fc1"):
        MoE.from_dense(dense.up_proj, dense.down_proj, "silu", gate=nn.Linear(H, I + 1))
    w1, w2 = torch.randn(I, H), torch.randn(H, I)
    with pytest.raises(ValueError, match="needs the dense up projection w3"):
        MoE(H, I, gated=True).load_dense(w1, None, w2, None)
    with pytest.raises(ValueError, match="gated=False, w3 given: True"):
        MoE(H, I).load_dense(w1, None, w2, None, w3=w1)
