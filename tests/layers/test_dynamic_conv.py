"""DynamicConv2d / ODConv2d against the per-sample oracle and their degenerate cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from padnet.layers import DynamicConv2d, ODConv2d
from reference import make_routing, per_sample_conv

# (in, out, kernel, stride, padding, dilation, groups, bias, padding_mode)
GEOMETRIES = {
    "plain3x3": (4, 6, 3, 1, 1, 1, 1, True, "zeros"),
    "stride2-nobias": (4, 8, 3, 2, 1, 1, 1, False, "zeros"),
    "nonsquare-same-dil": (3, 5, (1, 3), 1, "same", 2, 1, True, "zeros"),
    "even-same": (4, 4, (2, 4), 1, "same", 1, 1, True, "zeros"),
    "groups-reflect": (4, 6, 3, 1, 2, 2, 2, True, "reflect"),
    "depthwise-s2": (6, 6, 3, 2, 1, 1, 6, False, "zeros"),
    "pointwise": (5, 7, 1, 1, 0, 1, 1, True, "zeros"),
    "circular-valid": (4, 4, 3, 1, "valid", 1, 4, True, "circular"),
    "replicate": (2, 4, (3, 2), (2, 1), (1, 2), 1, 2, True, "replicate"),
}
KINDS = {
    "dyconv": (DynamicConv2d, {"routing": "softmax"}),
    "condconv": (DynamicConv2d, {"routing": "sigmoid"}),
    "odconv": (ODConv2d, {}),
}
PATHS = ("grouped", "mixture", "unfold")  # the execution paths of DynamicConv2d


def build(kind: str, geometry: str, **kwargs):
    cls, extra = KINDS[kind]
    args = GEOMETRIES[geometry]
    torch.manual_seed(0)
    layer = cls(*args, num_kernels=3, **extra, **kwargs).double()
    with torch.no_grad():
        layer.mode_mask.phi.fill_(0.4)  # lam_d != lam_s != 1, so scale mistakes show
    return layer


def run_and_grad(fn, layer, x):
    """Output and gradients (input and every parameter) for a fixed random cotangent."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = fn(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


def assert_same(a, b, tol=1e-9):
    (ya, gxa, ga), (yb, gxb, gb) = a, b
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    torch.testing.assert_close(gxa, gxb, atol=tol, rtol=tol)
    for name in ga.keys() | gb.keys():  # a parameter that is not used has gradient zero
        a_, b_ = ga.get(name), gb.get(name)
        a_ = torch.zeros_like(b_) if a_ is None else a_
        b_ = torch.zeros_like(a_) if b_ is None else b_
        torch.testing.assert_close(a_, b_, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_path_equals_per_sample_oracle(kind, geometry):
    layer = build(kind, geometry, dynamic_ratio=0.5)
    x = torch.randn(3, layer.in_channels, 9, 8, dtype=torch.float64)
    expected = run_and_grad(lambda x: per_sample_conv(layer, x, layer.route(x)), layer, x)
    for path in layer.supported_paths():
        layer.path = path
        assert_same(run_and_grad(layer, layer, x), expected)


def layer_input_and_routing(kind: str, geometry: str):
    """A fully dynamic layer, an input of two samples and fixed routing weights for it."""
    layer = build(kind, geometry, dynamic_ratio=1.0)
    x = torch.randn(2, layer.in_channels, 7, 9, dtype=torch.float64)
    routing = make_routing(layer, 2, torch.Generator().manual_seed(3), torch.float64)
    return layer, x, routing


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_ratio_one_is_fully_dynamic(kind, geometry):
    layer, x, routing = layer_input_and_routing(kind, geometry)
    full = run_and_grad(lambda x: per_sample_conv(layer, x, routing, fully_dynamic=True), layer, x)
    for path in layer.supported_paths():
        layer.path = path
        assert_same(run_and_grad(lambda x: layer(x, routing), layer, x), full)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_ratio_zero_is_a_static_conv(kind, geometry):
    layer, x, routing = layer_input_and_routing(kind, geometry)
    layer.mode_mask.set_ratio(0.0)
    static = nn.Conv2d(*GEOMETRIES[geometry][:7], bias=False,
                       padding_mode=GEOMETRIES[geometry][8]).double()
    kern = routing.kernel if kind == "odconv" else routing

    def reference(x):
        lam_s = layer.mode_mask.scales()[1]
        y = torch.func.functional_call(static, {"weight": lam_s * layer.static_weight}, (x,))
        return y if layer.bias is None else y + (kern @ layer.bias)[:, :, None, None]

    expected = run_and_grad(reference, layer, x)
    for path in layer.supported_paths():
        layer.path = path
        assert_same(run_and_grad(lambda x: layer(x, routing), layer, x), expected)


@pytest.mark.parametrize("path", PATHS)
def test_single_kernel_dyconv_equals_conv2d(path):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2).double()
    layer = DynamicConv2d(6, 4, 3, stride=2, padding=1, groups=2, num_kernels=1,
                          path=path).double()
    with torch.no_grad():
        layer.weight.copy_(conv.weight[None])
        layer.bias.copy_(conv.bias[None])
    x = torch.randn(5, 6, 10, 10, dtype=torch.float64)
    y, gx, grads = run_and_grad(layer, layer, x)
    y_ref, gx_ref, grads_ref = run_and_grad(conv, conv, x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(grads["weight"][0], grads_ref["weight"])
    torch.testing.assert_close(grads["bias"][0], grads_ref["bias"])


def small_layer(path: str) -> DynamicConv2d:
    torch.manual_seed(0)
    return DynamicConv2d(2, 2, 3, padding=1, num_kernels=2, dynamic_ratio=0.5, path=path).double()


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck(path):
    layer = small_layer(path)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("path", PATHS)
def test_batch_of_one(path):
    layer = small_layer(path)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    assert layer(x[:1]).shape == (1, 2, 4, 4)


def test_mixture_and_grouped_agree_in_float32_at_batch_32():
    torch.manual_seed(0)
    layer = DynamicConv2d(16, 32, 3, padding=1, dynamic_ratio=0.3)
    x = torch.randn(32, 16, 8, 8)
    outs = []
    for path in PATHS:
        layer.path = path
        outs.append(layer(x))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-4)


