"""padnet.conditional early exits: exit heads on ResNets, MobileNetV2 and BERT, batched inference
that drops the samples that exited, criteria against per-sample oracles, the joint loss, the
report, and the documented errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import padnet
from padnet.conditional import (
    EarlyExitModel,
    Entropy,
    MaxProbability,
    Patience,
    add_exits,
    exit_decisions,
    exit_loss,
    exit_report,
)
from padnet.models.mobilenetv2 import mobilenet_v2
from padnet.models.resnet import resnet8, resnet50

NEVER = MaxProbability(1.5)  # a probability never reaches 1.5: nobody exits early


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def images(n: int = 12, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cnn(kind: str) -> tuple[nn.Module, list[str]]:
    """A tiny host model in eval mode and the exit points used for it."""
    torch.manual_seed(0)
    if kind == "resnet8":
        return resnet8(num_classes=10, width=8).eval(), ["layer1", "layer2"]
    if kind == "dyconv_resnet8":
        model = padnet.dynamize(resnet8(num_classes=10, width=8), "dyconv", num_kernels=3,
                                init="copy_noise", copy_noise_std=0.3)
        return model.eval(), ["layer1", "layer2"]
    if kind == "resnet50":
        return resnet50(num_classes=10, width=4).eval(), ["layer1", "layer2.1", "layer3"]
    if kind == "mobilenet_v2":
        return mobilenet_v2(num_classes=10, width_mult=0.25).eval(), ["features.2",
                                                                       "features.7"]
    raise AssertionError(kind)


def midpoint_threshold(values: torch.Tensor) -> float:
    """A threshold halfway between the two middle values: half the values on either side, none
    close to it."""
    v = values.sort().values
    mid = len(v) // 2
    return float((v[mid - 1] + v[mid]) / 2)


class SplitScore:
    """Test criterion: at its ``i``-th call a sample exits when its logit margin ``z_0 - z_1``
    exceeds ``thresholds[i]`` (a per-sample rule; the call count lives in ``memory``)."""

    def __init__(self, thresholds: list[float]) -> None:
        self.thresholds = thresholds

    def __call__(self, logits: torch.Tensor, memory: dict) -> torch.Tensor:
        step = memory.get("step")
        step = torch.zeros(len(logits), dtype=torch.long) if step is None else step + 1
        memory["step"] = step
        return logits[:, 0] - logits[:, 1] > torch.tensor(self.thresholds)[step]

    @classmethod
    def fit(cls, all_logits: tuple[torch.Tensor, ...]) -> SplitScore:
        """Thresholds that let half of the samples still running leave at each exit."""
        running = torch.ones(len(all_logits[0]), dtype=torch.bool)
        thresholds = []
        for z in all_logits[:-1]:
            score = z[:, 0] - z[:, 1]
            thresholds.append(midpoint_threshold(score[running]))
            running &= score <= thresholds[-1]
        return cls(thresholds)


# ---------------------------------------------------------------- equivalence with the host


@pytest.mark.parametrize("kind", ["resnet8", "dyconv_resnet8", "resnet50", "mobilenet_v2"])
def test_unreachable_threshold_gives_the_full_model(kind):
    host, after = cnn(kind)
    model = add_exits(host, after)
    x = images(6, 32 if kind == "resnet50" else 16)
    with torch.no_grad():
        reference = host(x)
        out = model.infer(x, criterion=NEVER)
        every = model(x)
    assert torch.equal(out.logits, reference)
    assert out.exit_index.tolist() == [len(after)] * 6
    assert len(every) == len(after) + 1 and torch.equal(every[-1], reference)
    assert all(z.shape == (6, 10) for z in every)


@pytest.mark.parametrize("kind", ["resnet8", "dyconv_resnet8", "mobilenet_v2"])
@pytest.mark.parametrize("rule", ["custom", "max_probability"])
def test_mixed_exits_equal_each_sample_alone(kind, rule):
    host, after = cnn(kind)
    model = add_exits(host, after)
    x = images(12)
    with torch.no_grad():
        if rule == "custom":
            criterion = SplitScore.fit(model(x))
        else:
            first = torch.softmax(model(x)[0], -1).amax(-1)
            criterion = MaxProbability(midpoint_threshold(first))
        out = model.infer(x, criterion=criterion)
        alone = [model.infer(x[i:i + 1], criterion=criterion) for i in range(len(x))]
    exits = out.exit_index.tolist()
    assert len(set(exits)) == (3 if rule == "custom" else 2), exits  # really mixed
    assert exits == [int(a.exit_index) for a in alone]
    torch.testing.assert_close(out.logits, torch.cat([a.logits for a in alone]),
                               rtol=1e-5, atol=1e-5)


def test_infer_agrees_with_decisions_on_the_full_forward():
    host, after = cnn("resnet8")
    model = add_exits(host, after)
    x = images(12)
    with torch.no_grad():
        every = model(x)
        threshold = midpoint_threshold(torch.softmax(every[0], -1).amax(-1))
        for criterion in (SplitScore.fit(every), MaxProbability(threshold), Patience(1)):
            out, ref = model.infer(x, criterion=criterion), exit_decisions(every, criterion)
            assert torch.equal(out.exit_index, ref.exit_index)
            torch.testing.assert_close(out.logits, ref.logits)


def test_deeper_segments_receive_fewer_samples():
    host, after = cnn("resnet8")
    model = add_exits(host, after)
    seen: dict[str, list[int]] = {}

    def record(name):
        def hook(module, inputs):
            seen.setdefault(name, []).append(inputs[0].shape[0])
        return hook

    for name in ("layer1", "layer2", "layer3", "fc"):
        host.get_submodule(name).register_forward_pre_hook(record(name))
    for i, head in enumerate(model.exits):
        head.register_forward_pre_hook(record(f"exit{i}"))
    x = images(12)
    with torch.no_grad():
        criterion = SplitScore.fit(model(x))
        seen.clear()
        out = model.infer(x, criterion=criterion)
    counts = torch.bincount(out.exit_index, minlength=3).tolist()
    assert min(counts) > 0
    assert seen["layer1"] == seen["exit0"] == [12]
    assert seen["layer2"] == seen["exit1"] == [12 - counts[0]]
    assert seen["layer3"] == seen["fc"] == [counts[2]]


def test_everyone_leaving_early_skips_the_rest():
    host, after = cnn("resnet8")
    model = add_exits(host, after)
    calls = []
    host.layer2.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    with torch.no_grad():
        out = model.infer(images(5), criterion=MaxProbability(0.0))
        head = model.exits[0](host.layer1(host.relu(host.bn1(host.conv1(images(5))))))
    assert calls == [] and out.exit_index.tolist() == [0] * 5
    torch.testing.assert_close(out.logits, head)


def test_default_criterion_and_dynamic_layers_keep_working():
    host, after = cnn("dyconv_resnet8")
    model = add_exits(host, after, criterion=SplitScore([0.0, 0.0]))
    assert len(padnet.layers.find_pad_layers(model)) == len(padnet.layers.find_pad_layers(host))
    padnet.set_temperature(model, 5.0)  # reaches the dynamic layers through the wrapper
    model.train()
    loss = exit_loss(model(images(4)), torch.tensor([0, 1, 2, 3])) + padnet.aux_loss(model)
    loss.backward()
    routers = [p for n, p in model.named_parameters() if "router" in n]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    model.eval()
    with torch.no_grad():
        assert model.infer(images(4)).exit_index.shape == (4,)


# ---------------------------------------------------------------- criteria vs oracles


def softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def max_probability_oracle(logits: torch.Tensor, threshold: float) -> list[bool]:
    return [max(softmax_row(row)) >= threshold for row in logits.double().tolist()]


def entropy_oracle(logits: torch.Tensor, threshold: float) -> list[bool]:
    out = []
    for row in logits.double().tolist():
        entropy = -sum(p * math.log(p) for p in softmax_row(row) if p > 0)
        out.append(entropy <= threshold)
    return out


def random_logits(n: int = 64, classes: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=gen) * 6  # confident and unsure rows
    return torch.randn(n, classes, generator=gen) * scale


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.55, 0.9, 1.0, 1.5])
def test_max_probability_matches_oracle(threshold):
    logits = random_logits()
    done = MaxProbability(threshold)(logits, {})
    assert done.dtype == torch.bool and done.tolist() == max_probability_oracle(logits, threshold)
    assert 0 < sum(done.tolist()) < len(logits) or threshold in (0.0, 1.0, 1.5)


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.8, 1.3, math.log(5)])
def test_entropy_matches_oracle(threshold):
    logits = random_logits()
    done = Entropy(threshold)(logits, {})
    assert done.tolist() == entropy_oracle(logits, threshold)
    if threshold == math.log(5):
        assert all(done.tolist())


def test_entropy_handles_saturated_logits():
    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert Entropy(1e-6)(logits, {}).tolist() == [True, False]


def exits_oracle(all_logits: list[torch.Tensor], decide) -> list[int]:
    """Per sample: walk the exits in order, stop at the first one ``decide`` accepts."""
    out = []
    for s in range(all_logits[0].shape[0]):
        chain = [z[s].tolist() for z in all_logits]
        for i in range(len(chain)):
            if i == len(chain) - 1 or decide(chain[: i + 1]):
                out.append(i)
                break
    return out


def pabee_decide(patience: int):
    """Exit once the argmax stayed unchanged across ``patience`` consecutive transitions."""
    def decide(chain: list[list[float]]) -> bool:
        preds = [max(range(len(z)), key=z.__getitem__) for z in chain]
        count = 0
        for prev, cur in zip(preds, preds[1:], strict=False):
            count = count + 1 if cur == prev else 0
        return count >= patience
    return decide


@pytest.mark.parametrize("name", ["max_probability", "entropy", "patience1", "patience2"])
def test_criteria_through_the_exit_loop_match_per_sample_oracle(name):
    all_logits = [random_logits(80, 3, seed=s) for s in range(5)]
    if name == "max_probability":
        criterion, decide = MaxProbability(0.7), lambda c: max(softmax_row(c[-1])) >= 0.7
    elif name == "entropy":
        criterion = Entropy(0.6)
        decide = lambda c: entropy_oracle(torch.tensor([c[-1]]), 0.6)[0]  # noqa: E731
    else:
        patience = int(name[-1])
        criterion, decide = Patience(patience), pabee_decide(patience)
    out = exit_decisions(all_logits, criterion)
    expected = exits_oracle(all_logits, decide)
    assert out.exit_index.tolist() == expected
    assert len(set(expected)) >= 3
    chosen = torch.stack([all_logits[k][s] for s, k in enumerate(expected)])
    assert torch.equal(out.logits, chosen)


def chain_of_predictions(preds: list[list[int]], classes: int = 4) -> list[torch.Tensor]:
    """Exit logits (one per exit) whose argmax per sample is ``preds[sample][exit]``."""
    num_exits = len(preds[0])
    return [F.one_hot(torch.tensor([p[i] for p in preds]), classes).float() * 3
            for i in range(num_exits)]


def test_pabee_patience_semantics():
    preds = [
        [0, 1, 1, 2, 2, 2],  # agreements at exits 2 and 4, never two in a row before the end
        [3, 3, 0, 0, 0, 0],  # counter 1, reset at exit 2, then 1, 2 at exits 3, 4
        [0, 1, 2, 3, 0, 1],  # never agrees: final exit
        [1, 1, 1, 1, 1, 1],  # agrees everywhere: counter 1, 2, ...
        [0, 0, 1, 1, 1, 2],  # counter 1, 0, 1, 2
    ]
    logits = chain_of_predictions(preds)
    assert exit_decisions(logits, Patience(1)).exit_index.tolist() == [2, 1, 5, 1, 1]
    out = exit_decisions(logits, Patience(2))
    assert out.exit_index.tolist() == [5, 4, 5, 2, 4]
    assert out.logits.argmax(-1).tolist() == [2, 0, 1, 1, 1]
    assert exit_decisions(logits, Patience(4)).exit_index.tolist() == [5, 5, 5, 4, 5]
    assert exit_decisions(logits, Patience(5)).exit_index.tolist() == [5, 5, 5, 5, 5]


def test_patience_memory_follows_the_shrinking_batch():
    host, after = cnn("resnet8")
    model = add_exits(host, after)
    # patience 1 with 3 exits: exit 1 when exits 0 and 1 agree, else the final exit
    with torch.no_grad():
        every = model(images(12))
        out = model.infer(images(12), criterion=Patience(1))
    same = (every[0].argmax(-1) == every[1].argmax(-1)).tolist()
    assert out.exit_index.tolist() == [1 if s else 2 for s in same]


# ---------------------------------------------------------------- BERT


def tiny_bert(kind: str = "classification", layers: int = 4, attn: str = "sdpa"):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    if kind == "classification":
        return transformers.BertForSequenceClassification(config).eval()
    return transformers.BertModel(config).eval()


def text_batch(n: int = 10, length: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, length + 1, (n,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length) < lengths[:, None]).long()  # (n, length), right padding
    ids = torch.randint(1, 64, (n, length), generator=gen) * mask
    return {"input_ids": ids, "attention_mask": mask}


BERT_AFTER = ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_unreachable_threshold_gives_the_full_model(attn):
    host = tiny_bert(attn=attn)
    model = add_exits(host, BERT_AFTER[:2])
    batch = text_batch()
    with torch.no_grad():
        reference = host(**batch).logits
        out = model.infer(**batch, criterion=NEVER)
        every = model(**batch)
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=1e-6)
    assert out.exit_index.tolist() == [2] * 10
    torch.testing.assert_close(every[-1], reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_padding_exits_consistently(attn):
    """A padded batch gives each sample what it gets alone, unpadded; hidden states and mask
    shrink together."""
    host = tiny_bert(attn=attn)
    model = add_exits(host, BERT_AFTER)
    batch = text_batch()
    seen = []
    for layer in host.bert.encoder.layer:
        layer.register_forward_pre_hook(
            lambda m, args: seen.append((args[0].shape[0], _mask_batch(args[1]))))
    with torch.no_grad():
        criterion = SplitScore.fit(model(**batch))
        seen.clear()
        out = model.infer(**batch, criterion=criterion)
        seen_batched = list(seen)
        alone = []
        for i in range(10):
            keep = batch["attention_mask"][i].bool()
            alone.append(model.infer(input_ids=batch["input_ids"][i][keep][None],
                                     criterion=criterion))
    exits = out.exit_index.tolist()
    assert len(set(exits)) >= 3, exits
    assert exits == [int(a.exit_index) for a in alone]
    torch.testing.assert_close(out.logits, torch.cat([a.logits for a in alone]),
                               rtol=1e-5, atol=1e-5)
    running = [10 - sum(e < k for e in exits) for k in range(4)]
    assert [b for b, _ in seen_batched] == running
    assert all(m is None or m == b for b, m in seen_batched)


def _mask_batch(mask) -> int | None:
    return None if mask is None else int(mask.shape[0])


def test_bert_model_without_classifier_gets_a_final_head():
    host = tiny_bert("encoder", layers=2)
    with pytest.raises(ValueError, match="num_classes is required"):
        add_exits(host, ["encoder.layer.0"])
    model = add_exits(host, ["encoder.layer.0"], num_classes=5)
    assert model.final_exit is not None and model.num_exits == 2
    batch = text_batch(4)
    with torch.no_grad():
        every = model(batch["input_ids"], batch["attention_mask"])
        out = model.infer(**batch, criterion=NEVER)
    assert [tuple(z.shape) for z in every] == [(4, 5), (4, 5)]
    assert torch.equal(out.logits, every[-1])


def test_bert_with_pad_moe_layers_keeps_working():
    host = tiny_bert(layers=3)
    padnet.dynamize(host, "moe", num_experts=4, top_k=2, layers=[1, 2], dynamic_ratio=0.5)
    model = add_exits(host, BERT_AFTER[:2])
    batch = text_batch()
    with torch.no_grad():
        out = model.infer(**batch, criterion=NEVER)
        torch.testing.assert_close(out.logits, host(**batch).logits, rtol=0, atol=1e-6)
    model.train()
    exit_loss(model(**batch), torch.zeros(10, dtype=torch.long)).backward()
    assert float(padnet.aux_loss(model).detach()) > 0


# ---------------------------------------------------------------- joint loss


def loss_oracle(all_logits, targets, weights, alpha, temp) -> float:
    """The documented formula, term by term, in float64 Python."""
    def log_softmax(row, t=1.0):
        row = [v / t for v in row]
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        return [v - lse for v in row]

    rows = [z.double().tolist() for z in all_logits]
    n, total = len(targets), 0.0
    for i, w in enumerate(weights):
        ce = -sum(log_softmax(rows[i][s])[y] for s, y in enumerate(targets)) / n
        if i == len(weights) - 1 or alpha == 0:
            total += w * ce
            continue
        kl = 0.0
        for s in range(n):
            teacher, student = log_softmax(rows[-1][s], temp), log_softmax(rows[i][s], temp)
            kl += sum(math.exp(t) * (t - q) for t, q in zip(teacher, student, strict=True))
        total += w * ((1 - alpha) * ce + alpha * temp**2 * kl / n)
    return total


@pytest.mark.parametrize("alpha,temp", [(0.0, 1.0), (0.5, 2.0), (1.0, 4.0)])
def test_exit_loss_matches_formula(alpha, temp):
    all_logits = [random_logits(6, 4, seed=s) for s in range(3)]
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    weights = [0.3, 0.7, 1.0]
    got = exit_loss(all_logits, targets, weights=weights, distill=alpha, temperature=temp)
    assert got.dim() == 0
    assert float(got) == pytest.approx(loss_oracle(all_logits, targets, weights, alpha, temp),
                                       rel=1e-5)


@pytest.mark.parametrize("distill", [0.0, 0.5])
@pytest.mark.parametrize("kind", ["resnet8", "bert"])
def test_joint_loss_gradient_reaches_every_head(kind, distill):
    if kind == "bert":
        host = tiny_bert(layers=3)
        model = add_exits(host, BERT_AFTER[:2])
        batch = text_batch(6)
        logits = model.train()(**batch)
    else:
        host, after = cnn("resnet8")
        model = add_exits(host, after)
        logits = model.train()(images(6))
    exit_loss(logits, torch.tensor([0, 1, 2, 0, 1, 2]), weights=[0.5, 0.5, 1.0],
              distill=distill, temperature=2.0).backward()
    for i, head in enumerate(model.exits):
        for name, p in head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (i, name)
    final = host.classifier if kind == "bert" else host.fc
    assert final.weight.grad.abs().sum() > 0


def test_distillation_teacher_is_detached():
    host, after = cnn("resnet8")
    model = add_exits(host, after)
    logits = model.train()(images(6))
    exit_loss(logits, torch.zeros(6, dtype=torch.long), weights=[1.0, 1.0, 0.0],
              distill=1.0).backward()
    for p in [*host.fc.parameters(), *host.layer3.parameters()]:  # only the teacher uses them
        assert p.grad is None or not p.grad.any()
    assert model.exits[0].fc.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- report


def test_exit_report_numbers():
    host, after = cnn("resnet8")
    model = add_exits(host, after)
    x, y = images(12), torch.arange(12) % 10
    with torch.no_grad():
        every = model(x)
        criterion = SplitScore.fit(every)
        out = model.infer(x, criterion=criterion)
    report = exit_report(model, (x, y), criterion)
    counts = torch.bincount(out.exit_index, minlength=3).tolist()
    assert report.exit_points == ["layer1", "layer2", "final"] and report.num_samples == 12
    assert report.counts == counts and report.rates == pytest.approx([c / 12 for c in counts])
    assert report.exit_accuracy == pytest.approx(
        [float((z.argmax(-1) == y).float().mean()) for z in every])
    assert report.accuracy == pytest.approx(float((out.logits.argmax(-1) == y).float().mean()))
    for k in range(3):
        taken = out.exit_index == k
        hits = (out.logits.argmax(-1) == y)[taken].float()
        expected = float(hits.mean()) if taken.any() else math.nan
        assert report.accuracy_at_exit[k] == pytest.approx(expected, nan_ok=True)
    # the host alone, counted the same way, costs full_flops
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        host(x[:1])
    assert report.full_flops == counter.get_total_flops()
    seg, head = report.segment_flops, report.head_flops
    assert report.flops_to_exit == [seg[0] + head[0], sum(seg[:2]) + sum(head[:2]),
                                    sum(seg) + sum(head)]
    assert report.average_flops == pytest.approx(
        sum(r * f for r, f in zip(report.rates, report.flops_to_exit, strict=True)))
    assert report.flops_to_exit[0] < report.full_flops < report.flops_to_exit[-1]
    assert "final" in str(report) and report.as_dict()["speedup"] == pytest.approx(
        report.full_flops / report.average_flops)


def test_exit_report_over_a_loader_and_text_batches():
    host, after = cnn("resnet8")
    model = add_exits(host, after, criterion=NEVER)
    data = torch.utils.data.TensorDataset(images(10), torch.arange(10) % 10)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model.train()
    report = exit_report(model, loader)
    assert model.training  # restored
    assert report.counts == [0, 0, 10] and report.average_flops == report.flops_to_exit[-1]

    bert = add_exits(tiny_bert(layers=2), BERT_AFTER[:1], criterion=MaxProbability(0.0))
    batch = text_batch(6) | {"labels": torch.zeros(6, dtype=torch.long)}
    report = exit_report(bert, batch)
    assert report.counts == [6, 0] and report.speedup > 1


def test_bert_flops_add_up_to_the_host():
    host = tiny_bert(attn="eager")  # eager attention: FlopCounterMode sees its products
    model = add_exits(host, BERT_AFTER)
    batch = text_batch(4)
    segments, heads = model.exit_flops(**batch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        host(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1])
    assert sum(segments) + heads[-1] == counter.get_total_flops()
    assert len(set(segments)) == 1 and all(h > 0 for h in heads)  # identical layers


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("after,match", [
    (["layer9"], "'layer9' is not an exit point"),
    (["layer3"], "'layer3' is the last unit"),
    ([], "at least one"),
    (["layer2", "layer1"], "execution order"),
    (["layer1", "layer1.0"], "same point twice"),
    (["stem"], "not an exit point"),
])
def test_bad_exit_points(after, match):
    host, _ = cnn("resnet8")
    with pytest.raises(ValueError, match=match):
        add_exits(host, after)


def test_bad_exit_points_bert_and_mobilenet():
    with pytest.raises(ValueError, match=r"'encoder.layer.0' is not an exit point.*bert\.enc"):
        add_exits(tiny_bert(layers=2), ["encoder.layer.0"])
    with pytest.raises(ValueError, match="features.18' is the last unit"):
        add_exits(cnn("mobilenet_v2")[0], ["features.18"])
    with pytest.raises(TypeError, match="list of unit names"):
        add_exits(cnn("resnet8")[0], [1])


@pytest.mark.parametrize("make,match", [
    (lambda: MaxProbability(-0.1), "threshold must be a number >= 0.0, got -0.1"),
    (lambda: MaxProbability(float("nan")), "threshold"),
    (lambda: MaxProbability("0.9"), "threshold"),
    (lambda: Entropy(-1), "threshold must be a number >= 0.0, got -1"),
    (lambda: Patience(0), "patience must be an int >= 1, got 0"),
    (lambda: Patience(1.5), "patience"),
])
def test_bad_criteria(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_model_and_arguments():
    with pytest.raises(TypeError, match="early exits support"):
        add_exits(nn.Linear(3, 3), ["x"])
    host, after = cnn("resnet8")
    with pytest.raises(ValueError, match="num_classes=7 differs"):
        add_exits(host, after, num_classes=7)
    with pytest.raises(TypeError, match="head_factory must return an nn.Module"):
        add_exits(host, after, head_factory=lambda c, k: "head")
    with pytest.raises(TypeError, match="criterion must be callable"):
        add_exits(host, after, criterion=0.9)
    model = add_exits(host, after)
    with pytest.raises(ValueError, match="infer needs a criterion"):
        model.infer(images(2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="bool tensor of shape \\(2,\\), got a torch.float32"):
        model.infer(images(2), criterion=lambda z, m: z[:, 0])
    with pytest.raises(TypeError, match="bool tensor"):
        model.infer(images(2), criterion=lambda z, m: z.argmax(-1))
    with pytest.raises(ValueError, match="got shape \\(2, 10\\)"):
        model.infer(images(2), criterion=lambda z, m: z > 0)

    def leaky(z, memory):
        memory["bad"] = torch.zeros(1)
        return z[:, 0] > z[:, 1]
    with pytest.raises(ValueError, match="running batch"):
        model.infer(images(8), criterion=leaky)


def test_bad_loss_arguments():
    z = [random_logits(4, 3, seed=s) for s in range(2)]
    y = torch.zeros(4, dtype=torch.long)
    cases = [
        (dict(weights=[1.0]), "one number per exit \\(2\\)"),
        (dict(weights=[-1.0, 1.0]), "weights\\[0\\] must be a number >= 0.0"),
        (dict(weights=[0.0, 0.0]), "not all zero"),
        (dict(distill=1.5), "distill must be a number >= 0.0 and <= 1.0, got 1.5"),
        (dict(temperature=0.0), "temperature must be a number > 0.0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            exit_loss(z, y, **kwargs)
    with pytest.raises(ValueError, match="targets must be class indices of shape \\(4,\\)"):
        exit_loss(z, y[:3])
    with pytest.raises(ValueError, match="one shape"):
        exit_loss([z[0], z[1][:2]], y)
    with pytest.raises(TypeError, match="non-empty list"):
        exit_loss([], y)
    with pytest.raises(TypeError, match="EarlyExitModel"):
        exit_report(nn.Linear(2, 2), (torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))


def test_wrapper_shares_the_host_parameters_and_lists_its_exits():
    host, after = cnn("resnet8")
    model = add_exits(host, after)
    assert isinstance(model, EarlyExitModel) and model.backbone is host
    assert model.exit_points == ("layer1", "layer2") and model.num_exits == 3
    keys = set(model.state_dict())
    assert {f"backbone.{k}" for k in host.state_dict()} <= keys
    assert {"exits.0.fc.weight", "exits.1.fc.weight"} <= keys
    assert model.exits[0].fc.in_features == 8 and model.exits[1].fc.in_features == 16
