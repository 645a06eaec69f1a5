"""A new kind of PAD layer needs its module and one registration: dynamize, stats, partition and
the ratio report handle it without any change to their code."""

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import padnet
from padnet.convert import method_names, register_method, replace_modules
from padnet.convert.methods import METHODS
from padnet.layers import ModeMask, PadLayer, PadWeight, ThetaTerms, find_pad_weights
from padnet.partition import SCORES, layer_ratio_report, partition_model, register_score


class ToyPadLinear(PadLayer):
    """K linear maps mixed per sample by a softmax router, one PAD weight ``(out, in)``."""

    def __init__(self, in_features: int, out_features: int, *, num_factors: int = 3,
                 dynamic_ratio: float = 1.0, scale_mode: str = "both") -> None:
        super().__init__()
        shape = (out_features, in_features)
        self.weight = nn.Parameter(0.3 * torch.randn(num_factors, *shape))
        self.static_weight = nn.Parameter(0.3 * torch.randn(shape))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.router = nn.Linear(in_features, num_factors)
        self.mode_mask = ModeMask(shape, num_factors, dynamic_ratio=dynamic_ratio,
                                  scale_mode=scale_mode)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, init: str, copy_noise_std: float,
                    **kwargs) -> "ToyPadLinear":
        layer = cls(linear.in_features, linear.out_features, **kwargs).to(linear.weight)
        if init != "kaiming":
            with torch.no_grad():
                layer.weight.copy_(linear.weight.expand_as(layer.weight))
                layer.static_weight.copy_(linear.weight)
                layer.bias.copy_(linear.bias)
                if init == "copy_noise":
                    layer.weight.add_(copy_noise_std * torch.randn_like(layer.weight))
        return layer

    def forward(self, x: Tensor) -> Tensor:
        routing = torch.softmax(self.router(x), dim=-1)  # (B, K)
        self.emit_routing(routing)
        theta = torch.einsum("bk,koi->boi", routing, self.weight)
        weight = self.mode_mask.combine(theta, self.static_weight)  # (B, out, in)
        return torch.einsum("boi,bi->bo", weight, x) + self.bias

    def pad_weights(self) -> list[PadWeight]:
        return [PadWeight("", self.mode_mask, self.weight, self.static_weight)]

    def theta_terms(self, routing: Tensor) -> list[ThetaTerms]:
        return [ThetaTerms(coeffs=routing)]


@pytest.fixture
def toy_method() -> Iterator[str]:
    register_method("toy_linear", replace_modules(nn.Linear, ToyPadLinear.from_linear,
                                                  method="toy_linear"), target="linear")
    yield "toy_linear"
    METHODS.unregister("toy_linear")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()


def batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen, dtype=torch.float64),
             torch.randint(0, 4, (16,), generator=gen)) for _ in range(3)]


def test_the_registered_method_is_listed(toy_method) -> None:
    assert toy_method in method_names() and toy_method in method_names(target="linear")


def test_dynamize_converts_with_the_registered_method(toy_method) -> None:
    model = padnet.dynamize(mlp(), toy_method, num_factors=2)
    assert [e.name for e in model.padnet_report.converted] == ["0", "2"]
    assert isinstance(model[0], ToyPadLinear)


def test_dynamize_with_the_registered_method_preserves_outputs(toy_method) -> None:
    model, x = mlp(), batches()[0][0]
    before = model(x)
    padnet.dynamize(model, toy_method, num_factors=2)
    torch.testing.assert_close(model(x), before)


def test_stats_count_the_toy_weights(toy_method) -> None:
    model = padnet.dynamize(mlp(), toy_method, num_factors=2, dynamic_ratio=0.25)
    table = padnet.stats(model)
    assert [(s.name, s.kind, s.num_factors, s.numel) for s in table.layers] == [
        ("0", "ToyPadLinear", 2, 48), ("2", "ToyPadLinear", 2, 32)]
    assert table.layers[0].stored_params == 2 * 12 + 36
    routers_and_biases = 2 * (6 + 1) + 2 * (8 + 1) + 8 + 4 + 2  # + two phi
    assert table.other_params == routers_and_biases


def partitioned_toy_model(method: str, score: str):
    model = padnet.dynamize(mlp(), method, init="copy_noise", copy_noise_std=0.1)
    result = partition_model(model, batches(), dynamic_ratio=0.3, iterations=2, score=score,
                             static_init="mean")
    return model, result


@pytest.mark.parametrize("score", ["taylor", "variance", "magnitude"])
def test_partition_handles_the_toy_layer(toy_method, score) -> None:
    _, result = partitioned_toy_model(toy_method, score)
    assert result.layers == ["0", "2"]
    assert sum(result.num_dynamic) == round(0.3 * (48 + 32))


@pytest.mark.parametrize("score", ["taylor", "variance", "magnitude"])
def test_ratio_report_handles_the_toy_layer(toy_method, score) -> None:
    model, result = partitioned_toy_model(toy_method, score)
    report = layer_ratio_report(model)
    assert report.layers == ["0", "2"] and report.num_dynamic == result.num_dynamic
    assert "0" in str(report)


def test_a_registered_score_is_used_by_partition(toy_method) -> None:
    register_score("last_positions")(lambda i: torch.arange(
        i.weight.mode_mask.numel, dtype=torch.float64).view(i.weight.shape))
    try:
        model = padnet.dynamize(mlp(), toy_method)
        partition_model(model, batches(), dynamic_ratio=0.5, score="last_positions",
                        scope="layer")
        for w in find_pad_weights(model):
            flat = w.mode_mask.mask.reshape(-1)
            assert flat[flat.numel() // 2:].all() and not flat[:flat.numel() // 2].any()
    finally:
        SCORES.unregister("last_positions")
