"""PadCallback inside a real Lightning Trainer: interleaved IMP reaches the target ratio
exactly, the temperature is annealed to its end value, the ratio and temperature are logged every
step, the auxiliary loss of the documented one-liner trains the router but stays out of IMP's
scores, and bad set-ups fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from tiny_pad_models import image_tensors, tiny_cnn, total_positions  # noqa: E402

import padnet  # noqa: E402
from padnet.integrations.lightning import PadCallback, training_step_loss  # noqa: E402
from padnet.layers.routing import ConvRouter  # noqa: E402
from padnet.partition import layer_ratio_report  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Module(pl.LightningModule):
    """A classifier around ``net``; ``training_step`` adds the callback's aux loss when given."""

    def __init__(self, net, pad=None, *, manual: bool = False) -> None:
        super().__init__()
        self.net, self.pad = net, pad
        self.automatic_optimization = not manual
        self.returned: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("task_loss", loss)
        if self.pad is not None:
            loss = loss + self.pad.aux_loss(self)
        self.returned.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class MemoryLogger(pl.loggers.Logger):
    """Keeps every logged metric with its step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def loader(n: int = 48, batch_size: int = 8):
    x, y = image_tensors(n)
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def fit(module, callback, steps: int, logger=False):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[callback], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(module, loader())
    return trainer


def test_dyconv_cnn_reaches_the_ratio_anneals_and_logs_every_step():
    net = tiny_cnn()
    n = total_positions(net)
    callback = PadCallback(dynamic_ratio=0.4, temperature=(30.0, 1.0, 3), iterations=2,
                           end_step=4, num_batches=1)
    logger = MemoryLogger()
    fit(Module(net), callback, 6, logger=logger)
    assert sum(layer_ratio_report(net).num_dynamic) == round(0.4 * n)
    assert callback.schedule.imp_done and callback.schedule.imp_iteration == 2
    assert {float(m.temperature) for m in net.modules() if isinstance(m, ConvRouter)} == {1.0}
    rows = [m for _, m in logger.rows if "padnet/dynamic_ratio" in m]
    assert len(rows) == 6  # one row per optimizer step
    kappa1 = round(0.4 ** 0.5 * n) / n
    ratios = [r["padnet/dynamic_ratio"] for r in rows]
    assert ratios == pytest.approx([1.0, kappa1, kappa1, 0.4, 0.4, 0.4], abs=0.5 / n)
    temps = [r["padnet/temperature"] for r in rows]
    assert temps == pytest.approx([30 - 29 / 3, 30 - 58 / 3, 1.0, 1.0, 1.0, 1.0])
    assert [r["padnet/imp_iteration"] for r in rows] == [0, 1, 1, 2, 2, 2]


def test_the_aux_one_liner_trains_but_stays_out_of_the_scores():
    def moe_net(seed: int):
        torch.manual_seed(seed)
        def ffn():
            return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(),
                                       torch.nn.Linear(24, 16))

        # two MoE layers: the second one's aux loss depends on the first one's masks
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), ffn(), ffn(),
                                  torch.nn.Linear(16, 3))
        return padnet.dynamize(net, "moe", num_experts=2, top_k=1, init="copy_noise",
                               copy_noise_std=0.1, load_balance_coef=1.0)

    opts = {"dynamic_ratio": 0.5, "iterations": 1, "end_step": 2, "num_batches": 2}
    a = PadCallback(**opts, aux_weight=5.0)
    module_a = Module(moe_net(0), a)
    fit(module_a, a, 3)

    def task_loss(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1])

    b = PadCallback(**opts, aux_weight=5.0, loss_fn=task_loss)
    module_b = Module(moe_net(0), b)
    fit(module_b, b, 3)
    def with_aux(module, batch):
        return task_loss(module, batch) + 5.0 * padnet.aux_loss(module)

    c = PadCallback(**opts, aux_weight=5.0, loss_fn=with_aux)
    module_c = Module(moe_net(0), c)
    fit(module_c, c, 3)
    masks = [[m.mask for _, m in padnet.layers.mode_masks(x)] for x in (module_a, module_b,
                                                                         module_c)]
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1], strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(masks[0], masks[2], strict=True))
    assert sum(layer_ratio_report(module_a).num_dynamic) == round(0.5 * total_positions(
        module_a))
    # in training the returned loss holds aux_weight * the layers' aux loss (> 0)
    x, y = next(iter(loader()))
    module_a.train()
    with torch.no_grad():
        got = training_step_loss(module_a, (x, y))
        aux = padnet.aux_loss(module_a)  # of that forward
        task = F.cross_entropy(module_a(x), y)
    assert float(aux) > 0
    torch.testing.assert_close(got, task + 5.0 * aux)


def test_training_step_loss_mutes_logging_and_explains_other_returns():
    module = Module(tiny_cnn())
    x, y = image_tensors(4)
    loss = training_step_loss(module, (x, y))  # self.log outside a Trainer would raise
    torch.testing.assert_close(loss, F.cross_entropy(module(x), y))
    assert "log" not in vars(module)  # the methods are back
    module.training_step = lambda batch, i: None
    with pytest.raises(TypeError, match="not a loss tensor"):
        training_step_loss(module, (x, y))


def test_manual_optimization_needs_a_loss_fn():
    callback = PadCallback(dynamic_ratio=0.5, iterations=1, end_step=1)
    with pytest.raises(ValueError, match="manual optimization.*loss_fn"):
        fit(Module(tiny_cnn(), manual=True), callback, 1)


def test_a_resumed_fit_continues_imp_where_the_checkpoint_left_it(tmp_path):
    calls: list[int] = []

    def counted(module, batch):
        calls.append(1)
        return F.cross_entropy(module(batch[0]), batch[1])

    opts = {"dynamic_ratio": 0.4, "iterations": 2, "end_step": 4, "num_batches": 1,
            "loss_fn": counted}
    first = PadCallback(**opts)
    trainer = fit(Module(tiny_cnn()), first, 2)
    assert first.schedule.imp_iteration == 1 and len(calls) == 1
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    calls.clear()
    second = PadCallback(**opts)
    net = tiny_cnn(seed=1)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False,
                         callbacks=[second], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(net), loader(), ckpt_path=tmp_path / "two.ckpt")
    assert len(calls) == 1  # iteration 2 only: iteration 1 came with the checkpoint
    assert second.schedule.imp_iteration == 2
    assert second.schedule.partition.result.kappas == pytest.approx([0.4 ** 0.5, 0.4])
    assert sum(layer_ratio_report(net).num_dynamic) == round(0.4 * total_positions(net))
