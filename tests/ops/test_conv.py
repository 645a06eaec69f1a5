"""Stateless per-sample convolution ops (padnet.ops.conv) against a slow per-sample loop."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from padnet.ops import conv as cv

DT = torch.float64


class Geom(NamedTuple):
    batch: int
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool


GEOMS = {
    "b1-plain": Geom(1, 3, 4, (3, 3), (1, 1), (0, 0), (1, 1), 1, False),
    "b3-stride2-pad1-groups2-bias": Geom(3, 4, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2, True),
    "b3-depthwise-pad1-bias": Geom(3, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, True),
    "b3-depthwise-x2-dil2-stride2": Geom(3, 3, 6, (3, 3), (2, 2), (1, 1), (2, 2), 3, False),
    "b3-nonsquare-mixed-geometry-bias": Geom(3, 3, 5, (2, 3), (2, 1), (0, 1), (2, 1), 1, True),
    "b1-pointwise-groups2-stride2": Geom(1, 4, 8, (1, 1), (2, 2), (0, 0), (1, 1), 2, False),
    "b3-dil2-nopad": Geom(3, 2, 4, (3, 3), (1, 1), (0, 0), (2, 2), 1, False),
}
GEOM_PARAMS = pytest.mark.parametrize("g", list(GEOMS.values()), ids=list(GEOMS))
H, W = 7, 8


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(gen: torch.Generator, *shape: int, grad: bool = False) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=DT).requires_grad_(grad)


def _per_sample_inputs(g: Geom, seed: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    gen = _gen(seed)
    x = _rand(gen, g.batch, g.c_in, H, W)
    weight = _rand(gen, g.batch, g.c_out, g.c_in // g.groups, *g.kernel)
    bias = _rand(gen, g.batch, g.c_out) if g.bias else None
    return x, weight, bias


def loop_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
              groups: int) -> Tensor:
    """The obvious reference: one F.conv2d per sample with that sample's weight and bias."""
    outs = []
    for b in range(x.shape[0]):
        bb = None if bias is None else bias[b]
        outs.append(F.conv2d(x[b:b + 1], weight[b], bb, stride, padding, dilation, groups))
    return torch.cat(outs)


def _geometry(g: Geom) -> tuple:
    return g.stride, g.padding, g.dilation, g.groups


# --- the three execution paths against the loop ----------------------------------------------


@GEOM_PARAMS
def test_grouped_path_equals_per_sample_loop(g: Geom) -> None:
    x, weight, bias = _per_sample_inputs(g)
    out = cv.conv2d_per_sample(x, weight, bias, *_geometry(g))
    torch.testing.assert_close(out, loop_conv(x, weight, bias, *_geometry(g)))


@GEOM_PARAMS
def test_unfold_path_equals_per_sample_loop(g: Geom) -> None:
    x, weight, bias = _per_sample_inputs(g)
    out = cv.conv2d_unfold(x, weight, bias, *_geometry(g))
    torch.testing.assert_close(out, loop_conv(x, weight, bias, *_geometry(g)))


