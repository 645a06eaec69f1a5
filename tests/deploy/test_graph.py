"""Graph export of the deployment form (padnet.deploy.graph): one exported program, and one ONNX
file, serve every batch size and compute what the eager deployed model computes; MoE layers are
refused with a clear error."""

import pytest
import torch

import padnet
from padnet.deploy import DeployedConv2d
from padnet.deploy.graph import export_onnx, export_program, graph_form
from padnet.layers import MoE
from padnet.models import create_model
from padnet.partition import partition_model

KINDS = ["dyconv", "condconv", "odconv", "channel"]


def trained_form(kind: str) -> torch.nn.Module:
    """A dynamized resnet8: element masks at ratio 0.3, or (``channel``) DY-Conv with a
    channel-structured mask from one magnitude-scored partition."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    method = "dyconv" if kind == "channel" else kind
    padnet.dynamize(model, method, dynamic_ratio=0.3, temperature=4.0, init="copy_noise",
                    copy_noise_std=0.1)
    if kind == "channel":
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,),
                                                                            generator=gen))]
        partition_model(model, batches, dynamic_ratio=0.3, granularity="channel",
                        score="magnitude")
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict:
    """kind -> (training form, eager deployed form with the default paths)."""
    out = {}
    for kind in KINDS:
        model = trained_form(kind)
        out[kind] = (model, padnet.export(model))
    return out


@pytest.fixture(scope="module")
def programs(models) -> dict:
    """kind -> the program exported once, from the training form, at a dynamic batch size."""
    return {kind: export_program(model, torch.randn(2, 1, 28, 28))
            for kind, (model, _) in models.items()}


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def test_the_channel_partition_gives_channel_mode_layers(models) -> None:
    modes = {m.mode for m in models["channel"][1].modules() if isinstance(m, DeployedConv2d)}
    assert "channel" in modes


@pytest.mark.parametrize("kind", KINDS)
def test_the_program_runs_at_any_batch_size(models, programs, kind) -> None:
    run = programs[kind].module()
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert rel_diff(run(x), models[kind][1](x)) <= 1e-5


def test_the_batch_dimension_is_declared_dynamic(programs) -> None:
    program = programs["dyconv"]
    (placeholder,) = [n for n in program.graph.nodes
                      if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    batch, *rest = placeholder.meta["val"].shape
    assert isinstance(batch, torch.SymInt) and rest == [1, 28, 28]
    assert [r.lower for r in program.range_constraints.values()] == [1]


def test_a_deployed_model_is_copied_onto_batch_free_paths(models) -> None:
    deployed = models["odconv"][1]
    paths = {m.path for m in deployed.modules() if isinstance(m, DeployedConv2d)}
    ready = graph_form(deployed)
    assert ready is not deployed and paths == {"auto"}  # the original keeps its paths
    assert {m.path for m in ready.modules() if isinstance(m, DeployedConv2d)} == {"unfold"}
    dyconv = graph_form(models["dyconv"][0])
    assert {m.path for m in dyconv.modules() if isinstance(m, DeployedConv2d)} == {"mixture"}
    assert graph_form(ready) is ready  # nothing to change


def test_a_static_batch_export_keeps_the_example_shape(models) -> None:
    model, deployed = models["dyconv"]
    x = torch.randn(1, 1, 28, 28)
    program = export_program(model, x, dynamic_batch=False)
    assert not program.range_constraints
    with torch.no_grad():
        assert rel_diff(program.module()(x), deployed(x)) <= 1e-5


def test_moe_graph_export_is_refused_with_a_clear_error(tmp_path) -> None:
    torch.manual_seed(0)
    layer = MoE(6, 10, num_experts=4, top_k=2, dynamic_ratio=0.5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), layer)
    x = torch.randn(3, 6)
    for target in (layer, padnet.export(layer), model):
        with pytest.raises(NotImplementedError, match="MoE layers is not supported"):
            export_program(target, x)
        with pytest.raises(NotImplementedError, match="MoE layers is not supported"):
            export_onnx(target, x, tmp_path / "moe.onnx")


def test_bad_example_inputs_are_refused(models) -> None:
    for bad in (torch.tensor(1.0), torch.randn(0, 1, 28, 28), [torch.randn(2, 1, 28, 28)]):
        with pytest.raises(ValueError, match="example_input"):
            export_program(models["dyconv"][0], bad)


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    return torch.from_numpy(session.run(["output"], {"input": x.numpy()})[0])


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # inside torch.onnx
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_runs_at_any_batch_size(models, tmp_path, kind) -> None:
    """The torch.export-based exporter (the default where onnxscript is installed)."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(name)
    model, deployed = models[kind]
    path = export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "model.onnx", dynamo=True)
    assert path.is_file() and list(tmp_path.iterdir()) == [path]  # weights inside
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert rel_diff(run_onnx(path, x), deployed(x)) <= 1e-5


@pytest.mark.parametrize("kind", ["condconv", "channel"])
def test_the_torchscript_onnx_exporter_also_has_a_dynamic_batch(models, tmp_path, kind) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, deployed = models[kind]
    path = export_onnx(model, torch.randn(1, 1, 28, 28), tmp_path / "model.onnx", dynamo=False)
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert rel_diff(run_onnx(path, x), deployed(x)) <= 1e-5


def test_the_torchscript_onnx_exporter_refuses_the_unfold_path(models, tmp_path) -> None:
    """ODConv takes the unfold path at a dynamic batch size."""
    with pytest.raises(NotImplementedError, match="'unfold' path"):
        export_onnx(models["odconv"][0], torch.randn(2, 1, 28, 28), tmp_path / "m.onnx",
                    dynamo=False)


def test_the_default_onnx_exporter_is_the_dynamo_one_where_onnxscript_is_installed(
        models, tmp_path, monkeypatch) -> None:
    import importlib.util

    find_spec, chosen = importlib.util.find_spec, []
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kw: chosen.append(kw["dynamo"]))
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, installed=installed: (
            (object() if installed else None) if name == "onnxscript"
            else find_spec(name, *a)))
        export_onnx(models["condconv"][0], torch.randn(2, 1, 28, 28), tmp_path / "m.onnx")
    assert chosen == [True, False]
