"""ThetaObserver: the moments of Theta_hat collected through the PAD layers' routing hooks equal
per-sample / per-token statistics computed the slow way."""

import pytest
import torch

from padnet.layers import DynamicConv2d, MoE, ODConv2d, find_pad_weights
from padnet.partition import ThetaObserver
from padnet.partition.scores import moments
from reference import make_routing, mixed_kernel

CPU = torch.device("cpu")


def observed_moments(observer: ThetaObserver, model: torch.nn.Module) -> list:
    weights = find_pad_weights(model)
    raw = observer.raw_sums(weights, CPU)
    return [moments(*raw[3 * i:3 * i + 3]) for i in range(len(weights))]


@pytest.mark.parametrize("kind", ["condconv", "odconv"])
def test_conv_moments_equal_per_sample_statistics(kind: str) -> None:
    layer = (DynamicConv2d(3, 4, 3, num_kernels=3, routing="sigmoid") if kind == "condconv"
             else ODConv2d(4, 4, 3, groups=2, num_kernels=2)).double()
    x = torch.randn(5, layer.in_channels, 6, 6, dtype=torch.float64)
    routing = make_routing(layer, 5, torch.Generator().manual_seed(0), torch.float64)
    first = routing[:2] if isinstance(routing, torch.Tensor) else type(routing)(
        *(r[:2] for r in routing))
    with ThetaObserver(layer) as observer:
        layer(x[:2], first)
        layer(x, routing)
    thetas = torch.stack([mixed_kernel(layer, routing, b) for b in range(5)])
    thetas = torch.cat([thetas[:2], thetas]).detach()
    ((mean, var),) = observed_moments(observer, layer)
    torch.testing.assert_close(mean, thetas.mean(0))
    torch.testing.assert_close(var, thetas.var(0, unbiased=False))


def test_moe_moments_are_the_per_token_mixed_weights_without_padding() -> None:
    torch.manual_seed(0)
    moe = MoE(6, 10, num_experts=4, top_k=2).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    real = torch.tensor([True, True, False, True, True, True, False])
    _, gates, experts, _ = moe.route(x)
    with ThetaObserver(moe) as observer:
        moe(x, real)
    stats = observed_moments(observer, moe)
    for (mean, var), w in zip(stats, (moe.w1, moe.w2), strict=True):
        theta = torch.stack([sum(gates[n, s] * w[experts[n, s]] for s in range(2))
                             for n in range(7) if real[n]]).detach()
        torch.testing.assert_close(mean, theta.mean(0))
        torch.testing.assert_close(var, theta.var(0, unbiased=False))


def observed_layer() -> tuple[DynamicConv2d, ThetaObserver, torch.Tensor]:
    """A layer observed for one forward of two samples, after the observer exited."""
    layer = DynamicConv2d(3, 4, 3, num_kernels=2)
    x = torch.randn(2, 3, 5, 5)
    with ThetaObserver(layer) as observer:
        layer(x)
    return layer, observer, x


def test_hooks_are_removed_on_exit() -> None:
    layer, observer, x = observed_layer()
    count = observer.sums[id(layer.mode_mask)][2]
    layer(x)
    assert observer.sums[id(layer.mode_mask)][2] == count == 2
    assert not layer._routing_hooks


def test_observer_leaves_no_state_on_the_layer() -> None:
    layer, _, _ = observed_layer()
    assert set(layer.state_dict()) == {k for k in layer.state_dict() if "theta" not in k}


def test_a_weight_that_reported_nothing_raises() -> None:
    layer = DynamicConv2d(3, 4, 3, num_kernels=2)
    with ThetaObserver(layer) as observer:
        pass
    with pytest.raises(RuntimeError, match="reported no Theta_hat"):
        observer.raw_sums(find_pad_weights(layer), CPU)
