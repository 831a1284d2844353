"""Data-parallel training sees the global batch: two gloo workers give the single-process gradient."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models.losses import LogSoftmaxLoss
from utils.distributed import gather_batch, world

AUDIO_IDS = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])  # several captions of one clip, split across workers


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


class Towers(nn.Module):
    """Two linear towers with the same seeded weights in every process."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.audio, self.text = nn.Linear(6, 4), nn.Linear(5, 4)

    def forward(self, audio, text):
        return self.audio(audio), self.text(text)


def worker(rank: int, world_size: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    assert world() == (world_size, rank)
    model = nn.parallel.DistributedDataParallel(Towers())
    audio, text = inputs()
    rows = slice(rank * 4, rank * 4 + 4)  # this worker's half of the global batch
    a, t = model(audio[rows], text[rows])
    a, t, ids = gather_batch(a, t, AUDIO_IDS[rows])
    assert torch.equal(ids, AUDIO_IDS)
    loss = LogSoftmaxLoss(temperature=0.1)(a, t, ids)
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in model.module.named_parameters()}}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_match_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)

    model = Towers()
    audio, text = inputs()
    loss = LogSoftmaxLoss(temperature=0.1)(*model(audio, text), AUDIO_IDS)
    loss.backward()
    assert torch.allclose(distributed["loss"], loss.detach(), atol=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(distributed["grads"][name], param.grad, atol=1e-6), name


def test_single_process_gather_is_identity():
    a, t, ids = torch.randn(3, 2), torch.randn(3, 2), torch.arange(3)
    assert gather_batch(a, t, ids) == (a, t, ids) and world() == (1, 0)
