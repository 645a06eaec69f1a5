"""Early exits and dynamic tokens through deployment and accounting: padnet.export keeps the
wrapper and folds the dynamic layers inside (outputs equal, early-exit inference too),
padnet.save / padnet.load bring the exits and tokens back, padnet.stats reports the compute
they save, MoE layers see the right padding inside exit segments and selected tokens, and token
merging is refused with early exits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import padnet
from padnet.conditional import (
    EarlyExitModel,
    MaxProbability,
    add_exits,
    bypass_tokens,
    eager_attention,
    merge_tokens,
    select_tokens,
)
from padnet.conditional.tokens import layer_token_mode
from padnet.convert.stats import forward_flops
from padnet.deploy import DeployedConv2d, DeployedMoE
from padnet.deploy.io import read_header
from padnet.models import create_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

AFTER = ["bert.encoder.layer.0", "bert.encoder.layer.1"]


def dyconv_resnet(criterion=None) -> EarlyExitModel:
    torch.manual_seed(0)
    host = padnet.dynamize(create_model("resnet8", num_classes=3, in_chans=1, width=4),
                           "dyconv", num_kernels=2, dynamic_ratio=0.4, init="copy_noise",
                           copy_noise_std=0.3)
    return add_exits(host, ["layer1", "layer2"], criterion=criterion).eval()


def bert_config(**kwargs):
    return transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3, **kwargs)


def moe_bert(*, tokens: str = "select", exits: bool = True):
    """A PAD-MoE tiny BERT with random token routers in layers 1 and 2 and exits."""
    torch.manual_seed(0)
    host = transformers.BertForSequenceClassification(bert_config())
    padnet.dynamize(host, "moe", num_experts=4, top_k=2, dynamic_ratio=0.5)
    if tokens == "select":
        select_tokens(host, [1, 2], keep=0.5)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for i in (1, 2):
                router = host.bert.encoder.layer[i].router
                router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
    host.eval()
    return add_exits(host, AFTER, criterion=MaxProbability(0.36)).eval() if exits else host


def text_batch(n: int = 6, length: int = 10) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([length, 7, 4, 9, 3, length][:n])
    mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": torch.randint(2, 60, (n, length), generator=gen) * mask,
            "attention_mask": mask}


def images(n: int = 9) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def spread(model: EarlyExitModel, *args, **kwargs) -> EarlyExitModel:
    """``model`` with a max-probability criterion halfway through its first exit's confidences
    on these inputs, so that some samples leave early and some go on."""
    with torch.no_grad():
        confidence = torch.softmax(model(*args, **kwargs)[0], -1).amax(-1).sort().values
    mid = len(confidence) // 2
    model.criterion = MaxProbability(float(confidence[mid - 1] + confidence[mid]) / 2)
    return model


def assert_same(model_a, model_b, *args, **kwargs):
    with torch.no_grad():
        for a, b in zip(model_a(*args, **kwargs), model_b(*args, **kwargs), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        ia, ib = model_a.infer(*args, **kwargs), model_b.infer(*args, **kwargs)
    assert torch.equal(ia.exit_index, ib.exit_index)
    torch.testing.assert_close(ia.logits, ib.logits, rtol=1e-5, atol=1e-6)
    return ia


# ---- export ----------------------------------------------------------------------------------
def test_export_keeps_the_exits_and_folds_the_dynamic_convolutions():
    model = spread(dyconv_resnet(), images())
    deployed = padnet.export(model)
    assert isinstance(deployed, EarlyExitModel) and deployed is not model
    assert any(isinstance(m, DeployedConv2d) for m in deployed.backbone.modules())
    assert not padnet.stats(deployed).layers  # nothing left in training form
    taken = assert_same(model, deployed, images())
    assert len(set(taken.exit_index.tolist())) > 1  # the comparison covers several exits


def test_export_of_a_token_selecting_pad_moe_bert_with_exits():
    model = spread(moe_bert(), **text_batch())
    deployed = padnet.export(model)
    layers = deployed.backbone.bert.encoder.layer
    assert [layer_token_mode(m) for m in layers] == [None, "select", "select"]
    assert all(isinstance(m.intermediate, DeployedMoE) for m in layers)
    taken = assert_same(model, deployed, **text_batch())
    assert len(set(taken.exit_index.tolist())) > 1


# ---- save / load -----------------------------------------------------------------------------
def test_a_saved_early_exit_registry_model_comes_back_from_the_file_alone(tmp_path):
    model = dyconv_resnet(MaxProbability(0.36))
    path = tmp_path / "ee.safetensors"
    padnet.save(padnet.export(model), path)
    header = read_header(path)
    assert header["version"] == 2 and header["architecture"]["kind"] == "registry"
    assert header["conditional"] == {"tokens": None, "exits": {
        "after": ["layer1", "layer2"], "num_classes": 3, "heads": "default",
        "criterion": {"name": "max_prob", "threshold": 0.36}}}
    assert all(d["name"].startswith("backbone.") for d in header["layers"])
    loaded = padnet.load(path)
    assert isinstance(loaded, EarlyExitModel) and repr(loaded.criterion) == "MaxProbability(" \
        "threshold=0.36)"
    assert_same(model, loaded, images())


def test_a_saved_token_selecting_bert_with_exits_comes_back_from_the_file_alone(tmp_path):
    model = moe_bert()
    path = tmp_path / "bert.safetensors"
    padnet.save(padnet.export(model), path)
    record = read_header(path)["conditional"]
    assert record["tokens"]["mode"] == "select" and record["tokens"]["router"] == "linear"
    assert [e["index"] for e in record["tokens"]["layers"]] == [1, 2]
    loaded = padnet.load(path)
    assert [layer_token_mode(m) for m in loaded.backbone.bert.encoder.layer] == [
        None, "select", "select"]
    assert_same(model, loaded, **text_batch())


def test_a_training_form_file_comes_back_on_a_host_converted_the_same_way(tmp_path):
    model = moe_bert()
    path = tmp_path / "train.safetensors"
    padnet.save(model, path)
    with pytest.raises(ValueError, match="PAD layers in training form"):
        padnet.load(path)
    fresh = transformers.BertForSequenceClassification(bert_config())
    padnet.dynamize(fresh, "moe", num_experts=4, top_k=2, dynamic_ratio=0.5)
    loaded = padnet.load(path, model=fresh)  # tokens and exits added to the host
    assert isinstance(loaded, EarlyExitModel)
    assert_same(model, loaded, **text_batch())


def test_merging_is_recorded_and_a_plain_model_stays_format_version_1(tmp_path):
    torch.manual_seed(0)
    host = transformers.BertForSequenceClassification(bert_config()).eval()
    merge_tokens(host, [2, 1, 0], metric="hidden")
    padnet.save(host, tmp_path / "m.safetensors")
    header = read_header(tmp_path / "m.safetensors")
    assert header["version"] == 2 and header["conditional"]["tokens"] == {
        "mode": "merge", "r": [2, 1, 0], "metric": "hidden", "proportional": True,
        "unmerge": True, "protect_cls": True}
    loaded = padnet.load(tmp_path / "m.safetensors")
    batch = text_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, host(**batch).logits)
    padnet.save(create_model("resnet8", num_classes=3, width=4), tmp_path / "plain.safetensors")
    header = read_header(tmp_path / "plain.safetensors")
    assert header["version"] == 1 and "conditional" not in header


def test_custom_exit_heads_need_the_model_itself(tmp_path):
    torch.manual_seed(0)
    host = create_model("resnet8", num_classes=3, in_chans=1, width=4)

    def head(width: int, classes: int) -> nn.Module:
        return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    model = add_exits(host, ["layer1"], head_factory=head).eval()
    path = tmp_path / "custom.safetensors"
    padnet.save(model, path)
    assert read_header(path)["conditional"]["exits"]["heads"] == "custom"
    with pytest.raises(ValueError, match="exit heads made by a head_factory.*pass model="):
        padnet.load(path)
    again = add_exits(create_model("resnet8", num_classes=3, in_chans=1, width=4), ["layer1"],
                      head_factory=head)
    loaded = padnet.load(path, model=again)
    with torch.no_grad():
        for a, b in zip(loaded(images()), model(images()), strict=True):
            torch.testing.assert_close(a, b)


# ---- stats -----------------------------------------------------------------------------------
def test_stats_of_exits_match_rates_times_cumulative_costs():
    model = dyconv_resnet(MaxProbability(0.36))
    x = images(12)
    cond = padnet.stats(model, x).conditional
    segments, heads = model.exit_flops(x)
    with torch.no_grad():
        taken = model.infer(x).exit_index
    rates = [float((taken == k).double().mean()) for k in range(3)]
    cumulative = [sum(segments[:k + 1]) + sum(heads[:k + 1]) for k in range(3)]
    assert cond.kind == "exits" and cond.exit_rates == pytest.approx(rates)
    assert cond.expected == pytest.approx(sum(r * c for r, c in zip(rates, cumulative,
                                                                     strict=True)))
    assert cond.full == sum(segments) + heads[-1] == forward_flops(model.backbone, x[:1])
    assert 0 < cond.saved_fraction < 1 and cond.speedup == pytest.approx(cond.full /
                                                                          cond.expected)
    assert "exit rates" in str(padnet.stats(model, x))
    model.criterion = None
    assert padnet.stats(model, x).conditional.expected is None


def test_stats_of_token_selection_and_plain_models():
    host = moe_bert(exits=False)
    batch = text_batch()
    cond = padnet.stats(host, batch).conditional
    with bypass_tokens(host), eager_attention(host):  # FlopCounterMode counts eager products
        full = forward_flops(host, batch) / 6
    assert cond.kind == "tokens" and cond.exit_rates is None
    assert cond.full == pytest.approx(full) and cond.expected < cond.full
    both = padnet.stats(moe_bert(), batch).conditional
    assert both.kind == "exits+tokens" and both.full == pytest.approx(full)
    assert padnet.stats(create_model("resnet8", num_classes=3, width=4),
                        torch.randn(2, 3, 8, 8)).conditional is None


# ---- padding inside segments and selected tokens --------------------------------------------
def test_moe_layers_see_the_padding_inside_exit_segments():
    host = moe_bert(tokens="none", exits=False)
    model = add_exits(host, AFTER)
    batch = text_batch()
    with torch.no_grad():
        host(**batch)
        want = padnet.aux_loss(host)
        model(**batch)
        got = padnet.aux_loss(model)
    torch.testing.assert_close(got, want)  # padding left out of the balance loss both ways
    assert all(m.padding_mask_hint is None for m in model.modules() if hasattr(
        m, "padding_mask_hint"))


def test_moe_layers_inside_a_selecting_layer_see_the_kept_tokens():
    host = moe_bert(exits=False)
    layer = host.bert.encoder.layer[1]
    seen = []
    layer.intermediate.register_forward_pre_hook(
        lambda m, args: seen.append((tuple(args[0].shape), m.padding_mask_hint.clone())))
    batch = text_batch()
    with torch.no_grad():
        host(**batch)
    counts = layer.last_kept.sum(1)  # tokens each sequence kept
    (shape, hint), = seen
    assert shape[:2] == (6, int(counts.max()))
    assert torch.equal(hint.bool(), torch.arange(shape[1]) < counts[:, None])


def test_token_merging_and_exits_are_refused_together():
    merged = transformers.BertForSequenceClassification(bert_config())
    merge_tokens(merged, 1)
    with pytest.raises(ValueError, match="cannot be combined with token merging"):
        add_exits(merged, AFTER)
    model = add_exits(transformers.BertForSequenceClassification(bert_config()), AFTER)
    with pytest.raises(ValueError, match="cannot be combined with early exits"):
        merge_tokens(model, 1)
    merge_tokens(model.backbone, 1)  # on the host behind the wrapper's back
    with pytest.raises(ValueError, match="cannot be combined with token merging"):
        model(**text_batch())
