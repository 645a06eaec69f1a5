"""MoE upcycling of every common FFN shape (docs/method.md §2.3, §3): tiny Hugging Face models
of ten families built offline from configs, the structural rules, user-registered layouts and
the errors for what cannot be converted."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import padnet
from padnet.convert import FFN_LAYOUTS, register_ffn_layout
from padnet.convert.moe import dynamize_moe, find_ffn_blocks
from padnet.layers.auxiliary import aux_losses
from padnet.layers.moe import MoE
from padnet.ops import routing as rt

transformers = pytest.importorskip("transformers")

TEXT = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 32}
DECODER = {**TEXT, "num_key_value_heads": 1, "pad_token_id": 0}
K = 2  # experts per token


@dataclass
class Family:
    make: Callable[[], nn.Module]
    layout: str  # the layout that finds its FFNs
    moe_layers: int  # distinct MoE layers after conversion
    applications: int = 1  # forwards of each MoE per model forward (shared layers)
    gated: bool = False
    text: bool = True


def t(name: str) -> type:
    return getattr(transformers, name)


FAMILIES = {
    "bert": Family(lambda: t("BertForSequenceClassification")(t("BertConfig")(**TEXT)),
                   "bert", 2),
    "roberta": Family(lambda: t("RobertaForSequenceClassification")(
        t("RobertaConfig")(**TEXT, pad_token_id=1)), "bert", 2),
    "distilbert": Family(lambda: t("DistilBertForSequenceClassification")(t("DistilBertConfig")(
        vocab_size=50, dim=16, hidden_dim=32, n_layers=2, n_heads=2, max_position_embeddings=32)),
        "distilbert", 2),
    "albert": Family(lambda: t("AlbertForSequenceClassification")(t("AlbertConfig")(
        **{**TEXT, "num_hidden_layers": 3}, embedding_size=8)), "albert", 1, applications=3),
    "electra": Family(lambda: t("ElectraForSequenceClassification")(
        t("ElectraConfig")(**TEXT, embedding_size=8)), "bert", 2),
    "gpt2": Family(lambda: t("GPT2ForSequenceClassification")(t("GPT2Config")(
        vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, pad_token_id=0)),
        "gpt2", 2),
    "llama": Family(lambda: t("LlamaForSequenceClassification")(t("LlamaConfig")(**DECODER)),
                    "gated", 2, gated=True),
    "mistral": Family(lambda: t("MistralForSequenceClassification")(
        t("MistralConfig")(**DECODER)), "gated", 2, gated=True),
    "qwen2": Family(lambda: t("Qwen2ForSequenceClassification")(t("Qwen2Config")(**DECODER)),
                    "gated", 2, gated=True),
    "vit": Family(lambda: t("ViTForImageClassification")(t("ViTConfig")(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4, num_labels=2)), "fc1-fc2", 2, text=False),
}
NAMES = list(FAMILIES)
_DENSE: dict[str, nn.Module] = {}


def batch(family: Family) -> dict[str, torch.Tensor]:
    """Two samples with labels; text: 6 tokens, the second padded after 4 (10 real tokens);
    images: 8x8, 4 patches and the CLS token each (10 tokens)."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1])
    if not family.text:
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=gen), "labels": labels}
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    ids = torch.randint(2, 50, (2, 6), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def dense(name: str) -> nn.Module:
    """A fresh copy of the family's tiny dense model (built once, seeded, eval mode)."""
    if name not in _DENSE:
        torch.manual_seed(0)
        _DENSE[name] = FAMILIES[name].make().eval()
    return copy.deepcopy(_DENSE[name])


def converted(name: str, ratio: float = 0.5, **kwargs):
    """The family's model converted (4 experts, top-2), its batch, logits before and report."""
    model, inputs = dense(name), batch(FAMILIES[name])
    with torch.no_grad():
        ref = model(**inputs).logits
    report = dynamize_moe(model, num_experts=4, top_k=K, dynamic_ratio=ratio, **kwargs)
    return model, inputs, ref, report


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@pytest.fixture(autouse=True)
def _threads(one_thread):  # tiny tensors: one thread is faster on a busy machine
    yield


# ---- the families ----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1.0, 0.5], ids=["moe", "pad-moe"])
@pytest.mark.parametrize("name", NAMES)
def test_conversion_preserves_the_function(name: str, ratio: float) -> None:
    family = FAMILIES[name]
    model, inputs, ref, report = converted(name, ratio)
    assert len(report.converted) == family.moe_layers
    moes = moe_layers(model)
    assert len(moes) == family.moe_layers and all(m.gated == family.gated for m in moes)
    assert {b.kind for b in find_ffn_blocks(model)} == {"moe"}
    with torch.no_grad():
        got = model(**inputs).logits
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_each_family_is_found_by_its_layout(name: str) -> None:
    blocks = find_ffn_blocks(dense(name))
    assert [b.kind for b in blocks] == [FAMILIES[name].layout] * FAMILIES[name].moe_layers


@pytest.mark.parametrize("name", NAMES)
def test_converted_model_trains_every_parameter(name: str) -> None:
    model, inputs, _, _ = converted(name)
    model.train()
    loss = model(**inputs).loss + padnet.aux_loss(model)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    for moe in moe_layers(model):
        assert moe.router.weight.grad.abs().sum() > 0
        for w in moe.pad_weights():  # w1, w2 (and w3): routed experts and static weights
            assert w.dynamic.grad.abs().sum() > 0 and w.static.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_aux_loss_sees_every_moe_layer(name: str) -> None:
    family = FAMILIES[name]
    model, inputs, _, _ = converted(name, z_loss_coef=0.01)
    model.train()
    model(**inputs)
    losses = aux_losses(model)
    assert len(losses) == family.moe_layers
    assert all(isinstance(model.get_submodule(n), MoE) and v > 0 for n, v in losses.items())
    torch.testing.assert_close(padnet.aux_loss(model), sum(losses.values()))
    for moe in moe_layers(model):  # padding left out (the attention mask hint), each forward
        counts = moe.aux_terms["expert_counts"]  # of a shared layer counted
        assert int(counts.sum()) == family.applications * 10 * K


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_exported_family_saves_and_loads(name: str, tmp_path) -> None:
    model, inputs, ref, _ = converted(name)
    inputs.pop("labels")
    deployed = padnet.export(model)
    padnet.save(deployed, tmp_path / "model.safetensors")
    loaded = padnet.load(tmp_path / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ref)


def test_gated_families_become_mixtral_style_blocks() -> None:
    model, _, _, report = converted("llama")
    moe = model.model.layers[0].mlp
    assert report.names[0] == "model.layers.0.mlp" and report.converted[0].before == "LlamaMLP"
    assert isinstance(moe, MoE) and moe.gated and moe.b1 is None
    assert [w.name for w in moe.pad_weights()] == ["w1", "w2", "w3"]
    assert 0 < moe.mode_mask3.num_dynamic < moe.mode_mask3.numel


def test_fused_residual_layouts_keep_the_host_modules() -> None:
    bert, _, _, bert_report = converted("bert")
    gpt2, _, _, gpt2_report = converted("gpt2")
    assert bert_report.converted[0].before == "BertIntermediate+BertOutput.dense"
    out = bert.bert.encoder.layer[0].output
    assert isinstance(out.dense, nn.Identity) and isinstance(out.LayerNorm, nn.LayerNorm)
    mlp = gpt2.transformer.h[0].mlp
    assert gpt2_report.converted[0].before == "Conv1D+GPT2MLP.c_proj+GPT2MLP.act"
    assert isinstance(mlp.c_fc, MoE) and isinstance(mlp.dropout, nn.Dropout)
    assert isinstance(mlp.c_proj, nn.Identity) and isinstance(mlp.act, nn.Identity)


# ---- shared layers ---------------------------------------------------------------------------
def albert(groups: int, layers: int):
    torch.manual_seed(0)
    config = t("AlbertConfig")(**{**TEXT, "num_hidden_layers": layers}, embedding_size=8,
                               num_hidden_groups=groups)
    return t("AlbertModel")(config).eval()


def test_albert_shared_layer_loss_sums_its_applications() -> None:
    model = albert(groups=1, layers=3)
    dynamize_moe(model, num_experts=4, top_k=K, z_loss_coef=0.1)
    (moe,) = moe_layers(model)
    seen = []
    moe.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 16)))
    inputs = batch(FAMILIES["albert"])
    inputs.pop("labels")
    model(**inputs)
    valid = inputs["attention_mask"].reshape(-1).bool()
    assert len(seen) == 3
    lb = z = 0
    for x in seen:  # the loss of each application, from the router alone
        logits = rt.router_logits(x, moe.router.weight)
        lb = lb + rt.load_balancing_loss(logits, rt.top_k_gating(logits, K)[1], valid)
        z = z + rt.router_z_loss(logits, valid)
    torch.testing.assert_close(moe.aux_terms["load_balance"], lb.detach())
    torch.testing.assert_close(moe.aux_loss, 0.01 * lb + 0.1 * z)


