"""Data parallelism on CPU: the sampler, and a two-process gloo run (identical weights and
masks on both ranks, files written by rank 0 only)."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from padnet.train.distributed import EpochSampler, init_distributed
from tiny_data import write_tiny_npz


def test_epoch_sampler_shards_reproduces_and_fast_forwards():
    shards = [list(EpochSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to 12 by wrapping around
    assert set().union(*shards) == set(range(10))
    one = EpochSampler(10, seed=3)
    one.set_epoch(1)
    order = list(one)
    assert order == list(EpochSampler(10, seed=4)) and order != list(EpochSampler(10, seed=3))
    one.set_epoch(1, skip=4)
    assert list(one) == order[4:] and len(one) == 6


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info.world_size == 1 and info.is_main and not info.started_here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cfg_dict: dict, log_dir: str) -> None:
    """One rank: record every file it renames into place, train, save its weights for the test."""
    from safetensors.torch import save_file

    from padnet.train import TrainConfig, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    written: list[str] = []
    replace, rename = os.replace, os.rename
    os.replace = lambda src, dst: (written.append(str(dst)), replace(src, dst))[1]
    os.rename = lambda src, dst: (written.append(str(dst)), rename(src, dst))[1]
    try:
        result = train(TrainConfig.from_dict(cfg_dict), quiet=True)
    finally:
        os.replace, os.rename = replace, rename
    with open(os.path.join(log_dir, f"writes{rank}.json"), "w") as f:
        json.dump({"written": written, "world_size": result.summary["world_size"]}, f)
    state = {k: v.float() for k, v in result.model.state_dict().items()}
    save_file(state, os.path.join(log_dir, f"weights{rank}.safetensors"))


def test_two_process_gloo_training(tmp_path):
    write_tiny_npz(tmp_path / "tiny.npz")
    cfg = {"dataset": "npz", "data_root": str(tmp_path / "tiny.npz"), "model": "resnet8",
           "width": 4, "batch_size": 8, "val_fraction": 0.25, "epochs": 2, "lr": 0.05,
           "method": "dyconv", "num_kernels": 2, "dynamic_ratio": 0.3,
           "imp_mode": "interleaved", "imp_iterations": 2, "imp_num_batches": 1,
           "temperature_anneal_epochs": 1, "out_dir": str(tmp_path / "run"), "device": "cpu"}
    logs = tmp_path / "logs"
    logs.mkdir()
    mp.spawn(_worker, args=(_free_port(), cfg, str(logs)), nprocs=2, join=True)

    from safetensors.torch import load_file

    w0, w1 = (load_file(logs / f"weights{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    masks = [k for k in w0 if k.endswith(".mask")]
    assert masks and 0.25 < sum(w0[k].sum() for k in masks) / sum(w0[k].numel()
                                                                    for k in masks) < 0.35
    rank0, rank1 = (json.loads((logs / f"writes{r}.json").read_text()) for r in (0, 1))
    assert rank1["written"] == [] and rank0["world_size"] == 2
    assert any(p.endswith("model.safetensors") for p in rank0["written"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 * 4  # 36 per rank / 8


def test_torchrun_module_entry_point(tmp_path):
    """``torchrun -m padnet train``: the command line itself under torchrun (three processes)."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    np.savez(tmp_path / "d.npz", x=(rng.random((64, 8, 8)) * 255).astype(np.uint8), y=y)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "padnet", "train", "--dataset", "npz", "--data-root", str(tmp_path / "d.npz"),
           "--model", "resnet8", "--width", "4", "--batch-size", "8", "--epochs", "1",
           "--out-dir", str(tmp_path / "run"), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2
