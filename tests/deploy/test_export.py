"""padnet.export: the deployment form computes what the trained model computes (eval mode), for
every layer kind, mask granularity, scale mode and execution path, at a temperature other than 1;
it stores only the compact form and reloads from it."""

import pytest
import torch
from torch import nn

import padnet
from padnet.deploy import DeployedConv2d, DeployedMoE
from padnet.layers import DynamicConv2d, MoE, ODConv2d, find_pad_layers
from padnet.models import create_model

SCALE_MODES = ["both", "static_only", "dynamic_only", "none", "prune"]
MASKS = ["element", "channel", "all_dynamic", "all_static"]


def set_mask(layer, kind: str) -> None:
    """Element mask at ratio 0.3, output channels 1, 4, 6 dynamic, or all / none dynamic."""
    mm = layer.mode_mask if hasattr(layer, "mode_mask") else None
    for m in [mm] if mm is not None else [layer.mode_mask1, layer.mode_mask2]:
        with torch.no_grad():
            m.phi.fill_(0.4)
        if kind == "element":
            m.set_ratio(0.3, generator=torch.Generator().manual_seed(0))
        elif kind == "channel":
            rows = torch.zeros(m.shape[0], dtype=torch.bool)
            rows[[1, 4, m.shape[0] - 2]] = True
            m.set_mask(rows.view(-1, *([1] * (len(m.shape) - 1))).expand(m.shape))
        elif kind == "all_static":
            m.set_ratio(0.0)


def conv_layer(kind: str, groups: int, scale_mode: str) -> nn.Module:
    torch.manual_seed(0)
    common = {"padding": 1, "groups": groups, "num_kernels": 3, "temperature": 2.5,
              "scale_mode": scale_mode}
    if kind == "odconv":
        layer = ODConv2d(8, 8, 3, **common)
    else:
        layer = DynamicConv2d(8, 8, 3, routing="softmax" if kind == "dyconv" else "sigmoid",
                              **common)
    return layer.double()


