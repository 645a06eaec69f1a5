"""padnet.conditional.tradeoff.sweep: accuracy and FLOPs per setting against the full model,
checked at the settings whose answer is known (nobody exits, everybody exits at once, every
token kept, nothing merged), the model's settings restored, and the documented errors."""

from __future__ import annotations

import pytest
import torch

from padnet.conditional import add_exits, merge_tokens, select_tokens
from padnet.conditional.tradeoff import default_values, sweep
from padnet.convert.stats import forward_flops
from padnet.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def exit_model():
    torch.manual_seed(0)
    host = create_model("resnet8", num_classes=3, in_chans=1, width=4)
    return add_exits(host, ["layer1", "layer2"]).eval()


def image_batches():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))
            for n in (10, 7)]


def test_threshold_sweep_at_the_extremes():
    model, data = exit_model(), image_batches()
    rows = sweep(model, data, "threshold", [0.0, 2.0], batch_size=8, latency_batches=3,
                 reps=1)
    full, everyone, nobody = rows
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        every = model(x)
    accuracy = [float((z.argmax(-1) == y).double().mean()) for z in every]
    segments, heads = model.exit_flops(x)
    assert full.value is None and full.speedup == 1.0 and full.exit_rates is None
    assert full.accuracy == pytest.approx(accuracy[-1])
    assert full.flops_per_sample == forward_flops(model.backbone, x[:1])
    assert everyone.exit_rates == [1.0, 0.0, 0.0]
    assert everyone.accuracy == pytest.approx(accuracy[0])
    assert everyone.flops_per_sample == segments[0] + heads[0]
    assert nobody.exit_rates == [0.0, 0.0, 1.0]
    assert nobody.accuracy == pytest.approx(accuracy[-1])
    assert nobody.flops_per_sample == sum(segments) + sum(heads)
    assert nobody.flops_ratio == pytest.approx(nobody.flops_per_sample / full.flops_per_sample)
    assert all(r.latency_ms > 0 for r in rows)
    assert model.criterion is None and not model.training
    assert nobody.as_dict()["exit_rates"] == "0.0000 0.0000 1.0000"
    assert full.as_dict()["value"] == "full"


def tiny_bert(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def text_batches():
    gen = torch.Generator().manual_seed(1)
    out = []
    for n, length in ((6, 9), (5, 7)):
        lengths = torch.randint(2, length + 1, (n,), generator=gen)
        mask = (torch.arange(length) < lengths[:, None]).long()
        out.append({"input_ids": torch.randint(2, 60, (n, length), generator=gen) * mask,
                    "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=gen)})
    return out


def test_keep_sweep_full_is_keep_one_and_settings_come_back():
    model = tiny_bert()
    select_tokens(model, [0, 1], keep=0.5)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.router.weight.normal_()
    rows = sweep(model, text_batches(), "keep", [1.0, 0.25], batch_size=16, reps=1)
    full, one, quarter = rows
    assert (one.accuracy, one.flops_per_sample) == (full.accuracy, full.flops_per_sample)
    assert quarter.flops_per_sample < full.flops_per_sample
    assert [layer.keep for layer in model.bert.encoder.layer] == [0.5, 0.5]


def test_merge_sweep_full_is_the_unmerged_model():
    model = tiny_bert()
    merge_tokens(model, [2, 0])
    data = text_batches()
    full, zero, two = sweep(model, data, "r", [0, 2], batch_size=4, reps=1)
    assert (zero.accuracy, zero.flops_per_sample) == (full.accuracy, full.flops_per_sample)
    assert two.flops_per_sample < full.flops_per_sample
    assert [layer.merge_r for layer in model.bert.encoder.layer] == [2, 0]
    plain = tiny_bert()
    correct = total = 0
    with torch.no_grad():
        for b in data:
            logits = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            correct += int((logits.argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
    assert full.accuracy == pytest.approx(correct / total)


def test_default_values():
    assert default_values("threshold", "entropy")[0] > default_values("threshold",
                                                                      "entropy")[-1]
    assert default_values("threshold", "patience") == [1, 2, 3]
    assert all(0 < v < 1 for v in default_values("keep"))


@pytest.mark.parametrize("knob,values,kwargs,match", [
    ("threshold", [0.5], {"model": "plain"}, "needs a model with early exits"),
    ("keep", [0.5], {}, "needs a model whose encoder selects tokens"),
    ("r", [1], {}, "needs a model whose encoder merges tokens"),
    ("threshold", [], {}, "non-empty list"),
    ("threshold", [float("nan")], {}, "finite numbers"),
    ("threshold", [1.5], {"criterion": "patience"}, "patience"),
    ("speed", [1], {}, "knob must be one of"),
    ("threshold", [0.5], {"criterion": "margin"}, "criterion must be one of"),
    ("threshold", [0.5], {"batch_size": 0}, "batch_size"),
    ("threshold", [0.5], {"latency_batches": 0}, "latency_batches"),
])
def test_bad_arguments(knob, values, kwargs, match):
    model = create_model("resnet8", num_classes=3, width=4) if kwargs.pop(
        "model", None) else exit_model()
    with pytest.raises(ValueError, match=match):
        sweep(model, image_batches(), knob, values, reps=1, **kwargs)


def test_bad_token_values():
    model = tiny_bert()
    select_tokens(model, keep=0.5)
    with pytest.raises(ValueError, match=r"keep values must be in \(0, 1\]"):
        sweep(model, text_batches(), "keep", [0.0], reps=1)


def test_final_logits_is_the_last_exit_without_the_others():
    model, x = exit_model(), image_batches()[0][0]
    with torch.no_grad():
        torch.testing.assert_close(model.final_logits(x), model(x)[-1])
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    encoder = add_exits(transformers.BertModel(config), ["encoder.layer.0"],
                        num_classes=2).eval()  # no classifier of its own: a new final head
    batch = {k: v for k, v in text_batches()[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(encoder.final_logits(**batch), encoder(**batch)[-1])
    full, nobody = sweep(encoder, text_batches(), "threshold", [2.0], batch_size=4, reps=1)
    assert full.accuracy == nobody.accuracy and nobody.exit_rates == [0.0, 1.0]
