"""The router temperature changes the function, so it travels with the weights: a layer rebuilt
at another temperature and loaded from a state dict routes like the trained one."""

import torch

import padnet
from padnet.layers import DynamicConv2d, ODConv2d


def test_state_dict_carries_the_temperature() -> None:
    for cls in (DynamicConv2d, ODConv2d):
        torch.manual_seed(0)
        trained = cls(4, 4, 3, padding=1, num_kernels=3, temperature=30.0)
        padnet.set_temperature(trained, 1.0)  # the end of the annealing
        fresh = cls(4, 4, 3, padding=1, num_kernels=3, temperature=30.0)
        fresh.load_state_dict(trained.state_dict())
        x = torch.randn(2, 4, 6, 6)
        assert float(fresh.router.temperature) == 1.0
        torch.testing.assert_close(fresh(x), trained(x))


def test_set_temperature_changes_the_routing_and_keeps_the_buffer() -> None:
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 4, 3, num_kernels=3)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        sharp = layer.router(x)
    assert padnet.set_temperature(layer, 10.0) == 1
    with torch.no_grad():
        soft = layer.router(x)
    assert "router.temperature" in layer.state_dict()
    assert float(soft.max()) < float(sharp.max())