def assert_same(model: nn.Module, deployed: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref, got = model.eval()(x), deployed(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-10


@pytest.mark.parametrize("kind", ["dyconv", "condconv", "odconv"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
def test_conv_export_equals_the_trained_layer(kind, mask, scale_mode) -> None:
    for groups in (1, 8):  # a full and a depthwise convolution
        layer = conv_layer(kind, groups, scale_mode)
        set_mask(layer, mask)
        deployed = padnet.export(layer)
        assert isinstance(deployed, DeployedConv2d)
        for batch in (1, 5, 40):
            assert_same(layer, deployed, torch.randn(batch, 8, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["dyconv", "condconv", "odconv"])
@pytest.mark.parametrize("path", ["grouped", "mixture", "unfold"])
@pytest.mark.parametrize("mask", ["element", "channel"])
def test_every_execution_path_of_the_deployed_conv(kind, path, mask) -> None:
    layer = conv_layer(kind, 1, "both")
    set_mask(layer, mask)
    if kind == "odconv" and path == "mixture":
        with pytest.raises(ValueError, match="does not apply to ODConv"):
            DeployedConv2d.from_layer(layer, path=path)
        return
    deployed = DeployedConv2d.from_layer(layer.eval(), path=path)
    for batch in (1, 3):
        assert_same(layer, deployed, torch.randn(batch, 8, 7, 5, dtype=torch.float64))


def test_mask_kinds_choose_the_run_time_mode() -> None:
    modes = {}
    for mask in MASKS:
        layer = conv_layer("condconv", 1, "both")
        set_mask(layer, mask)
        modes[mask] = padnet.export(layer).mode
    assert modes == {"element": "element", "channel": "channel", "all_dynamic": "dynamic",
                     "all_static": "static"}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("scale_mode", SCALE_MODES)
def test_moe_export_equals_the_trained_layer(mask, scale_mode) -> None:
    torch.manual_seed(0)
    layer = MoE(6, 10, num_experts=4, top_k=2, scale_mode=scale_mode,
                capacity_factor=1.0).double()
    set_mask(layer, mask)
    deployed = padnet.export(layer)
    assert isinstance(deployed, DeployedMoE)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    real = torch.rand(3, 7) > 0.3
    with torch.no_grad():
        torch.testing.assert_close(deployed(x, real), layer.eval()(x, real))


def test_deployed_state_dict_holds_only_the_compact_form() -> None:
    layer = conv_layer("dyconv", 1, "both")
    set_mask(layer, "element")
    state = padnet.export(layer).state_dict()
    n = layer.mode_mask.numel
    nd = layer.mode_mask.num_dynamic
    assert state["dynamic_values"].shape == (3, nd) and state["static_values"].shape == (n - nd,)
    assert state["mask_bits"].dtype == torch.uint8 and state["mask_bits"].numel() == -(-n // 8)
    assert not any(k.startswith(("kernels", "static_kernel", "perm")) for k in state)


@pytest.mark.parametrize("kind", ["dyconv", "odconv"])
def test_an_empty_deployed_layer_loads_the_state_dict(kind) -> None:
    layer = conv_layer(kind, 1, "both")
    set_mask(layer, "channel")
    deployed = padnet.export(layer)
    fresh = DeployedConv2d(deployed.spec).double()
    fresh.load_state_dict(deployed.state_dict())
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    assert fresh.mode == "channel"
    torch.testing.assert_close(fresh(x), deployed(x))


@pytest.mark.parametrize("kind", ["dyconv", "odconv", "moe"])
def test_a_pruned_weight_stores_no_static_values(kind) -> None:
    if kind == "moe":
        torch.manual_seed(0)
        layer = MoE(6, 10, num_experts=4, top_k=2, scale_mode="prune", dynamic_ratio=0.4).double()
        x = torch.randn(9, 6, dtype=torch.float64)
    else:
        layer = conv_layer(kind, 1, "prune")
        set_mask(layer, "element")
        x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    deployed = padnet.export(layer)
    state = deployed.state_dict()
    static = [k for k in state if k.endswith("static_values")]
    assert static and all(state[k].numel() == 0 for k in static)
    fresh = (DeployedMoE if kind == "moe" else DeployedConv2d)(deployed.spec).double()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer.eval()(x))


def test_an_empty_deployed_moe_loads_the_state_dict() -> None:
    torch.manual_seed(0)
    layer = MoE(6, 10, num_experts=4, top_k=2, activation="relu", dynamic_ratio=0.5).double()
    deployed = padnet.export(layer)
    fresh = DeployedMoE(deployed.spec).double()
    fresh.load_state_dict(deployed.state_dict())
    x = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), deployed(x))


def test_whole_model_export_keeps_the_original_and_equals_it() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    padnet.dynamize(model, "dyconv", init="copy_noise", copy_noise_std=0.1, temperature=4.0,
                    dynamic_ratio=0.3)
    x = torch.randn(6, 1, 28, 28)
    deployed = padnet.export(model)
    assert find_pad_layers(model) and not find_pad_layers(deployed)
    assert not deployed.training
    with torch.no_grad():
        ref, got = model.eval()(x), deployed(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_exported_bytes_at_kappa_0_3_are_at_most_half_of_the_fully_dynamic() -> None:
    torch.manual_seed(0)
    full = padnet.dynamize(create_model("resnet8", num_classes=10), "dyconv")
    pad = padnet.dynamize(create_model("resnet8", num_classes=10), "dyconv",
                          dynamic_ratio=0.3)

    def pad_bytes(model: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                   if k.rsplit(".", 1)[-1] in ("mask_bits", "dynamic_values", "static_values"))

    assert pad_bytes(padnet.export(pad)) <= 0.5 * pad_bytes(padnet.export(full))


def test_export_errors() -> None:
    with pytest.raises(ValueError, match="has no PAD layers"):
        padnet.export(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="path must be one of"):
        padnet.export(conv_layer("dyconv", 1, "both"), path="fast")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        padnet.export("resnet8")


def test_an_empty_deployed_layer_says_it_needs_weights() -> None:
    layer = conv_layer("dyconv", 1, "both")
    set_mask(layer, "element")
    with pytest.raises(RuntimeError, match="holds no weights yet: load a state dict"):
        DeployedConv2d(padnet.export(layer).spec)(torch.randn(1, 8, 6, 6))
    moe = padnet.export(MoE(6, 10, num_experts=4, top_k=2, activation="relu"))
    with pytest.raises(RuntimeError, match="holds no weights yet: load a state dict"):
        DeployedMoE(moe.spec)(torch.randn(3, 6))