def test_albert_groups_are_one_moe_each() -> None:
    model = albert(groups=2, layers=4)
    report = dynamize_moe(model, num_experts=2, top_k=1)
    assert report.names == [f"encoder.albert_layer_groups.{g}.albert_layers.0.ffn"
                            for g in (0, 1)]
    inputs = batch(FAMILIES["albert"])
    inputs.pop("labels")
    model(**inputs)
    assert [int(m.aux_terms["expert_counts"].sum()) for m in moe_layers(model)] == [20, 20]


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 20), nn.GELU(), nn.Linear(20, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TwiceUsed(nn.Module):
    """One Mlp registered under two names and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.first = Mlp()
        self.second = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x) + x)


def test_a_module_registered_twice_becomes_one_shared_moe() -> None:
    torch.manual_seed(0)
    model = TwiceUsed()
    x = torch.randn(5, 8)
    ref = model(x)
    (block,) = find_ffn_blocks(model)
    assert block.name == "first" and block.aliases == ("second",)
    report = dynamize_moe(model, num_experts=3)
    assert report.names == ["first"] and model.first is model.second
    torch.testing.assert_close(model(x), ref)
    assert int(model.first.aux_terms["expert_counts"].sum()) == 2 * 5 * 2


# ---- structural rules ------------------------------------------------------------------------
@pytest.mark.parametrize(("ff", "kind", "gate"), [("relu", "mlp", None),
                                                   ("gated-gelu", "gated-mlp", "wi_0")])
def test_t5_ffns_are_found_by_structure(ff: str, kind: str, gate: str | None) -> None:
    torch.manual_seed(0)
    model = t("T5EncoderModel")(t("T5Config")(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        feed_forward_proj=ff)).eval()
    blocks = find_ffn_blocks(model)
    assert [b.kind for b in blocks] == [kind] * 2
    assert blocks[0].name == "encoder.block.0.layer.1.DenseReluDense"
    assert (blocks[0].match.gate_proj and blocks[0].match.gate_proj.path) == gate
    ids = torch.randint(0, 50, (2, 5))
    ref = model(input_ids=ids).last_hidden_state
    dynamize_moe(model, num_experts=3, dynamic_ratio=0.5)
    got = model(input_ids=ids).last_hidden_state
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


class Anonymous(nn.Module):
    """A gated MLP whose names say nothing: ``c(tanh(b(x)) * a(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.f = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.f(self.b(x)) * self.a(x))


def test_the_gate_of_an_unnamed_gated_mlp_is_found_by_its_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Anonymous(), nn.Linear(8, 2))
    (block,) = find_ffn_blocks(model)
    assert block.kind == "gated-mlp" and block.gate is model[0].b and block.fc1 is model[0].a
    x = torch.randn(6, 8)
    ref = model(x)
    dynamize_moe(model, num_experts=3, top_k=2, dynamic_ratio=0.5)
    assert model[0].gated
    torch.testing.assert_close(model(x), ref)


# ---- user layouts ----------------------------------------------------------------------------
@pytest.fixture
def layouts():
    """Register layouts for one test; they are removed afterwards."""
    added = []

    def add(name: str, **fields):
        added.append(name)
        return register_ffn_layout(name, **fields)

    yield add
    for name in added:
        FFN_LAYOUTS.unregister(name)


class Block(nn.Module):
    """A pre-norm residual block with its FFN inline: ``x + drop(down(nonlin(up(norm(x)))))``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.nonlin = nn.LayerNorm(8), nn.Linear(8, 20), nn.SiLU()
        self.down, self.drop = nn.Linear(20, 8), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(self.nonlin(self.up(self.norm(x)))))


def blocks_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(8, 3)).eval()


def test_a_user_layout_converts_a_custom_block(layouts) -> None:
    model = blocks_model()
    with pytest.raises(ValueError, match=r"'0' \(Block\): it is not a plain FFN.*"
                                         r"register_ffn_layout"):
        dynamize_moe(copy.deepcopy(model), num_experts=3)
    layouts("residual-block", in_proj="up", out_proj="down", activation="nonlin", moe_at="up",
            residual="")
    x = torch.randn(4, 5, 8)
    ref = model(x)
    report = dynamize_moe(model, num_experts=3, top_k=2, dynamic_ratio=0.5)
    assert report.names == ["0.up", "1.up"]
    assert report.converted[0].before == "Linear+Block.down+Block.nonlin"
    block = model[0]
    assert isinstance(block.up, MoE) and isinstance(block.drop, nn.Dropout)
    assert isinstance(block.down, nn.Identity) and isinstance(block.nonlin, nn.Identity)
    assert isinstance(block.up.act, nn.SiLU)
    torch.testing.assert_close(model(x), ref)
    assert len(aux_losses(model)) == 2
    assert [b.kind for b in find_ffn_blocks(model)] == ["moe", "moe"]  # found as converted


class RowMajor(nn.Module):
    """A projection stored ``(in, out)``: ``x @ weight + bias``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class RowMajorMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out, self.g = RowMajor(8, 16), RowMajor(16, 8), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.g(self.inp(x)))


