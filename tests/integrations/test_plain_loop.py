"""PadSchedule in a plain PyTorch loop (the recipe of docs/integrations.md): the same masks,
weights and temperatures as IterativePartition and set_temperature driven by hand the way
padnet's own loop drives them; one-shot IMP equals partition_model; a resumed schedule continues
exactly; degenerate ratios and schedules; bad input named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_pad_models import image_tensors, tiny_cnn, total_positions

import padnet
from padnet.integrations.core import DEFAULT_WARMUP_FRACTION, PadSchedule, scoring_loader_like
from padnet.layers.routing import ConvRouter
from padnet.partition import IterativePartition, layer_ratio_report, partition_model

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6


def batches(n: int = STEPS, size: int = 8, seed: int = 0) -> list[tuple]:
    x, y = image_tensors(n * size, seed)
    return list(zip(x.split(size), y.split(size), strict=True))


def temperatures(model) -> set[float]:
    return {float(m.temperature) for m in model.modules() if isinstance(m, ConvRouter)}


def recipe(model, pad: PadSchedule, train, scoring, start: int = 0, stop: int = STEPS,
           opt=None):
    """The documented loop; returns the optimizer."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    if start == 0:
        pad.on_step(0, model, scoring)
    for step in range(start + 1, stop + 1):
        x, y = train[step - 1]
        loss = F.cross_entropy(model(x), y) + pad.aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pad.on_step(step, model, scoring)
    return opt


