"""Data-parallel helpers built on ``torch.distributed`` alone (the process group is set up by the caller)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather as all_gather_with_grad


def world() -> tuple[int, int]:
    """``(world size, rank)``; ``(1, 0)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_batch(
    audio: torch.Tensor, text: torch.Tensor, audio_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate every worker's ``(B, E)`` embeddings and ``(B,)`` clip ids into the global batch.

    The embeddings keep their autograd graph: the backward of the gather sums, over workers,
    the gradient each worker's copy of the global loss sends to this worker's rows, and DDP
    then averages parameter gradients, which together give exactly the gradient of the
    single-process loss on the global batch. Every worker must pass the same ``B``.
    """
    if world()[0] == 1:
        return audio, text, audio_ids
    ids = [torch.empty_like(audio_ids) for _ in range(dist.get_world_size())]
    dist.all_gather(ids, audio_ids)
    return torch.cat(all_gather_with_grad(audio)), torch.cat(all_gather_with_grad(text)), torch.cat(ids)