def test_a_user_layout_with_transposed_weights(layouts) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(RowMajorMlp(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="found no FFN block.*register_ffn_layout"):
        dynamize_moe(model)
    layouts("row-major", in_proj="inp", out_proj="out", activation="g", transposed=True)
    x = torch.randn(7, 8)
    ref = model(x)
    dynamize_moe(model, num_experts=3, top_k=1, dynamic_ratio=0.5)
    torch.testing.assert_close(model[0].w1_static, model_weight_t := model[0].w1[0])
    assert model_weight_t.shape == (16, 8)  # stored (out, in) in the MoE
    torch.testing.assert_close(model(x), ref)


def test_user_layouts_come_before_the_built_in_ones(layouts) -> None:
    layouts("whole-gpt2-mlp", in_proj="c_fc", out_proj="c_proj", activation="act",
            transposed=True)
    model, inputs, ref, report = converted("gpt2")
    assert report.names == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert report.converted[0].before == "GPT2MLP"
    with torch.no_grad():
        assert (model(**inputs).logits - ref).abs().max().item() < 1e-5


class Skip(nn.Module):
    """``down(act(up(x))) + side(up(x))``: ``up`` feeds two paths."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(8, 20), nn.GELU(), nn.Linear(20, 8)
        self.side = nn.Linear(20, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.down(self.act(h)) + self.side(h)


def test_a_layout_that_does_not_describe_the_module_is_refused_and_undone(layouts) -> None:
    layouts("wrong", in_proj="up", out_proj="down", activation="act", moe_at="up")
    torch.manual_seed(0)
    model = nn.Sequential(Skip(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"layout 'wrong' does not describe '0.up' \(Skip\)"):
        dynamize_moe(model, num_experts=3)
    skip = model[0]  # nothing changed
    assert [type(m) for m in (skip.up, skip.act, skip.down)] == [nn.Linear, nn.GELU, nn.Linear]


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"in_proj": "a", "out_proj": "b", "gate_proj": "g", "moe_at": "a"}, ValueError,
         r"gated layout.*needs moe_at=''.*got moe_at='a'"),
        ({"in_proj": "a.x", "out_proj": "b", "moe_at": "b"}, ValueError,
         r"moe_at='b' must be in_proj \('a.x'\), a module holding it, or ''"),
        ({"in_proj": "a", "out_proj": "out.dense", "moe_at": "", "residual": "out"}, ValueError,
         r"moe_at='' would replace the residual module 'out'"),
        ({"in_proj": "a..b", "out_proj": "b"}, ValueError,
         r"in_proj must be a dotted attribute path, got 'a..b'"),
        ({"in_proj": "a", "out_proj": 3}, ValueError, "out_proj must be .* got 3"),
        ({"in_proj": "a", "out_proj": "a"}, ValueError, "must differ"),
        ({"in_proj": "a", "out_proj": "b", "transposed": "yes"}, TypeError,
         "transposed must be a bool, got 'yes'"),
    ],
    ids=["gated-moe-at", "moe-at-elsewhere", "residual-swallowed", "bad-path", "not-a-path",
         "same-part", "transposed"],
)
def test_bad_layouts_are_refused(fields, error, match) -> None:
    with pytest.raises(error, match=match):
        register_ffn_layout("bad", **fields)
    assert "bad" not in FFN_LAYOUTS


def test_a_layout_name_is_registered_once(layouts) -> None:
    with pytest.raises(ValueError, match="'bert' is already registered"):
        register_ffn_layout("bert", in_proj="a", out_proj="b")
    layouts("mine", in_proj="a", out_proj="b")
    layout = register_ffn_layout("mine", in_proj="p", out_proj="q", replace=True)
    assert FFN_LAYOUTS.get("mine") is layout and layout.in_proj == "p"


# ---- errors ----------------------------------------------------------------------------------
class AttentionOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0])


def test_a_model_without_ffn_gives_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"found no FFN block to convert in AttentionOnly "
                                         r"\(recognised: a layout of padnet.convert.FFN_LAYOUTS "
                                         r"\(bert, distilbert, albert, gpt2, gated, fc1-fc2\)"):
        dynamize_moe(AttentionOnly())


def test_naming_a_module_that_is_no_ffn_lists_what_is_recognised() -> None:
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.attention' of type "
                                         r"BertAttention.*not an FFN block.*gate/up/down"):
        dynamize_moe(dense("bert"), include="bert.encoder.layer.0.attention")


def test_gated_is_not_a_conversion_argument() -> None:
    with pytest.raises(ValueError, match="gated=True: whether experts are gated follows"):
        padnet.dynamize(dense("llama"), "moe", gated=True)


class NormedMlp(Mlp):
    """fc1/fc2 around an activation, and a LayerNorm between: not an FFN of its parts."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


@pytest.mark.parametrize("init", ["copy", "kaiming"])
def test_the_structure_is_checked_whatever_the_init(init: str) -> None:
    model = nn.Sequential(NormedMlp(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"'0' \(NormedMlp\): it is not a plain FFN.*its "
                                         r"forward is not the FFN of its parts"):
        dynamize_moe(model, init=init)
    assert isinstance(model[0], NormedMlp)


class ViTIntermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.intermediate_act_fn = nn.Linear(8, 20), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class ViTOutput(nn.Module):
    """The residual fused with the out projection, no LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.dropout = nn.Linear(20, 8), nn.Dropout(0.1)

    def forward(self, h: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(h)) + input_tensor


class ViTLayer(nn.Module):
    """The MLP half of a transformers-4 ViT layer: ``output(intermediate(ln(x)), x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layernorm_after = nn.LayerNorm(8)
        self.intermediate, self.output = ViTIntermediate(), ViTOutput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(self.layernorm_after(x)), x)


def test_transformers_4_vit_layers_take_the_bert_layout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ViTLayer(), ViTLayer()).eval()
    assert [b.kind for b in find_ffn_blocks(model)] == ["bert", "bert"]
    x = torch.randn(2, 5, 8)
    ref = model(x)
    report = dynamize_moe(model, num_experts=3, dynamic_ratio=0.5)
    assert report.names == ["0.intermediate", "1.intermediate"]
    assert isinstance(model[0].output.dense, nn.Identity)
    torch.testing.assert_close(model(x), ref)


def test_an_activation_override_changes_the_function_so_copy_refuses_it() -> None:
    with pytest.raises(ValueError, match="upcycled MoE differs.*activation= differs from its"):
        dynamize_moe(dense("gpt2"), num_experts=2, activation="relu")
    model = dense("gpt2")
    dynamize_moe(model, num_experts=2, activation="relu", init="kaiming")
    assert model.transformer.h[0].mlp.c_fc.activation_name == "relu"


class InlineRelu(nn.Module):
    """fc1/fc2 with the activation written in the forward, not held by the module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 20), nn.Linear(20, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_an_activation_the_module_does_not_hold_is_passed_in() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(InlineRelu(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"cannot convert '0': no activation found.*pass "
                                         r"activation=\.\.\."):
        dynamize_moe(model)
    x = torch.randn(4, 8)
    ref = model(x)
    dynamize_moe(model, num_experts=3, activation="relu")
    torch.testing.assert_close(model(x), ref)
    with pytest.raises(ValueError, match="not a plain FFN.*not the FFN of its parts"):
        dynamize_moe(nn.Sequential(InlineRelu(), nn.Linear(8, 2)), activation="tanh")


def test_a_model_on_the_meta_device_converts_without_checks() -> None:
    with torch.device("meta"):
        model = nn.Sequential(Anonymous(), Mlp(), nn.Linear(8, 2))
        report = dynamize_moe(model, num_experts=3, dynamic_ratio=0.5)
    assert report.names == ["0", "1"] and model[0].gated and not model[1].gated
    assert model[0].w3.shape == (3, 12, 8) and model[0].w3.device.type == "meta"
