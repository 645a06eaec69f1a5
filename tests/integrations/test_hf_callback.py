"""PadCallback and PadTrainer inside the real transformers Trainer: interleaved IMP reaches the
target ratio exactly, the temperature follows its schedule step by step, the ratio and
temperature reach the Trainer's logs, the auxiliary MoE loss joins the training loss only, and
a saved checkpoint loads back with padnet.from_pretrained."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tiny_pad_models import (  # noqa: E402
    ImageData,
    TokenData,
    tiny_hf_resnet,
    tiny_moe_bert,
    total_positions,
)

import padnet  # noqa: E402
from padnet.integrations.hf import SCHEDULE_FILE, PadCallback, PadTrainer  # noqa: E402
from padnet.layers.routing import ConvRouter  # noqa: E402
from padnet.partition import layer_ratio_report  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def training_args(tmp_path, steps: int, **kwargs):
    from transformers import TrainingArguments

    opts = {"output_dir": str(tmp_path / "out"), "max_steps": steps,
            "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
            "save_strategy": "no", "report_to": [], "use_cpu": True, "disable_tqdm": True,
            "seed": 0, "dataloader_num_workers": 0, **kwargs}
    return TrainingArguments(**opts)


def test_moe_bert_reaches_the_ratio_logs_it_and_saves_a_loadable_checkpoint(tmp_path):
    model = tiny_moe_bert()
    n = total_positions(model)
    callback = PadCallback(dynamic_ratio=0.3, iterations=2, end_step=4, num_batches=1)
    args = training_args(tmp_path, 6, save_strategy="steps", save_steps=6)
    trainer = PadTrainer(model=model, args=args, train_dataset=TokenData(32),
                         callbacks=[callback], aux_weight=2.0)
    trainer.train()
    report = layer_ratio_report(model)
    assert sum(report.num_dynamic) == round(0.3 * n)  # exactly kappa * N positions dynamic
    assert callback.schedule.imp_done and callback.schedule.imp_iteration == 2
    kappas = callback.schedule.result.kappas
    assert kappas == pytest.approx([0.3 ** 0.5, 0.3])  # exponential schedule, T = 2
    steps = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5, 6]
    ratios = [row["padnet/dynamic_ratio"] for row in steps]
    assert ratios[:1] == [1.0]  # iteration 1 is due after step 2, iteration 2 after step 4
    assert ratios[1] == pytest.approx(round(0.3 ** 0.5 * n) / n)
    assert ratios[3:] == [report.total_ratio] * 3
    assert [row["padnet/imp_iteration"] for row in steps] == [0, 1, 1, 2, 2, 2]
    assert "padnet/temperature" not in steps[0]  # MoE routers take none
    # the checkpoint carries the conversion record and comes back with one call
    reloaded = padnet.from_pretrained(tmp_path / "out" / "checkpoint-6")
    batch = {k: torch.stack([TokenData(4)[i][k] for i in range(4)]) for k in ("input_ids",
                                                                            "attention_mask")}
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model.eval()(**batch).logits)
    assert layer_ratio_report(reloaded).num_dynamic == report.num_dynamic


def test_pad_trainer_adds_the_weighted_aux_loss_in_training_only(tmp_path):
    model = tiny_moe_bert(load_balance_coef=0.5)
    trainer = PadTrainer(model=model, args=training_args(tmp_path, 1), aux_weight=3.0,
                         train_dataset=TokenData(8))
    data = TokenData(8)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in data[0]}
    model.train()
    got = trainer.compute_loss(model, dict(batch))
    task = model(**batch).loss
    aux = padnet.aux_loss(model)
    assert float(aux.detach()) > 0
    torch.testing.assert_close(got, task + 3.0 * aux)
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch).loss)
    # a loss the Trainer will not divide by the accumulation steps gets aux / steps
    model.train()
    trainer.model_accepts_loss_kwargs = True
    trainer.current_gradient_accumulation_steps = 4
    got = trainer.compute_loss(model, dict(batch), num_items_in_batch=8)
    torch.testing.assert_close(got, model(**batch).loss + 3.0 * padnet.aux_loss(model) / 4)
    with pytest.raises(ValueError, match="aux_weight"):
        PadTrainer(model=model, args=training_args(tmp_path, 1), aux_weight=-1.0)


def test_plain_trainer_anneals_the_temperature_step_by_step(tmp_path):
    from transformers import Trainer

    model = tiny_hf_resnet()
    n = total_positions(model)
    seen: list[float] = []
    first_router = next(m for m in model.modules() if isinstance(m, ConvRouter))
    first_router.register_forward_pre_hook(
        lambda m, args: seen.append(float(m.temperature)) if m.training else None)
    callback = PadCallback(dynamic_ratio=0.5, temperature=(30.0, 1.0, 3), iterations=1,
                           end_step=2, num_batches=1)
    trainer = Trainer(model=model, args=training_args(tmp_path, 5), callbacks=[callback],
                      train_dataset=ImageData(48))
    trainer.train()
    temps = [30.0, 30.0 - 29.0 / 3, 30.0 - 2 * 29.0 / 3, 1.0, 1.0]  # of steps 0..4
    # the forwards of steps 0 and 1, IMP's scoring pass after step 2 (at step 1's
    # temperature, as padnet train scores), then steps 2, 3 and 4
    assert seen == pytest.approx(temps[:2] + temps[1:2] + temps[2:])
    routers = [m for m in model.modules() if isinstance(m, ConvRouter)]
    assert {float(r.temperature) for r in routers} == {1.0}  # annealed to the end value
    assert sum(layer_ratio_report(model).num_dynamic) == round(0.5 * n)
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["padnet/temperature"] for row in rows] == pytest.approx(temps[1:] + [1.0])
    assert rows[-1]["padnet/dynamic_ratio"] == pytest.approx(round(0.5 * n) / n)


def test_a_resumed_run_continues_imp_where_its_checkpoint_left_it(tmp_path):
    calls: list[int] = []

    def counted(model, batch):
        calls.append(1)
        return model(**batch).loss

    opts = {"dynamic_ratio": 0.4, "iterations": 2, "end_step": 4, "num_batches": 1,
            "loss_fn": counted}
    args = training_args(tmp_path, 3, save_strategy="steps", save_steps=2)
    first = PadCallback(**opts)
    PadTrainer(model=tiny_moe_bert(), args=args, train_dataset=TokenData(32),
               callbacks=[first]).train()
    assert len(calls) == 1 and (tmp_path / "out" / "checkpoint-2" / SCHEDULE_FILE).is_file()
    calls.clear()
    second = PadCallback(**opts)
    model = tiny_moe_bert(seed=1)
    trainer = PadTrainer(model=model, args=training_args(tmp_path, 6), callbacks=[second],
                         train_dataset=TokenData(32))
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert len(calls) == 1  # iteration 2 only: iteration 1 came with the checkpoint
    assert second.schedule.partition.result.kappas == pytest.approx([0.4 ** 0.5, 0.4])
    assert sum(layer_ratio_report(model).num_dynamic) == round(0.4 * total_positions(model))


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="unknown IMP option.*'iteration'"):
        PadCallback(dynamic_ratio=0.3, iteration=2)
    with pytest.raises(ValueError, match="temperature"):
        PadCallback(temperature=(30.0, 1.0))
    with pytest.raises(ValueError, match="without dynamic_ratio"):
        PadCallback(iterations=3)
