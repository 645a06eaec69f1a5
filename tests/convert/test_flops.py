"""FLOPs per sample (padnet.stats with an example input, docs/method.md §5.1) against hand
formulas: static convolutions and linears, the router and aggregation terms of dynamic
convolutions, executed experts of a MoE, the exported form, bad inputs."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import Tensor, nn

import padnet
from padnet.convert.stats import (
    FlopStats,
    flops,
    forward_flops,
    register_static_equivalent,
    static_equivalent,
)
from padnet.layers import DynamicConv2d, ModeMask, MoE, ODConv2d, PadLayer, PadWeight, ThetaTerms

stats_module = importlib.import_module("padnet.convert.stats")  # padnet.convert.stats: the function


def conv_flops(c_in: int, c_out: int, k: int, h_out: int, w_out: int, groups: int = 1) -> int:
    """The oracle: 2 * C_in * C_out * k * k * H' * W' / groups for one sample."""
    return 2 * c_in * c_out * k * k * h_out * w_out // groups


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8 -> 8x8
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2, bias=False),  # -> 4x4
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 12, 1),  # pointwise, 4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )


CNN_FLOPS = (conv_flops(3, 8, 3, 8, 8) + conv_flops(8, 12, 3, 4, 4, groups=2)
             + conv_flops(12, 12, 1, 4, 4) + 2 * 12 * 5)


def test_static_model_flops_equal_the_hand_formula_per_sample():
    model = small_cnn()
    f = flops(model, torch.randn(3, 3, 8, 8))
    assert f == FlopStats(CNN_FLOPS, CNN_FLOPS, CNN_FLOPS, CNN_FLOPS, 3)
    assert forward_flops(model, torch.randn(5, 3, 8, 8)) == 5 * CNN_FLOPS  # the batch total


def test_dynamized_model_keeps_the_static_equivalent_and_pays_more():
    model = padnet.dynamize(small_cnn(), "dyconv", dynamic_ratio=0.5)
    f = flops(model, torch.randn(2, 3, 8, 8))
    assert f.static == CNN_FLOPS
    assert f.dynamic > f.static and f.pad == f.dynamic  # masks are element-wise: no FLOPs
    assert f.exported <= f.pad
    static = static_equivalent(model)
    assert not padnet.stats(static).layers
    assert [type(m).__name__ for m in static.modules()].count("_StaticConv2d") == 2


def dyconv_overhead(c_in: int, c_out: int, k: int, num_kernels: int, hidden: int) -> int:
    """Router (FC1, FC2), aggregation (B,K)x(K,N) and routed bias (B,K)x(K,C_out), one sample."""
    n = c_out * c_in * k * k
    router = 2 * c_in * hidden + 2 * hidden * num_kernels
    return router + 2 * num_kernels * n + 2 * num_kernels * c_out


@pytest.mark.parametrize("path", ["grouped", "unfold"])
def test_dynamic_conv_exceeds_static_by_router_and_aggregation(path):
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1, num_kernels=3, path=path)  # hidden max(1, 4) = 4
    f = flops(layer, torch.randn(2, 4, 5, 5))
    assert f.static == conv_flops(4, 6, 3, 5, 5)
    assert f.dynamic - f.static == dyconv_overhead(4, 6, 3, 3, hidden=4)
    layer.mode_mask.set_ratio(0.4)  # element mask: same products
    g = flops(layer, torch.randn(2, 4, 5, 5))
    assert g.pad == g.dynamic == f.dynamic and g.exported == g.pad


def test_condconv_router_is_one_linear_layer():
    layer = DynamicConv2d(4, 6, 3, num_kernels=2, routing="sigmoid", bias=False, path="grouped")
    f = flops(layer, torch.randn(3, 4, 6, 6))
    n = 6 * 4 * 9
    assert f.static == conv_flops(4, 6, 3, 4, 4)
    assert f.dynamic - f.static == 2 * 4 * 2 + 2 * 2 * n  # FC(C_in -> K), aggregation


def test_odconv_counts_its_four_attention_heads():
    layer = ODConv2d(8, 6, 3, padding=1, num_kernels=2, bias=False, reduction=4, min_hidden=3)
    f = flops(layer, torch.randn(2, 8, 4, 4))  # hidden = max(8 // 4, 3) = 3
    heads = 2 * 8 * 3 + 2 * 3 * (2 + 8 + 6 + 9)  # fc, then kernel/channel/filter/spatial
    assert f.dynamic - f.static == heads + 2 * 2 * (6 * 8 * 9)


def test_mixture_path_runs_k_convolutions_and_one_more_for_the_static_part():
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1, num_kernels=3, bias=False, path="mixture")
    conv = conv_flops(4, 6, 3, 5, 5)
    router, mixing = 2 * 4 * 4 + 2 * 4 * 3, 2 * 6 * 25  # mixing: per kernel and output
    layer.mode_mask.set_ratio(0.5)
    f = flops(layer, torch.randn(2, 4, 5, 5), export_path="mixture")
    assert f.dynamic == router + 3 * (conv + mixing)
    assert f.pad == router + 4 * (conv + mixing)  # S joins as a (K+1)-th kernel
    assert f.exported == f.dynamic  # softmax routing: S folded into every D_k


def test_channel_mask_exports_below_training_form():
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 16, 3, padding=1, num_kernels=4, bias=False, path="grouped")
    mask = torch.zeros(16, 4, 3, 3, dtype=torch.bool)
    mask[:8] = True  # half the output channels dynamic (a multiple of 8: no padding channels)
    layer.mode_mask.set_mask(mask)
    f = flops(layer, torch.randn(2, 4, 6, 6), export_path="grouped")
    n = 16 * 4 * 9
    assert f.pad == f.dynamic
    assert f.pad - f.exported == 4 * n  # the aggregation covers half the kernel: 2 K N / 2
    assert f.exported > f.static


def test_static_mask_still_runs_the_router():
    layer = DynamicConv2d(4, 6, 3, num_kernels=3, path="grouped")
    layer.mode_mask.set_ratio(0.0)
    f = flops(layer, torch.randn(2, 4, 5, 5))
    router, bias = 2 * 4 * 4 + 2 * 4 * 3, 2 * 3 * 6
    assert f.pad == f.exported == f.static + router + bias


def test_moe_counts_router_and_the_top_k_experts_per_token():
    torch.manual_seed(0)
    h, i, e, t = 8, 16, 4, 5
    for k in (1, 2, 3):
        moe = MoE(h, i, e, k, dynamic_ratio=0.5)
        f = flops(moe, torch.randn(3, t, h))
        assert f.static == t * 4 * h * i  # the dense FFN
        assert f.dynamic == t * (2 * h * e + k * 4 * h * i)  # router + k executed experts
        assert f.pad == f.dynamic == f.exported  # fold path: the static part is element-wise


def test_gated_moe_has_the_gated_ffn_as_static_equivalent():
    import inspect

    if "gated" not in inspect.signature(MoE).parameters:
        pytest.skip("MoE without gated experts")
    torch.manual_seed(0)
    h, i, e, t = 8, 16, 4, 5
    moe = MoE(h, i, e, 2, gated=True, activation="silu").eval()
    x = torch.randn(3, t, h)
    f = flops(moe, x)
    assert f.static == t * 6 * h * i  # gate, up and down projections
    assert f.dynamic == t * (2 * h * e + 2 * 6 * h * i)
    dense = static_equivalent(moe)
    expected = torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(x, moe.w1_static, moe.b1[0]))
        * torch.nn.functional.linear(x, moe.w3_static, moe.b3[0]), moe.w2_static, moe.b2[0])
    torch.testing.assert_close(dense(x), expected)


def test_moe_dropped_assignments_cost_nothing():
    torch.manual_seed(1)
    h, i, e = 8, 16, 4
    moe = MoE(h, i, e, 2, capacity_factor=0.5).eval()
    x = torch.randn(2, 6, h)
    with torch.no_grad():
        moe(x)
    kept = int(moe.aux_terms["expert_counts"].sum())
    assert kept < 12 * 2  # some assignments are dropped
    f = flops(moe, x)
    assert f.dynamic * 2 == 12 * 2 * h * e + kept * 4 * h * i


def test_moe_shared_static_path_adds_two_dense_matmuls_that_export_removes():
    torch.manual_seed(0)
    h, i, t = 8, 16, 5
    moe = MoE(h, i, 4, 2, dynamic_ratio=0.5, static_path="shared")
    f = flops(moe, torch.randn(2, t, h))
    assert f.pad - f.dynamic == t * (2 * h * i + 2 * i * h)  # x S1^T and (sum g h) S2^T
    assert f.exported == f.dynamic < f.pad


class Embed(nn.Module):
    """Token model taking keyword arguments: embedding, MoE, mean over real tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.ffn = MoE(8, 16, 4, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.ffn(self.emb(input_ids), attention_mask.bool())
        return self.head((x * attention_mask[..., None]).sum(1))


def test_dict_inputs_count_per_sequence():
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 7))
    f = flops(Embed(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert f.batch_size == 2
    assert f.static == 7 * 4 * 8 * 16 + 2 * 8 * 3
    assert f.dynamic == 7 * (2 * 8 * 4 + 2 * 4 * 8 * 16) + 2 * 8 * 3


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = padnet.dynamize(small_cnn(), "dyconv", dynamic_ratio=0.5).train()
    masks = [m.mask.clone() for m in model.modules() if isinstance(m, ModeMask)]
    state = copy.deepcopy(model.state_dict())
    running = model[3].running_mean.clone()
    s = padnet.stats(model, torch.randn(2, 3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[3].running_mean, running)
    after = [m.mask for m in model.modules() if isinstance(m, ModeMask)]
    assert all(torch.equal(a, b) for a, b in zip(masks, after, strict=True))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert s.to_dict()["flops"]["static"] == CNN_FLOPS
    assert "PAD, exported" in str(s) and "fully dynamic" in str(s)
    assert "flops" not in padnet.stats(model).to_dict()


@pytest.mark.parametrize("geometry", [
    {"padding": "same", "padding_mode": "reflect", "dilation": 2},
    {"padding": 1, "stride": 2, "groups": 2},
    {"padding": (2, 0), "padding_mode": "circular"},
    {"padding": "valid", "stride": (1, 2)},
], ids=["same-reflect-dilated", "strided-grouped", "circular", "valid"])
def test_static_equivalent_is_the_layer_at_kappa_zero(geometry):
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, num_kernels=2, bias=False, **geometry).eval()
    layer.mode_mask.set_ratio(0.0)  # W = lam_s W_s with lam_s = 1 (phi = 0): an ordinary conv
    x = torch.randn(2, 4, 7, 8)
    static = static_equivalent(layer)
    torch.testing.assert_close(static(x), layer(x))
    h, w = layer(x).shape[-2:]
    groups = geometry.get("groups", 1)
    assert flops(layer, x).static == conv_flops(4, 6, 3, h, w, groups=groups)


def test_stats_accepts_a_pad_layer_that_is_the_model_itself():
    layer = DynamicConv2d(4, 6, 3, num_kernels=2, path="grouped")
    assert flops(layer, torch.randn(1, 4, 5, 5)).static == conv_flops(4, 6, 3, 3, 3)
    assert isinstance(static_equivalent(layer), nn.Conv2d)


class ToyPad(PadLayer):
    """A PAD layer kind without a registered static equivalent."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3, 4))
        self.static_weight = nn.Parameter(torch.randn(3, 4))
        self.mode_mask = ModeMask((3, 4), 2)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.mode_mask.combine(self.weight.mean(0), self.static_weight).t()

    def pad_weights(self) -> list[PadWeight]:
        return [PadWeight("", self.mode_mask, self.weight, self.static_weight)]

    def theta_terms(self, routing: Tensor) -> list[ThetaTerms]:
        return [ThetaTerms(coeffs=routing)]


def test_unknown_layer_kind_needs_a_registered_static_equivalent(monkeypatch):
    monkeypatch.setattr(stats_module, "_STATIC_EQUIVALENTS", dict(stats_module._STATIC_EQUIVALENTS))
    model = nn.Sequential(ToyPad())
    with pytest.raises(ValueError, match="no static equivalent known for layer '0' of type ToyPad"):
        flops(model, torch.randn(2, 4))
    register_static_equivalent(ToyPad, lambda layer: nn.Linear(4, 3, bias=False))
    assert static_equivalent(model)(torch.randn(2, 4)).shape == (2, 3)
    assert forward_flops(static_equivalent(model), torch.randn(2, 4)) == 2 * 2 * 4 * 3
    with pytest.raises(TypeError, match="layer_type must be a PadLayer subclass"):
        register_static_equivalent(nn.Linear, lambda layer: layer)


@pytest.mark.parametrize(
    ("inputs", "error", "match"),
    [
        ("abc", TypeError, "inputs must be a tensor, a tuple/list"),
        (torch.tensor(1.0), ValueError, "at least one tensor with a batch dimension"),
        (torch.randn(0, 3, 8, 8), ValueError, "at least one sample, got batch size 0"),
        ({"a": torch.randn(2, 3), "b": torch.randn(3, 3)}, ValueError, "disagree on the batch"),
        (torch.randn(2, 5, 8, 8), ValueError, r"failed on the example inputs \(tensor \(2, 5"),
    ],
)
def test_bad_inputs_get_a_clear_error(inputs, error, match):
    with pytest.raises(error, match=match):
        flops(small_cnn(), inputs)


def test_bad_model_and_options_get_a_clear_error():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        flops("resnet", torch.randn(1, 3))
    layer = DynamicConv2d(4, 6, 3)
    with pytest.raises(ValueError, match="export_path must be one of"):
        flops(layer, torch.randn(1, 4, 5, 5), export_path="fast")
    deployed = padnet.export(nn.Sequential(layer))
    with pytest.raises(ValueError, match="already in deployment form"):
        flops(deployed, torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="form must be one of"):
        flops(small_cnn(), torch.randn(1, 3, 8, 8)).ratio("huge")


@pytest.mark.slow
def test_upcycled_bert_keeps_the_dense_model_as_static_equivalent():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense = flops(model, inputs).static
    padnet.dynamize(model, "moe", num_experts=4, top_k=2)
    f = flops(model, inputs)
    assert f.static == dense
    # each of the 2 layers: router 2*16*4 and one more expert FFN (4*16*32) per token
    assert f.dynamic - f.static == 2 * 6 * (2 * 16 * 4 + 4 * 16 * 32)