@GEOM_PARAMS
def test_mixture_path_equals_loop_over_mixed_kernels(g: Geom) -> None:
    """``y[b] = conv(x[b], sum_k routing[b, k] W_k) + bias[b]`` with bias already per sample."""
    k = 3
    gen = _gen(1)
    x = _rand(gen, g.batch, g.c_in, H, W)
    kernels = _rand(gen, k, g.c_out, g.c_in // g.groups, *g.kernel)
    routing = torch.softmax(_rand(gen, g.batch, k), -1)
    bias = _rand(gen, g.batch, g.c_out) if g.bias else None
    mixed = torch.stack([sum(routing[b, j] * kernels[j] for j in range(k))
                         for b in range(g.batch)])
    out = cv.conv2d_mixture(x, kernels, routing, bias, *_geometry(g))
    torch.testing.assert_close(out, loop_conv(x, mixed, bias, *_geometry(g)))


# --- gradients ----------------------------------------------------------------------------------

# tiny grouped geometry with stride, padding and bias: (stride, padding, dilation, groups)
GRAD_GEOM = ((2, 1), (1, 1), (1, 1), 2)


@pytest.mark.parametrize("fn", [cv.conv2d_per_sample, cv.conv2d_unfold],
                         ids=["grouped", "unfold"])
def test_per_sample_paths_pass_gradcheck(fn) -> None:
    gen = _gen(2)
    x = _rand(gen, 2, 2, 4, 5, grad=True)
    weight = _rand(gen, 2, 4, 1, 2, 3, grad=True)
    bias = _rand(gen, 2, 4, grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: fn(a, w, b, *GRAD_GEOM), (x, weight, bias))


def test_mixture_path_passes_gradcheck() -> None:
    gen = _gen(3)
    x = _rand(gen, 2, 2, 4, 5, grad=True)
    kernels = _rand(gen, 3, 4, 1, 2, 3, grad=True)
    routing = _rand(gen, 2, 3, grad=True)
    bias = _rand(gen, 2, 4, grad=True)
    assert torch.autograd.gradcheck(
        lambda a, w, r, b: cv.conv2d_mixture(a, w, r, b, *GRAD_GEOM), (x, kernels, routing, bias)
    )


def test_aggregate_weights_passes_gradcheck() -> None:
    gen = _gen(4)
    routing, kernels = _rand(gen, 2, 3, grad=True), _rand(gen, 3, 2, 1, 2, 2, grad=True)
    static = _rand(gen, 2, 1, 2, 2, grad=True)
    assert torch.autograd.gradcheck(cv.aggregate_weights, (routing, kernels, static))


# --- resolve_padding ----------------------------------------------------------------------------


def test_valid_padding_is_zero() -> None:
    assert cv.resolve_padding("valid", (3, 5), (2, 1), (1, 2)) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("kernel", "dilation"),
    [((3, 3), (1, 1)), ((5, 3), (2, 1)), ((2, 2), (1, 1)), ((4, 3), (1, 2)), ((2, 5), (3, 1))],
    ids=["odd", "odd-dilated", "even", "even-odd-dilated", "even-dilated-odd"],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_matches_nn_conv2d_same(kernel, dilation) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation, dtype=DT)
    x = torch.randn(2, 2, 7, 6, dtype=DT)
    pad4 = cv.resolve_padding("same", kernel, (1, 1), dilation)
    xp, conv_pad = cv.pad_input(x, pad4, "zeros")
    out = F.conv2d(xp, conv.weight, conv.bias, 1, conv_pad, dilation)
    torch.testing.assert_close(out, conv(x))  # same shape (7, 6) and values


@pytest.mark.parametrize(("padding", "expected"), [(2, (2, 2, 2, 2)), ((1, 3), (3, 3, 1, 1))])
def test_int_and_pair_padding_are_symmetric_and_height_first(padding, expected) -> None:
    assert cv.resolve_padding(padding, (3, 3), (2, 2), (1, 1)) == expected


@pytest.mark.parametrize(
    ("padding", "stride", "match"),
    [
        ("full", (1, 1), "padding must be 'same', 'valid', an int or a pair"),
        ("same", (2, 1), "padding='same' needs stride 1"),
        (-1, (1, 1), "padding must be non-negative"),
        ((1, -2), (1, 1), "padding must be non-negative"),
    ],
    ids=["unknown-string", "same-with-stride-2", "negative-int", "negative-in-pair"],
)
def test_resolve_padding_rejects_bad_arguments(padding, stride, match) -> None:
    with pytest.raises(ValueError, match=match):
        cv.resolve_padding(padding, (3, 3), stride, (1, 1))


# --- pad_input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    ("padding", "kernel", "stride", "dilation"),
    [(1, (3, 3), (1, 1), (1, 1)), ((2, 1), (3, 2), (2, 1), (1, 1)),
     ("same", (4, 3), (1, 1), (1, 2)), ("valid", (3, 3), (1, 1), (1, 1))],
    ids=["int", "pair-stride2", "same-even", "valid"],
)
def test_pad_input_matches_nn_conv2d_padding_mode(mode, padding, kernel, stride,
                                                  dilation) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, stride, padding, dilation, padding_mode=mode, dtype=DT)
    x = torch.randn(2, 2, 6, 7, dtype=DT)
    pad4 = cv.resolve_padding(padding, kernel, stride, dilation)
    xp, conv_pad = cv.pad_input(x, pad4, mode)
    out = F.conv2d(xp, conv.weight, conv.bias, stride, conv_pad, dilation)
    torch.testing.assert_close(out, conv(x))


