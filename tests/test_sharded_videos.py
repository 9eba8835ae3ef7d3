"""Pruned videos over a data-parallel encoder: two real processes (gloo), each encoding its
share; both end up with every video's embeddings and the one keep mask its rank chose."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stts_vllm.sharded_videos import balance, run_sharded

WIDTH = 3


def _fake_item(index: int, rank: int, units: int, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask that depends on the rank that computed it: if a rank recomputed a video instead
    of receiving it, the ranks' masks would differ."""
    generator = torch.Generator().manual_seed(100 * rank + index)
    mask = torch.zeros(units, dtype=torch.bool)
    mask[torch.randperm(units, generator=generator)[:kept]] = True
    embeds = torch.arange(kept * WIDTH, dtype=torch.float32).reshape(kept, WIDTH) + 1000 * index
    return embeds, mask


def _worker(rank: int, world: int, port: int, case: dict[str, Any], queue: Any) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    encoded: list[int] = []

    def encode(indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        encoded.extend(indices)
        return [_fake_item(i, rank, case["units"][i], case["kept"][i]) for i in indices]

    def all_gather(tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    out = run_sharded(
        case["sizes"],
        case["kept"],
        case["units"],
        encode,
        rank=rank,
        world=world,
        all_gather=all_gather,
        width=WIDTH,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    queue.put((rank, encoded, [(e.tolist(), m.tolist()) for e, m in out]))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    "five videos": {
        "sizes": [50, 10, 30, 5, 20],
        "units": [12, 4, 9, 2, 6],
        "kept": [6, 2, 4, 1, 3],
    },
    "one video, a rank idle": {"sizes": [7], "units": [8], "kept": [3]},
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_gets_every_video_each_encoded_once(name: str) -> None:
    case, world = CASES[name], 2
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    procs = [
        context.Process(target=_worker, args=(r, world, port, case, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results = dict(
        (rank, (encoded, out)) for rank, encoded, out in (queue.get(timeout=120) for _ in procs)
    )
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    encoded = sorted(i for enc, _ in results.values() for i in enc)
    assert encoded == list(range(len(case["sizes"])))  # each video on exactly one rank
    assert results[0][1] == results[1][1]  # the ranks agree, masks included
    owner = {i: r for r, shard in enumerate(balance(case["sizes"], world)) for i in shard}
    for i, (embeds, mask) in enumerate(results[0][1]):
        want_embeds, want_mask = _fake_item(i, owner[i], case["units"][i], case["kept"][i])
        assert embeds == want_embeds.tolist()
        assert mask == want_mask.tolist()