def strided_layer() -> DynamicConv2d:
    return DynamicConv2d(4, 6, 3, stride=2, padding=1, dynamic_ratio=0.5).double()


def test_output_area_follows_the_geometry():
    assert strided_layer().output_area(8, 7) == 4 * 4


def test_auto_path_takes_the_mixture_for_many_samples_of_small_maps():
    layer = strided_layer()
    assert layer.resolve_path(32, 16) == "mixture"  # many samples, small maps
    assert layer.resolve_path(32, 64) == "grouped"
    assert layer.resolve_path(1, 1) == "grouped"


@pytest.mark.parametrize("kwargs", [{"kernel_size": 1}, {"kernel_size": 3, "groups": 4}],
                         ids=["pointwise", "depthwise"])
def test_auto_path_keeps_pointwise_and_depthwise_grouped(kwargs):
    assert DynamicConv2d(4, 4, **kwargs).resolve_path(128, 1) == "grouped"


def test_auto_path_equals_the_oracle():
    layer = strided_layer()
    x = torch.randn(32, 4, 8, 7, dtype=torch.float64)  # auto runs the mixture here
    torch.testing.assert_close(layer(x), per_sample_conv(layer, x, layer.route(x)))


SCALE_MODES = ["both", "static_only", "dynamic_only", "none", "prune", "s", "d"]


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_scale_factors_of_each_mode(mode):
    layer = build("dyconv", "plain3x3", dynamic_ratio=0.5, scale_mode=mode)
    lam_d, lam_s = layer.mode_mask.scales()
    if mode == "both":
        torch.testing.assert_close(lam_d + lam_s, torch.tensor(2.0, dtype=lam_d.dtype))
        torch.testing.assert_close(lam_d, 2 * torch.sigmoid(torch.tensor(0.4, dtype=lam_d.dtype)))
    elif mode == "none":
        assert float(lam_d) == float(lam_s) == 1.0
    elif mode == "prune":
        assert float(lam_d) == 1.0 and float(lam_s) == 0.0
    else:
        fixed = lam_d if mode in ("s", "static_only") else lam_s
        assert float(fixed) == 1.0


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_phi_is_trainable_only_where_it_is_used(mode):
    layer = build("dyconv", "plain3x3", dynamic_ratio=0.5, scale_mode=mode)
    assert layer.mode_mask.phi.requires_grad == (mode not in ("none", "prune"))


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_scale_modes_against_oracle(mode):
    layer = build("dyconv", "plain3x3", dynamic_ratio=0.5, scale_mode=mode)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), per_sample_conv(layer, x, layer.route(x)))


