"""Fault tolerance: training killed with SIGKILL inside a training step or inside a checkpoint
write, then resumed, ends with the same weights and metrics as an uninterrupted run.

Bit-exactness needs CPU, the same seed and the same number of intra-op threads in every part
(here one: ``OMP_NUM_THREADS=1`` in the killed processes, ``torch.set_num_threads(1)`` in this
one). The kills come from the ``PADNET_FAULT`` hook (:func:`padnet.utils.io.fault_point`) at
named points, or, in the slow test, from outside after random delays.

    pytest tests/train/test_faults.py                # two kills (default run)
    pytest tests/train/test_faults.py -m slow        # random fault points and random delays
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from padnet.train import checkpoint as ckpt
from padnet.train import load_config, train
from padnet.utils.io import FAULT_ENV, load_safetensors
from tiny_data import write_tiny_npz

pytestmark = pytest.mark.usefixtures("one_thread")

#: interleaved IMP, AdamW, warm-up, clipping and a checkpoint after every step: 2 epochs of 4
CONFIG = """\
dataset: npz
model: resnet8
width: 4
batch_size: 16
val_fraction: 0.25
epochs: 2
lr: 0.01
method: dyconv
num_kernels: 2
dynamic_ratio: 0.5
imp_mode: interleaved
imp_iterations: 2
imp_num_batches: 1
optimizer: adamw
warmup_steps: 2
grad_clip: 1.0
save_every: 1
temperature_anneal_epochs: 1
device: cpu
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(config file, uninterrupted run directory)``: the reference run trained in-process."""
    directory = tmp_path_factory.mktemp("faults")
    write_tiny_npz(directory / "tiny.npz")
    config = directory / "config.yaml"
    config.write_text(CONFIG + f"data_root: {directory / 'tiny.npz'}\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(config, {"out_dir": str(directory / "reference")}), quiet=True)
    finally:
        torch.set_num_threads(threads)
    return config, directory / "reference"


def padnet_train(args, *, fault=None, env=None):
    """Start ``padnet train ARGS`` in a subprocess with one intra-op thread."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "padnet", "train", *map(str, args),
                             "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_args(config, run):
    """Resume the run when it has a checkpoint, else start it (again)."""
    if ckpt.find_checkpoint(run) is not None:
        return ["--resume", run]
    return ["-c", config, "--out-dir", run, "--overwrite"]


def assert_consistent(run):
    """After a kill: any complete checkpoint loads and passes its checks. Returns where the
    kill landed, as far as the files tell: ``'file write'`` (a temporary file left),
    ``'checkpoint write'`` (``checkpoint.new`` left) or ``'elsewhere'`` (a step, evaluation)."""
    if ckpt.find_checkpoint(run) is not None:
        ckpt.load_latest_checkpoint(run)
    if list(run.rglob(".*.tmp")):
        return "file write"
    return "checkpoint write" if (run / "checkpoint.new").exists() else "elsewhere"


def metrics(run):
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in rows]


def assert_same_run(run, reference):
    got, _ = load_safetensors(run / "model.safetensors")
    want, _ = load_safetensors(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert metrics(run) == metrics(reference)
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint", "config.yaml", "metrics.csv", "model.safetensors", "summary.json"]


def test_killed_in_a_step_and_in_a_checkpoint_write_resumes_to_the_same_run(setup, tmp_path):
    config, reference = setup
    run = tmp_path / "run"
    # killed between backward and the optimizer step of step 3 (checkpoint of step 2 on disk)
    done = padnet_train(start_args(config, run), fault="train_step@3")
    assert done.wait(timeout=300) == -signal.SIGKILL, done.stderr.read()
    assert ckpt.checkpoint_step(ckpt.find_checkpoint(run)) == 2
    # resumed, then killed between the renames of its third checkpoint (step 5)
    done = padnet_train(start_args(config, run), fault="checkpoint_swapped@3")
    assert done.wait(timeout=300) == -signal.SIGKILL, done.stderr.read()
    assert (run / "checkpoint.new").is_dir() and not (run / "checkpoint").exists()
    assert_consistent(run)
    # the rest in this process
    result = train(load_config(run / "config.yaml"), resume=run, quiet=True)
    assert not result.stopped
    assert_same_run(run, reference)


FAULT_POINTS = ("train_step", "atomic_write", "checkpoint_written", "checkpoint_swapped")


@pytest.mark.slow
def test_kills_at_random_fault_points_resume_to_the_same_run(setup, tmp_path):
    """Up to 8 kills, at each fault point in turn, on its 1st to 3rd pass (drawn at random,
    seeded), then the last part in a subprocess too."""
    config, reference = setup
    rng = random.Random(20240611)
    run, kills = tmp_path / "run", []
    while True:
        point = FAULT_POINTS[len(kills) % len(FAULT_POINTS)]
        fault = f"{point}@{rng.randint(1, 3)}" if len(kills) < 8 else None
        done = padnet_train(start_args(config, run), fault=fault)
        status = done.wait(timeout=300)
        if status == 0:
            break
        assert status == -signal.SIGKILL, done.stderr.read()
        kills.append(f"{fault} ({assert_consistent(run)})")
    print(f"{len(kills)} kills: {', '.join(kills)}")
    assert len(kills) >= 4
    assert_same_run(run, reference)


def wait_for_a_checkpoint_newer_than(run, step, process):
    """Until the process wrote a checkpoint past ``step`` (it is training) or ended."""
    while process.poll() is None:
        found = ckpt.find_checkpoint(run) if run.is_dir() else None
        if found is not None and (ckpt.checkpoint_step(found) or 0) > step:
            return
        time.sleep(0.005)


@pytest.mark.slow
def test_kills_after_random_delays_resume_to_the_same_run(setup, tmp_path):
    """SIGKILL from outside, a random 0-300 ms after the process was seen training (seeded),
    until the run ends; most kills land in checkpoint writes (every step writes one)."""
    config, reference = setup
    rng = random.Random(7)
    run, kills, rounds = tmp_path / "run", [], 0
    while rounds < 30:
        rounds += 1
        found = ckpt.find_checkpoint(run) if run.is_dir() else None
        step = ckpt.checkpoint_step(found) if found is not None else -1
        process = padnet_train(start_args(config, run))
        wait_for_a_checkpoint_newer_than(run, step, process)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        status = process.wait(timeout=300)
        if status == 0:
            break
        assert status == -signal.SIGKILL, process.stderr.read()
        kills.append(assert_consistent(run))
    print(f"{len(kills)} kills: " + ", ".join(f"{kills.count(w)} in {w}"
                                             for w in sorted(set(kills))))
    assert len(kills) >= 2 and (run / "model.safetensors").is_file()
    assert_same_run(run, reference)
