"""torch.compile: the PAD convolutions, their deployment form and dynamized models trace as one
graph (no graph break), compile with default settings and compute what eager mode computes.

The mask state that lets layers skip exactly-zero work is a Python-side cache of ModeMask
(kept by set_mask / set_ratio / load_state_dict), so the compiled graph holds no tensor-to-Python
conversion and is guarded on the state: a changed mask recompiles.

MoE keeps graph breaks in its dispatch (expert counts that depend on the routing: ``bincount``,
``.tolist()``, a Python loop over expert blocks, and ``torch.autograd.grad`` in the backward of
the grouped FFN); compiled it still computes what eager mode computes.

Inductor compilation takes tens of seconds on a small CPU machine: those tests are marked slow;
the graph-break checks and the guard checks (``backend='eager'``) are quick.
"""

import copy

import pytest
import torch

import padnet
from padnet.deploy import DeployedConv2d
from padnet.layers import DynamicConv2d, ModeMask, MoE, ODConv2d
from padnet.models import create_model

CONVS = {
    "dyconv": lambda **kw: DynamicConv2d(4, 6, 3, padding=1, num_kernels=3, **kw),
    "condconv": lambda **kw: DynamicConv2d(4, 6, 3, padding=1, num_kernels=3,
                                           routing="sigmoid", **kw),
    "odconv": lambda **kw: ODConv2d(4, 6, 3, padding=1, num_kernels=3, **kw),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with empty compile caches (no recompile limit carried over)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def conv(kind: str, ratio: float = 0.3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return CONVS[kind](dynamic_ratio=ratio, temperature=2.0, **kw)


def channel_mask(layer) -> None:
    rows = torch.zeros(layer.out_channels, dtype=torch.bool)
    rows[[1, 4]] = True
    layer.mode_mask.set_mask(rows[:, None, None, None].expand(layer.mode_mask.shape))


def graph_breaks(module, *args) -> int:
    return torch._dynamo.explain(module)(*args).graph_break_count


# ---- ModeMask's cached state ---------------------------------------------------------------
def test_mask_state_follows_set_mask_set_ratio_and_loading() -> None:
    mm = ModeMask((3, 4), 2)
    assert mm.state() == "dynamic"
    mm.set_ratio(0.0)
    assert mm._state == "static"
    mm.set_mask(torch.eye(3, 4))
    assert mm._state == "mixed"
    other = ModeMask((3, 4), 2)
    other.load_state_dict(mm.state_dict())
    assert other._state == "mixed" and other.state() == "mixed"


def test_eager_state_sees_in_place_writes_that_bypass_set_mask() -> None:
    mm = ModeMask((3, 4), 2, dynamic_ratio=0.5)
    mm.mask.fill_(True)
    assert mm.state() == "dynamic"
    mm.mask.copy_(torch.zeros(3, 4))
    assert mm.state() == "static"


def test_a_meta_device_mask_decides_its_state_on_first_use() -> None:
    with torch.device("meta"):
        mm = ModeMask((3, 4), 2)
    mm.to_empty(device="cpu")
    mm.mask.fill_(True)
    assert mm.state() == "dynamic"


# ---- no graph breaks -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_pad_convs_have_no_graph_breaks(kind, mode) -> None:
    for ratio in (0.3, 1.0):
        layer = getattr(conv(kind, ratio), mode)()
        assert graph_breaks(layer, torch.randn(2, 4, 5, 5)) == 0


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("mask", ["element", "channel"])
def test_deployed_convs_have_no_graph_breaks(kind, mask) -> None:
    layer = conv(kind)
    if mask == "channel":
        channel_mask(layer)
    deployed = padnet.export(layer)
    assert isinstance(deployed, DeployedConv2d) and deployed.mode == mask
    for batch in (1, 3):  # the batch-1 path and the grouped path
        assert graph_breaks(deployed, torch.randn(batch, 4, 5, 5)) == 0


def test_a_dynamized_resnet_is_one_graph() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    padnet.dynamize(model, "dyconv", dynamic_ratio=0.3)
    explained = torch._dynamo.explain(model)(torch.randn(2, 1, 28, 28))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_a_compiled_layer_follows_mask_changes() -> None:
    """The mask state is a guarded constant of the graph: changing it recompiles."""
    layer = conv("dyconv").eval()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 4, 5, 5)
    others = [ModeMask(layer.mode_mask.shape, 3, dynamic_ratio=r).state_dict() for r in (1, 0)]
    changes = [lambda: None, lambda: layer.mode_mask.set_ratio(1.0),
               lambda: layer.mode_mask.set_ratio(0.0), lambda: channel_mask(layer),
               lambda: layer.mode_mask.load_state_dict(others[0]),
               lambda: layer.mode_mask.load_state_dict(others[1])]
    states = []
    for change in changes:
        change()
        states.append(layer.mode_mask.state())
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    assert states == ["mixed", "dynamic", "static", "mixed", "dynamic", "static"]


# ---- default torch.compile (inductor): slow on 2 CPUs ----------------------------------------
def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert float((got - ref).detach().abs().max() / ref.detach().abs().max()) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dyconv", "odconv"])
def test_compiled_pad_convs_match_eager(kind) -> None:
    layer = conv(kind)
    compiled = torch.compile(layer)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert_close(compiled.eval()(x), layer(x))
    layer.train()
    got, ref = compiled(x), layer(x)
    assert_close(got, ref)
    params = [layer.weight, layer.static_weight, layer.mode_mask.phi]
    for g, r in zip(torch.autograd.grad(got.square().sum(), params),
                    torch.autograd.grad(ref.square().sum(), params), strict=True):
        assert_close(g, r)


@pytest.mark.slow
def test_compiled_deployed_convs_match_eager() -> None:
    for kind, mask in (("dyconv", "element"), ("odconv", "channel")):
        layer = conv(kind)
        if mask == "channel":
            channel_mask(layer)
        deployed = padnet.export(layer)
        x = torch.randn(3, 4, 5, 5)
        with torch.no_grad():
            assert_close(torch.compile(deployed)(x), deployed(x))


@pytest.mark.slow
def test_compiled_moe_matches_eager() -> None:
    torch.manual_seed(0)
    layer = MoE(6, 10, num_experts=4, top_k=2, dynamic_ratio=0.5, capacity_factor=1.0)
    compiled = torch.compile(layer)
    x = torch.randn(3, 5, 6)
    for mode in ("eval", "train"):
        getattr(layer, mode)()
        got, ref = compiled(x), layer(x)
        assert_close(got, ref)
    deployed = padnet.export(layer)
    with torch.no_grad():
        assert_close(torch.compile(deployed)(x), deployed(x))


@pytest.mark.slow
def test_compiled_dynamized_resnet_matches_eager() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    padnet.dynamize(model, "dyconv", dynamic_ratio=0.3, temperature=4.0, init="copy_noise",
                    copy_noise_std=0.1)
    reference = copy.deepcopy(model)  # batch norm statistics move in training
    compiled = torch.compile(model)
    x = torch.randn(4, 1, 28, 28)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(reference, mode)()
        with torch.no_grad():
            assert_close(compiled(x), reference(x))
