"""The Hugging Face round trip: a converted model saved with ``model.save_pretrained`` comes back
with ``padnet.from_pretrained`` computing the same function (masks, scale modes, scale factors,
temperatures and the attention-mask hook included) and runs in ``transformers.pipeline``; the
conversion record rebuilds every built-in layer kind; ``padnet train`` takes a local Hugging Face
directory; bad directories fail with clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_pad_models import (  # noqa: E402
    ImageData,
    TokenData,
    image_tensors,
    sentences,
    tiny_bert,
    tiny_cnn,
    tiny_hf_resnet,
    tiny_moe_bert,
    tiny_tokenizer,
)

import padnet  # noqa: E402
from padnet.integrations.hf_io import attach_record, load_pretrained, save_pretrained  # noqa: E402
from padnet.integrations.record import apply_record, conversion_record  # noqa: E402
from padnet.layers import find_pad_weights  # noqa: E402
from padnet.layers.routing import ConvRouter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def token_batch(n: int = 6) -> dict:
    data = TokenData(n, seed=1)
    return {k: torch.stack([data[i][k] for i in range(n)]) for k in data[0]}


def partitioned_moe_bert():
    """A MoE BERT with IMP masks at kappa 0.4, mixed scale modes and trained-looking phi."""
    model = tiny_moe_bert()
    padnet.partition_model(model, [token_batch()], dynamic_ratio=0.4)
    weights = find_pad_weights(model)
    weights[-1].mode_mask.set_scale_mode("static_only")
    with torch.no_grad():
        for i, w in enumerate(weights):
            w.mode_mask.phi.fill_(0.1 * (i + 1))
    return model.eval()


def assert_same_pad_state(a, b) -> None:
    wa, wb = find_pad_weights(a), find_pad_weights(b)
    assert [w.name for w in wa] == [w.name for w in wb]
    for x, y in zip(wa, wb, strict=True):
        assert torch.equal(x.mode_mask.mask, y.mode_mask.mask), x.name
        assert x.mode_mask.scale_mode == y.mode_mask.scale_mode, x.name
        assert torch.equal(x.mode_mask.phi, y.mode_mask.phi), x.name


def test_moe_bert_saved_with_save_pretrained_loads_back_and_runs_in_a_pipeline(tmp_path):
    model = partitioned_moe_bert()
    attach_record(model)
    model.save_pretrained(tmp_path / "m")
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["padnet"]["layers"]

    reloaded = padnet.from_pretrained(tmp_path / "m")
    assert not reloaded.training
    assert_same_pad_state(model, reloaded)
    batch = token_batch()
    assert int((batch["attention_mask"] == 0).sum()) > 0  # padding present
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        aux_ref = padnet.aux_loss(model)
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        aux_got = padnet.aux_loss(reloaded)
    assert torch.equal(ref.logits, got.logits)
    assert torch.equal(aux_ref, aux_got)  # padding left out alike: the mask hook is back

    classify = transformers.pipeline("text-classification", model=reloaded, tokenizer=tok,
                                     device="cpu")
    text = sentences(1)[0][0]
    out = classify(text)[0]
    with torch.no_grad():
        probs = reloaded(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
    assert out["label"] == reloaded.config.id2label[int(probs.argmax())]
    assert out["score"] == pytest.approx(float(probs.max()), abs=1e-6)

    # the record travels in config.json: the reloaded model saves and loads again
    reloaded.save_pretrained(tmp_path / "again")
    again = load_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, got.logits)


def test_dyconv_resnet_keeps_temperatures_masks_and_dtype(tmp_path):
    model = tiny_hf_resnet(reduction=2, min_hidden=3)
    x, y = image_tensors(16)
    padnet.partition_model(model, [{"pixel_values": x, "labels": y}], dynamic_ratio=0.3)
    padnet.set_temperature(model, 7.5)
    model = model.to(torch.float64).eval()
    save_pretrained(model, tmp_path / "r")
    reloaded = padnet.from_pretrained(tmp_path / "r")
    temps = {float(m.temperature) for m in reloaded.modules() if isinstance(m, ConvRouter)}
    assert temps == {7.5}
    assert next(reloaded.parameters()).dtype == torch.float64
    assert_same_pad_state(model, reloaded)
    pixels = ImageData(8, seed=3).x.double()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).logits,
                           reloaded(pixel_values=pixels).logits)


@pytest.mark.parametrize("method", ["dyconv", "condconv", "odconv"])
def test_the_record_rebuilds_each_conv_method(method):
    kwargs = {"reduction": 3, "min_hidden": 2} if method != "condconv" else {}
    model = padnet.dynamize(tiny_cnn_static(), method, num_kernels=3, init="copy_noise",
                            path="unfold", temperature=4.0, **kwargs)
    x, y = image_tensors(12)
    padnet.partition_model(model, [(x, y)], dynamic_ratio=0.5, scope="layer")
    record = conversion_record(model)
    assert [e["method"] for e in record["layers"]] == [method, method]
    fresh = apply_record(tiny_cnn_static(seed=5), json.loads(json.dumps(record)))
    assert fresh.padnet_report.names == model.padnet_report.names
    fresh.load_state_dict(model.state_dict())  # strict: the same tensors and shapes
    assert_same_pad_state(model, fresh)
    layers = dict(padnet.layers.find_pad_layers(fresh))
    assert {layer.path for layer in layers.values()} == {"unfold"}
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


def tiny_cnn_static(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, padding=1),
        torch.nn.ReLU(), torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))


def test_the_record_keeps_moe_options_and_a_named_activation():
    model = tiny_bert()
    padnet.dynamize(model, "moe", num_experts=3, top_k=1, layers=[1], activation="relu",
                    init="kaiming",
                    capacity_factor=1.5, router_noise="jitter", load_balance_coef=0.2,
                    z_loss_coef=0.01, padding_from_attention_mask=False)
    record = conversion_record(model)
    (entry,) = record["layers"]
    assert entry["name"] == "bert.encoder.layer.1.intermediate"
    assert entry["options"] == {
        "num_experts": 3, "top_k": 1, "capacity_factor": 1.5, "router_noise": "jitter",
        "router_noise_std": 0.01, "load_balance_coef": 0.2, "z_loss_coef": 0.01,
        "path": "auto", "static_path": "auto", "padding_from_attention_mask": False,
        "activation": "relu"}
    fresh = apply_record(tiny_bert(seed=1), record)
    assert conversion_record(fresh) == record
    assert isinstance(fresh.bert.encoder.layer[1].output.dense, torch.nn.Identity)
    assert not isinstance(fresh.bert.encoder.layer[0].intermediate, padnet.MoE)


def test_tied_weights_stored_once_come_back_tied(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16)
    model = padnet.dynamize(transformers.BertForMaskedLM(config).eval(), "moe", num_experts=2)
    save_pretrained(model, tmp_path / "mlm")
    reloaded = load_pretrained(tmp_path / "mlm")
    emb = reloaded.bert.embeddings.word_embeddings.weight
    assert reloaded.cls.predictions.decoder.weight is emb
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_plain_directory_loads_as_a_plain_model(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path / "plain")
    reloaded = load_pretrained(tmp_path / "plain")
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_bad_directories_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    model = tiny_moe_bert()
    del model.config.padnet  # converted, but its record removed
    model.save_pretrained(tmp_path / "norecord")
    with pytest.raises(ValueError, match=r"not in the model.*attach_record"):
        load_pretrained(tmp_path / "norecord")
    tiny_bert().config.save_pretrained(tmp_path / "pickled")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="never reads pickled"):
        load_pretrained(tmp_path / "pickled")
    save_pretrained(model, tmp_path / "damaged")
    config = json.loads((tmp_path / "damaged" / "config.json").read_text())
    config["padnet"]["format"] = "other"
    (tmp_path / "damaged" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a padnet conversion record"):
        load_pretrained(tmp_path / "damaged")
    with pytest.raises(TypeError, match="Hugging Face model"):
        attach_record(tiny_cnn())


def test_a_pad_layer_the_record_does_not_know_is_refused():
    from padnet.layers import PadConv2d

    class Odd(padnet.DynamicConv2d):
        pass

    model = tiny_cnn_static()
    model[2] = Odd(4, 6, 3, padding=1, num_kernels=2)
    assert isinstance(model[2], PadConv2d)
    with pytest.raises(ValueError, match=r"'2' of type Odd"):
        conversion_record(model)


@pytest.mark.slow  # a fresh interpreter imports torch: about 2 s
def test_import_padnet_imports_no_framework():
    code = ("import sys, padnet; heavy = [m for m in ('transformers', 'lightning', "
            "'pytorch_lightning', 'accelerate') if m in sys.modules]; assert not heavy, heavy; "
            "f = padnet.from_pretrained; assert 'transformers' not in sys.modules; "
            "assert f.__name__ == 'load_pretrained'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- padnet train on a local Hugging Face directory -------------------------------------------
@pytest.fixture
def hf_dir_and_csv(tmp_path):
    model_dir = tmp_path / "tiny_bert"
    tiny_tokenizer().save_pretrained(model_dir)
    tiny_bert(num_labels=2).save_pretrained(model_dir)
    rows = ["text,label"] + [f"{t},{label}" for t, label in sentences(40)]
    data = tmp_path / "texts.csv"
    data.write_text("\n".join(rows) + "\n")
    return model_dir, data


def test_padnet_train_takes_a_local_hugging_face_directory(hf_dir_and_csv, tmp_path, monkeypatch):
    from padnet.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir, data = hf_dir_and_csv
    out = tmp_path / "run"
    status = main(["train", "--model", str(model_dir), "--pretrained", "true", "--dataset", "csv",
                   "--data-root", str(data), "--method", "moe", "--num-experts", "2",
                   "--top-k", "1",
                   "--dynamic-ratio", "0.5", "--imp-mode", "interleaved", "--imp-iterations",
                   "1", "--imp-num-batches", "1", "--batch-size", "16", "--epochs", "1",
                   "--max-length", "8", "--val-fraction", "0.2", "--out-dir", str(out), "--quiet"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stats"]["dynamic_ratio"] == pytest.approx(0.5, abs=0.01)
    assert (out / "model.safetensors").is_file()


def test_padnet_train_refuses_a_converted_directory(tmp_path):
    from padnet.train import load_config
    from padnet.train.build import build_base_model

    save_pretrained(tiny_moe_bert(), tmp_path / "converted")
    cfg = load_config(overrides={"model": str(tmp_path / "converted"), "pretrained": True,
                                 "dataset": "csv"})
    with pytest.raises(ValueError, match="converted by padnet.*from_pretrained"):
        build_base_model(cfg, num_classes=2)


def test_dynamize_alone_lets_save_pretrained_round_trip(tmp_path):
    model = tiny_bert().eval()  # a plain transformers model
    padnet.dynamize(model, "moe", num_experts=4, top_k=2)
    assert model.config.padnet == conversion_record(model)
    model.save_pretrained(tmp_path)  # transformers' own call, nothing from padnet
    back = padnet.from_pretrained(tmp_path)
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, model(**batch).logits)
