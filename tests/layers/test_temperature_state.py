"""The router temperature changes the function, so it travels with the weights: a layer rebuilt
at another temperature and loaded from a state dict routes like the trained one."""

import pytest
import torch

import padnet
from padnet.layers import DynamicConv2d, ODConv2d


@pytest.mark.parametrize("cls", [DynamicConv2d, ODConv2d])
def test_state_dict_carries_the_temperature(cls) -> None:
    torch.manual_seed(0)
    trained = cls(4, 4, 3, padding=1, num_kernels=3, temperature=30.0)
    padnet.set_temperature(trained, 1.0)  # the end of the annealing
    fresh = cls(4, 4, 3, padding=1, num_kernels=3, temperature=30.0)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(2, 4, 6, 6)
    assert float(fresh.router.temperature) == 1.0
    torch.testing.assert_close(fresh(x), trained(x))


def layer_and_input() -> tuple[DynamicConv2d, torch.Tensor]:
    torch.manual_seed(0)
    return DynamicConv2d(4, 4, 3, num_kernels=3), torch.randn(2, 4, 6, 6)


def test_set_temperature_counts_the_layers_it_sets() -> None:
    layer, _ = layer_and_input()
    assert padnet.set_temperature(layer, 10.0) == 1


def test_a_higher_temperature_flattens_the_routing() -> None:
    layer, x = layer_and_input()
    with torch.no_grad():
        sharp = layer.router(x)
    padnet.set_temperature(layer, 10.0)
    with torch.no_grad():
        soft = layer.router(x)
    assert float(soft.max()) < float(sharp.max())


def test_the_temperature_is_a_state_dict_buffer() -> None:
    layer, _ = layer_and_input()
    padnet.set_temperature(layer, 10.0)
    assert "router.temperature" in layer.state_dict()