def test_the_recipe_equals_padnets_partition_and_temperature_driven_by_hand():
    train, scoring = batches(), batches(seed=1)
    model = tiny_cnn()
    pad = PadSchedule(0.3, temperature=(30.0, 1.0, 4), iterations=3, end_step=3, num_batches=1)
    recipe(model, pad, train, scoring)

    ref = tiny_cnn()  # padnet's loop: temperature of step s before it, IMP step after it
    imp = IterativePartition(ref, scoring, dynamic_ratio=0.3, iterations=3, end_step=3,
                             num_batches=1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(STEPS):
        padnet.set_temperature(ref, padnet.temperature_schedule(step, start=30.0, end=1.0,
                                                                 anneal_epochs=4))
        x, y = train[step]
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        imp.step()
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    n = total_positions(model)
    assert sum(layer_ratio_report(model).num_dynamic) == round(0.3 * n)
    assert pad.imp_done and pad.imp_iteration == 3
    assert temperatures(model) == {1.0} and pad.current_temperature == 1.0
    assert pad.logs(model) == {"dynamic_ratio": round(0.3 * n) / n, "temperature": 1.0,
                               "imp_iteration": 3.0}


def test_oneshot_runs_every_iteration_before_the_first_step_like_partition_model():
    scoring = batches(seed=1)
    model, ref = tiny_cnn(), tiny_cnn()
    pad = PadSchedule(0.25, imp_mode="oneshot", iterations=2, num_batches=2, score="taylor")
    result = pad.on_step(0, model, scoring)
    expected = partition_model(ref, scoring, dynamic_ratio=0.25, iterations=2, num_batches=2)
    assert result.kappas == expected.kappas and pad.imp_done and pad.imp_iteration == 2
    for (_, a), (_, b) in zip(padnet.layers.mode_masks(model), padnet.layers.mode_masks(ref),
                              strict=True):
        assert torch.equal(a.mask, b.mask)
    assert pad.on_step(1, model) is None  # done: no batches needed any more


def test_a_resumed_schedule_continues_exactly(tmp_path):
    train, scoring = batches(), batches(seed=1)
    opts = {"temperature": (10.0, 2.0, 5), "iterations": 2, "end_step": 4, "num_batches": 1}
    full = tiny_cnn()
    recipe(full, PadSchedule(0.5, **opts), train, scoring)

    part = tiny_cnn()
    pad = PadSchedule(0.5, **opts)
    opt = recipe(part, pad, train, scoring, stop=3)
    saved = {"model": part.state_dict(), "opt": opt.state_dict(), "pad": pad.state_dict()}
    torch.save(saved, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain data and tensors only

    resumed = tiny_cnn(seed=7)
    resumed.load_state_dict(saved["model"])
    opt = torch.optim.SGD(resumed.parameters(), lr=0.05)
    opt.load_state_dict(saved["opt"])
    pad = PadSchedule(0.5, **opts)
    pad.load_state_dict(saved["pad"], resumed, scoring)
    assert pad.imp_iteration == 1 and pad.last_step == 3
    recipe(resumed, pad, train, scoring, start=3, opt=opt)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_degenerate_ratios(ratio):
    model = tiny_cnn()
    pad = PadSchedule(ratio, iterations=2, end_step=2, num_batches=1)
    recipe(model, pad, batches(), batches(seed=1))
    report = layer_ratio_report(model)
    assert report.total_ratio == ratio and pad.imp_done


def test_without_imp_or_annealing_the_schedule_changes_nothing_but_reports():
    model = tiny_cnn(temperature=3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pad = PadSchedule()
    assert pad.on_step(0, model) is None and pad.imp_done
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert pad.logs(model) == {"dynamic_ratio": 1.0}
    no_anneal = PadSchedule(temperature=(30.0, 2.0, 0))
    no_anneal.on_step(0, model)
    assert temperatures(model) == {2.0}  # anneal_steps 0: the end value at once


def test_end_step_follows_the_warmup_fraction_of_padnet_train():
    from padnet.train.config import ImpConfig

    assert DEFAULT_WARMUP_FRACTION == ImpConfig().warmup_fraction
    pad = PadSchedule(0.5, warmup_fraction=0.5)
    assert pad.resolve_end_step(10) == 5 and pad.resolve_end_step(1) == 1
    model = tiny_cnn()
    pad.on_step(0, model, batches(), total_steps=8)
    assert pad.partition.schedule_steps == [1, 2, 2, 3, 4]  # T = 5 over the first 4 steps


def test_aux_loss_is_weighted_and_zero_while_scoring():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    model = torch.nn.Sequential(torch.nn.Identity(), net)
    padnet.dynamize(model, "moe", num_experts=2, top_k=1, load_balance_coef=1.0)
    x = torch.randn(16, 4)
    model(x)
    pad = PadSchedule(aux_weight=0.5)
    torch.testing.assert_close(pad.aux_loss(model), 0.5 * padnet.aux_loss(model))
    seen = []

    def loss_fn(m, batch):
        out = m(batch[0]).pow(2).mean()
        seen.append(float(scoring.aux_loss(m).detach()))
        return out

    scoring = PadSchedule(0.5, imp_mode="oneshot", loss_fn=loss_fn, aux_weight=0.5)
    scoring.on_step(0, model, [(x, x)])
    assert seen == [0.0]
    assert float(scoring.aux_loss(model).detach()) > 0  # back after scoring


def test_scoring_loader_keeps_data_and_collate_with_an_order_of_its_own():
    from torch.utils.data import DataLoader, TensorDataset

    from padnet.train.imp import IMP_SEED_OFFSET

    data = TensorDataset(torch.arange(10.0))

    def collate(items):
        return torch.stack([i[0] for i in items]) * 2

    train = DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate)
    first = [b.tolist() for b in scoring_loader_like(train, seed=3)]
    torch.manual_seed(123)  # the global RNG and the training loader do not matter
    next(iter(train))
    again = [b.tolist() for b in scoring_loader_like(train, seed=3)]
    assert first == again and len(first) == 2  # the incomplete batch is dropped
    gen = torch.Generator().manual_seed(3 + IMP_SEED_OFFSET)
    order = torch.randperm(10, generator=gen).tolist()
    assert first == [[2.0 * i for i in order[:4]], [2.0 * i for i in order[4:8]]]
    assert scoring_loader_like([1, 2]) == [1, 2]  # not a DataLoader: as it is


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="dynamic_ratio"):
        PadSchedule(1.5)
    with pytest.raises(ValueError, match="temperature end"):
        PadSchedule(temperature=(30.0, 0.0, 10))
    with pytest.raises(ValueError, match="imp_mode"):
        PadSchedule(0.3, imp_mode="sometimes")
    with pytest.raises(ValueError, match="score"):
        PadSchedule(0.3, score="guess")
    with pytest.raises(ValueError, match="end_step must be >= start_step=5"):
        PadSchedule(0.3, start_step=5, end_step=2)
    with pytest.raises(ValueError, match="aux_weight"):
        PadSchedule(aux_weight=-1)
    model = tiny_cnn()
    with pytest.raises(ValueError, match="pass batches="):
        PadSchedule(0.3, end_step=2).on_step(0, model)
    with pytest.raises(ValueError, match="end_step= .* or total_steps="):
        PadSchedule(0.3).on_step(0, model, batches())
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        PadSchedule().on_step(-1, model)
    moe = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)))
    padnet.dynamize(moe, "moe", num_experts=2)
    with pytest.raises(ValueError, match="no router with a temperature"):
        PadSchedule(temperature=(30.0, 1.0, 5)).on_step(0, moe)
