"""Graph export of the deployment form: ``torch.export`` and ONNX, at a dynamic batch size.

:func:`export_program` gives a :class:`torch.export.ExportedProgram` and :func:`export_onnx` an
ONNX file of the deployment form of a model (:func:`padnet.export`), with the batch dimension of
the input declared dynamic (:class:`torch.export.Dim`), so one graph serves every batch size.

That needs the deployed convolutions on an execution path free of the batch size
(:mod:`padnet.deploy.conv`): the usual per-sample trick (``grouped``) folds the batch into the
channels and bakes the batch size into the convolution's ``groups``, and ``auto`` takes a
batch-1 path of its own. So a training-form model is deployed with ``path='mixture'`` (DY-Conv,
CondConv: the K shared kernels as one ordinary convolution, outputs mixed per sample; ODConv
layers take ``'unfold'``: im2col and one batched matrix product), and a model deployed before
is copied with its convolutions switched to those paths (:func:`graph_form`).

MoE layers (:class:`~padnet.layers.MoE`, :class:`~padnet.deploy.DeployedMoE`) are not supported:
their dispatch sorts the tokens by expert and runs one matrix product per expert on a block
whose size depends on the routing (``bincount``, ``tolist``, ``split``) -- shapes that depend
on the data, which ``torch.export`` cannot trace (it stops at the first ``int`` of an expert
count). Both functions raise :class:`NotImplementedError` for a model holding one. (Such models
run in eager mode, and under ``torch.compile`` with graph breaks in the dispatch.)
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from padnet.deploy.conv import DeployedConv2d
from padnet.deploy.export import export
from padnet.deploy.moe import DeployedMoE
from padnet.layers.moe import MoE
from padnet.layers.protocol import find_pad_layers

__all__ = ["BATCH_FREE_PATHS", "export_onnx", "export_program", "graph_form"]

#: Execution paths of a deployed convolution that hold no batch size in the graph.
BATCH_FREE_PATHS = ("mixture", "unfold")


def _check_no_moe(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, (MoE, DeployedMoE)):
            raise NotImplementedError(
                f"graph export of MoE layers is not supported ({name or 'the model'} is a "
                f"{type(m).__name__}): the expert dispatch has shapes that depend on the routing "
                "(tokens per expert), which torch.export cannot trace; run such models in eager "
                "mode or with torch.compile")


def _batch_free_path(conv: DeployedConv2d) -> str:
    return "unfold" if conv.routing == "odconv" else "mixture"


def graph_form(model: nn.Module, *, dynamic_batch: bool = True) -> nn.Module:
    """The deployment form of ``model`` ready for tracing, in eval mode.

    A model with PAD layers is deployed (:func:`padnet.export`, a copy) with ``path='mixture'``
    (ODConv: ``'unfold'``) where ``dynamic_batch``, else ``'auto'``. A deployed model whose
    convolutions are on a path that holds the batch size is copied with those paths switched
    (``dynamic_batch`` only); a model in training mode is copied into eval mode; otherwise
    ``model`` itself is returned. Raises :class:`NotImplementedError` for MoE layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_no_moe(model)
    if find_pad_layers(model):
        out = export(model, path="mixture" if dynamic_batch else "auto")
    else:
        convs = [m for m in model.modules() if isinstance(m, DeployedConv2d)]
        paths_ok = not dynamic_batch or all(m.path in BATCH_FREE_PATHS for m in convs)
        if paths_ok and not model.training:
            return model
        out = copy.deepcopy(model).eval()
    if dynamic_batch:
        for m in out.modules():
            if isinstance(m, DeployedConv2d) and m.path not in BATCH_FREE_PATHS:
                m.path = _batch_free_path(m)
    return out


def _example(example_input: Tensor, dynamic_batch: bool) -> Tensor:
    if not isinstance(example_input, Tensor) or example_input.dim() < 1:
        raise ValueError("example_input must be a tensor with a batch dimension, got "
                         f"{getattr(example_input, 'shape', type(example_input).__name__)}")
    if example_input.shape[0] < 1:
        raise ValueError("example_input must hold at least one sample")
    if dynamic_batch and example_input.shape[0] == 1:
        # a batch of 1 would be specialised as a constant: trace with two copies of the sample
        example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
    return example_input


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1)


def export_program(
    model: nn.Module, example_input: Tensor, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` the deployment form of ``model`` (:func:`graph_form`) for inputs like
    ``example_input`` ``(B, ...)``; with ``dynamic_batch`` the batch dimension is dynamic
    (``torch.export.Dim('batch', min=1)``; an example of one sample is traced as two), else
    every shape is that of ``example_input``.

    Run the result with ``program.module()(x)``. MoE layers are not supported (module
    docstring): :class:`NotImplementedError`.
    """
    x = _example(example_input, dynamic_batch)
    graph_model = graph_form(model, dynamic_batch=dynamic_batch)
    shapes = ({0: _batch_dim()},) if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(graph_model, (x,), dynamic_shapes=shapes)


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    dynamo: bool | None = None,
    opset_version: int | None = None,
) -> Path:
    """Write the deployment form of ``model`` (:func:`graph_form`) as one ONNX file at ``path``
    (weights inside; returns the path). The graph has one input ``input`` shaped like
    ``example_input`` and one output ``output``; with ``dynamic_batch`` their first dimension is
    the dynamic axis ``batch``.

    ``dynamo``: the exporter of :func:`torch.onnx.export` -- True the ``torch.export``-based one
    (needs ``onnxscript``), False the TorchScript one (needs only ``onnx``; it cannot export a
    convolution on the ``unfold`` path, which ODConv takes at a dynamic batch size, because that
    tracer records the im2col kernel size as dynamic: :class:`NotImplementedError`), None
    (default) the first where ``onnxscript`` is installed, else the second. MoE layers are not
    supported (:class:`NotImplementedError`).
    """
    x = _example(example_input, dynamic_batch)
    graph_model = graph_form(model, dynamic_batch=dynamic_batch)
    path = Path(path)
    if dynamo is None:
        dynamo = importlib.util.find_spec("onnxscript") is not None
    names = {"input_names": ["input"], "output_names": ["output"], "opset_version": opset_version}
    if dynamo:
        shapes = ({0: _batch_dim()},) if dynamic_batch else None
        # the exporter logs that torchvision's operators are missing (padnet uses none of them)
        # and warns about a deprecated pytree type of its own: neither concerns the user
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", FutureWarning)
                torch.onnx.export(graph_model, (x,), path, dynamo=True, dynamic_shapes=shapes,
                                  external_data=False, verbose=False, **names)
        finally:
            quiet.setLevel(level)
        return path
    if any(isinstance(m, DeployedConv2d) and m.path == "unfold" for m in graph_model.modules()):
        raise NotImplementedError(
            "the TorchScript ONNX exporter cannot export deployed convolutions on the 'unfold' "
            "path (ODConv at a dynamic batch size): it needs a constant im2col kernel size, "
            "which this tracer records as dynamic; install onnxscript and use dynamo=True")
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        # chosen on purpose; the input check's shape comparison is constant for a fixed model
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(graph_model, (x,), path, dynamo=False, dynamic_axes=axes, **names)
    return path