def test_prune_mode_zeroes_static_positions():
    layer = build("dyconv", "pointwise", dynamic_ratio=0.0, scale_mode="prune")
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    routing = make_routing(layer, 2, torch.Generator().manual_seed(0), torch.float64)
    bias_only = (routing @ layer.bias)[:, :, None, None].expand(2, 7, 4, 4)
    torch.testing.assert_close(layer(x, routing), bias_only)


ONE_HOT = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64)


def test_injected_routing_is_used():
    layer = build("dyconv", "plain3x3")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    y = layer(x, ONE_HOT)
    for b, k in ((0, 0), (1, 2)):
        kernel = layer.mode_mask.dynamic(layer.weight)[k]
        ref = F.conv2d(x[b:b + 1], kernel, layer.bias[k], padding=1)
        torch.testing.assert_close(y[b:b + 1], ref)


def test_injected_routing_skips_the_router():
    layer = build("dyconv", "plain3x3")
    layer(torch.randn(2, 4, 5, 5, dtype=torch.float64), ONE_HOT).sum().backward()
    assert all(p.grad is None for p in layer.router.parameters())


def test_temperature_flattens_softmax_routing():
    layer = DynamicConv2d(8, 8, 3, padding=1, num_kernels=4, temperature=1e4)
    r = layer.route(torch.randn(3, 8, 5, 5))
    torch.testing.assert_close(r, torch.full_like(r, 0.25), atol=1e-3, rtol=0)


def non_square_layer_and_input() -> tuple[DynamicConv2d, torch.Tensor]:
    """Non-square kernel, stride, padding and input, in float32."""
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 8, (3, 5), stride=(1, 2), padding=(1, 2), dynamic_ratio=0.5)
    return layer, torch.randn(3, 4, 7, 12)


@pytest.mark.parametrize("path", PATHS)
def test_non_square_geometry_equals_the_oracle(path):
    layer, x = non_square_layer_and_input()
    ref = per_sample_conv(layer, x, layer.route(x))
    layer.path = path
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_channels_last_input_equals_the_oracle(path):
    layer, x = non_square_layer_and_input()
    x = x.to(memory_format=torch.channels_last)
    ref = per_sample_conv(layer, x.contiguous(), layer.route(x))
    layer.path = path
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dynamic_ratio": 1.5}, "dynamic_ratio must be in \\[0, 1\\], got 1.5"),
        ({"dynamic_ratio": -0.1}, "dynamic_ratio"),
        ({"num_kernels": 0}, "num_kernels must be an int >= 1, got 0"),
        ({"routing": "relu"}, "routing must be one of .*'relu'"),
        ({"scale_mode": "half"}, "scale_mode must be one of .*'half'"),
        ({"padding_mode": "mirror"}, "padding_mode must be one of .*'mirror'"),
        ({"path": "fft"}, "path must be one of .*'fft'"),
        ({"padding": "full"}, "padding must be .*'full'"),
        ({"stride": 2, "padding": "same"}, "padding='same' needs stride 1"),
        ({"groups": 3}, "in_channels must be a positive multiple of groups=3"),
        ({"temperature": 0}, "temperature must be a number > 0, got 0"),
        ({"kernel_size": 0}, "kernel_size must be a positive int"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        DynamicConv2d(**args)


@pytest.mark.parametrize(
    ("cls", "args", "match"),
    [
        (DynamicConv2d, (torch.randn(2, 3, 5, 5),),
         r"expects input of shape \(B, 4, H, W\), got \(2, 3, 5, 5\)"),
        (DynamicConv2d, (torch.randn(2, 4, 5, 5), torch.ones(2, 3)),
         r"routing_weights must have shape .* \(2, 2\)"),
        (ODConv2d, (torch.randn(2, 4, 5, 5), torch.ones(2, 2)), "ODAttention"),
    ],
    ids=["input-channels", "routing-shape", "odconv-routing-type"],
)
def test_bad_input_and_routing_shapes(cls, args, match):
    layer = cls(4, 4, 3, num_kernels=2)
    with pytest.raises(ValueError, match=match):
        layer(*args)


def test_odconv_has_no_mixture_path():
    with pytest.raises(ValueError, match="ODConv|path must be one of"):
        ODConv2d(4, 4, 3, path="mixture")
