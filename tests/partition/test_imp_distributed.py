"""Data-parallel IMP: two gloo processes on CPU end with identical masks, equal to one process
scoring the union of their data (scores and Theta_hat moments are summed over ranks)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from padnet.layers import DynamicConv2d, ModeMask
from padnet.partition import partition_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

RUNS = (  # (score, static_init, granularity)
    ("taylor", "mean", "element"),
    ("variance", "keep", "channel"),
)


def model_and_data() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2d(2, 4, 3, padding=1, num_kernels=3), nn.ReLU(),
                          DynamicConv2d(4, 5, 3, num_kernels=2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 2, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
    return model, data


def final_state(model: nn.Module) -> list[torch.Tensor]:
    out = [m.mask.clone() for m in model.modules() if isinstance(m, ModeMask)]
    return out + [model[0].static_weight.detach().clone(), model[2].static_weight.detach().clone()]


def worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = []
        for score, static_init, granularity in RUNS:
            model, data = model_and_data()
            ddp = nn.parallel.DistributedDataParallel(model)  # unwrapped by partition
            partition_model(ddp, data[rank::world], dynamic_ratio=0.4, iterations=2, score=score,
                      static_init=static_init, granularity=granularity)
            results.append(final_state(model))
        torch.save(results, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_a_single_process_on_the_union(tmp_path, one_thread):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, (score, static_init, granularity) in enumerate(RUNS):
        model, data = model_and_data()
        # the union, in the order the ranks' sums add up: rank 0's batches, then rank 1's
        partition_model(model, data[0::2] + data[1::2], dynamic_ratio=0.4, iterations=2,
                  score=score, static_init=static_init, granularity=granularity)
        single = final_state(model)
        for a, b, c in zip(ranks[0][i], ranks[1][i], single, strict=True):
            assert torch.equal(a, b)  # every rank holds the same mask and static weight
            torch.testing.assert_close(a, c)
        assert not all(m.all() for m in single[:2])  # something was partitioned
