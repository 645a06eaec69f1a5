"""A parametric activation (nn.PReLU) in MoE experts trains on every execution path: its
gradient equals the one autograd gives on the padded batched-matmul path."""

import pytest
import torch
from torch import nn

from padnet.layers import MoE


def grads(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = MoE(6, 10, num_experts=3, top_k=2, activation=nn.PReLU(init=0.1), path=path,
                dynamic_ratio=0.5).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    layer(x).square().sum().backward()
    return layer.act.weight.grad, layer.w1.grad


@pytest.mark.parametrize("path", ["loop", "auto"])
def test_prelu_gets_the_same_gradient_as_on_the_bmm_path(path) -> None:
    act_grad, w1_grad = grads(path)
    ref_act, ref_w1 = grads("bmm")
    assert act_grad is not None and float(act_grad.abs().sum()) > 0
    torch.testing.assert_close(act_grad, ref_act)
    torch.testing.assert_close(w1_grad, ref_w1)