def test_symmetric_zero_padding_is_left_to_the_convolution() -> None:
    x = torch.randn(1, 2, 5, 5, dtype=DT)
    xp, conv_pad = cv.pad_input(x, (2, 2, 1, 1), "zeros")
    assert xp is x and conv_pad == (1, 2)


# --- aggregate_weights --------------------------------------------------------------------------


def test_aggregate_weights_has_batch_times_kernel_shape() -> None:
    gen = _gen(5)
    w = cv.aggregate_weights(_rand(gen, 5, 3), _rand(gen, 3, 4, 2, 3, 1))
    assert w.shape == (5, 4, 2, 3, 1)


def test_aggregate_weights_equals_einsum() -> None:
    gen = _gen(6)
    routing, kernels = _rand(gen, 5, 3), _rand(gen, 3, 4, 2, 3, 3)
    expected = torch.einsum("bk,koihw->boihw", routing, kernels)
    torch.testing.assert_close(cv.aggregate_weights(routing, kernels), expected)


def test_aggregate_weights_adds_static_to_every_sample() -> None:
    gen = _gen(7)
    routing, kernels, static = _rand(gen, 5, 3), _rand(gen, 3, 4, 2, 3, 3), _rand(gen, 4, 2, 3, 3)
    expected = torch.einsum("bk,koihw->boihw", routing, kernels) + static
    torch.testing.assert_close(cv.aggregate_weights(routing, kernels, static), expected)


# --- choose_path --------------------------------------------------------------------------------

CHOOSE_CASES = [  # batch, out_area, kernel_size, groups, in_channels
    (1, 1, (3, 3), 1, 8), (32, 16, (3, 3), 1, 8), (31, 1, (3, 3), 1, 8),
    (1024, 1, (1, 1), 1, 8), (1024, 1, (3, 3), 8, 8), (64, 4096, (5, 5), 2, 8),
]


@pytest.mark.parametrize("args", CHOOSE_CASES)
def test_choose_path_returns_a_concrete_path_name(args) -> None:
    assert cv.choose_path(*args) in set(cv.PATHS) - {"auto"}


@pytest.mark.parametrize(
    ("batch", "out_area", "expected"),
    [(32, 16, "mixture"), (31, 1, "grouped"), (32, 17, "grouped"), (64, 32, "mixture"),
     (64, 33, "grouped")],
    ids=["batch32-area16", "batch31", "batch-below-2x-area", "batch64-area32", "batch64-area33"],
)
def test_choose_path_mixture_needs_large_batch_of_small_maps(batch, out_area, expected) -> None:
    assert cv.choose_path(batch, out_area, (3, 3), 1, 8) == expected


@pytest.mark.parametrize(
    ("kernel", "groups", "in_channels"),
    [((1, 1), 1, 8), ((1, 1), 2, 8), ((3, 3), 8, 8), ((5, 3), 16, 16)],
    ids=["pointwise", "pointwise-grouped", "depthwise", "depthwise-nonsquare"],
)
def test_choose_path_keeps_pointwise_and_depthwise_grouped(kernel, groups, in_channels) -> None:
    assert cv.choose_path(4096, 1, kernel, groups, in_channels) == "grouped"


@pytest.mark.parametrize(("groups", "in_channels"), [(1, 1), (2, 8)], ids=["one-channel", "g2"])
def test_choose_path_non_depthwise_groups_can_take_mixture(groups, in_channels) -> None:
    """``groups == in_channels == 1`` is an ordinary convolution, not depthwise."""
    assert cv.choose_path(4096, 1, (3, 3), groups, in_channels) == "mixture"
