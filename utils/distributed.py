"""Data-parallel helpers built on ``torch.distributed`` alone (the process group is set up by the caller)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather as all_gather_with_grad


def world() -> tuple[int, int]:
    """``(world size, rank)``; ``(1, 0)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_pairs(
    audio: torch.Tensor, lengths: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate every worker's audio side ``(B, T, E)`` (``DualEncoderModel.audio_frames``), its valid lengths
    ``(B,)`` and text embeddings ``(B, E)`` into the global batch's; workers' frames are padded to the longest.

    The embeddings keep their autograd graph: the backward of the gather sums, over workers,
    the gradient each worker's copy of the global loss sends to this worker's rows, and DDP
    then averages parameter gradients, which together give exactly the gradient of the
    single-process loss on the global batch. Every worker must pass the same ``B``.
    """
    if world()[0] == 1:
        return audio, lengths, text
    # on the frames' device: NCCL gathers CUDA tensors only
    steps = [torch.zeros((), dtype=torch.long, device=audio.device) for _ in range(dist.get_world_size())]
    dist.all_gather(steps, torch.tensor(audio.size(1), device=audio.device))
    audio = F.pad(audio, (0, 0, 0, int(max(steps)) - audio.size(1)))  # padded frames are masked by their lengths
    return torch.cat(all_gather_with_grad(audio)), gather_ids(lengths), torch.cat(all_gather_with_grad(text))


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Every worker's ``(B,)`` integer tensor, concatenated in rank order (no gradient)."""
    if world()[0] == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids)
    return torch.cat(parts)
