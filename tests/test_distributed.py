"""Data-parallel training sees the global batch: two gloo workers give the single-process gradient,
for both losses, for a learnable temperature, for text-aware pooling over frames that are padded to
another length on each worker, and for distillation from teachers' scores looked up by the gathered ids."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from models.losses import ClipLoss, LogSoftmaxLoss
from models.pooling import TextAwareAttentionPooling
from utils.config import DistillationConfig
from utils.distributed import gather_ids, gather_pairs, world
from utils.training import Distiller

AUDIO_IDS = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])  # several captions of one clip, split across workers


LENGTHS = torch.tensor([5, 2, 4, 1, 3, 2, 1, 3])  # rank 0's rows hold 5 frames, rank 1's only 3


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, 6, generator=g), torch.randn(8, 5, generator=g)


CAPTION_IDS = torch.tensor([7, 3, 9, 0, 4, 8, 1, 6])  # the batch's caption ids, which the teachers are keyed by
LOSSES = {
    "LogSoftmaxLoss": LogSoftmaxLoss(temperature=0.1),
    "ClipLoss": ClipLoss(),
    "TAP": LogSoftmaxLoss(),
    "Distilled": LogSoftmaxLoss(temperature=0.1),
}


def teacher_scores(audio_ids: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """Fixed teachers: the cosine of clip i and caption j is entry (i, j) of one seeded table."""
    table = torch.rand(5, 10, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return table[audio_ids][:, caption_ids]


def batch_loss(loss_name: str, scores, audio_ids, caption_ids, logit_scale) -> torch.Tensor:
    """What ``run_epoch`` computes from the global batch's scores and ids; distilled: half supervised, half the
    teachers' targets."""
    criterion = LOSSES[loss_name]
    logits = criterion.scaled(scores, logit_scale)
    loss = criterion.from_scores(logits, audio_ids)
    if loss_name != "Distilled":
        return loss
    distiller = Distiller(teacher_scores, DistillationConfig(teachers="t", weight=0.5, supervised_weight=0.5))
    return distiller.combined(loss, logits, audio_ids, caption_ids, criterion, logit_scale)


class Towers(nn.Module):
    """Two linear towers scored as ``DualEncoderModel.forward`` scores them (mean-pooled, or through text-aware
    pooling), with ClipLoss a learnable log logit scale too, the same seeded weights in every process."""

    def __init__(self, loss_name: str):
        super().__init__()
        torch.manual_seed(0)
        self.audio, self.text = nn.Linear(6, 4), nn.Linear(5, 4)
        self.tap = TextAwareAttentionPooling(4, 3, attn_dropout=0.0) if loss_name == "TAP" else None
        # DDP needs every parameter in each step's loss, as training has: a scale only where the loss uses it
        self.logit_scale = nn.Parameter(torch.tensor(2.0)) if loss_name == "ClipLoss" else None

    def scale(self) -> torch.Tensor | None:
        return self.logit_scale.exp() if self.logit_scale is not None else None

    def forward(self, audio, lengths, text, gather=None):
        frames, text = self.audio(audio[:, : int(lengths.max())]), F.normalize(self.text(text), dim=-1)
        if self.tap is None:
            valid = (torch.arange(frames.size(1))[None, :] < lengths[:, None])[..., None]
            frames = F.normalize((frames * valid).sum(1) / lengths[:, None], dim=-1)[:, None]
        if gather is not None:
            frames, lengths, text = gather(frames, lengths, text)
        if self.tap is None:
            return frames[:, 0] @ text.T
        return torch.einsum("tae,te->at", F.normalize(self.tap(frames, lengths, text), dim=-1), text)


def worker(rank: int, world_size: int, store: str, out: str, loss_name: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    assert world() == (world_size, rank)
    model = nn.parallel.DistributedDataParallel(Towers(loss_name))
    audio, text = inputs()
    rows = slice(rank * 4, rank * 4 + 4)  # this worker's half of the global batch
    scores = model(audio[rows], LENGTHS[rows], text[rows], gather_pairs)
    ids, caption_ids = gather_ids(AUDIO_IDS[rows]), gather_ids(CAPTION_IDS[rows])
    assert torch.equal(ids, AUDIO_IDS) and torch.equal(caption_ids, CAPTION_IDS)
    loss = batch_loss(loss_name, scores, ids, caption_ids, model.module.scale())
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in model.module.named_parameters()}}, out)
    # Free DDP's reducer while the group is still registered: freed after destroy_process_group, it would
    # destroy the group itself and join gloo's thread while holding the GIL that thread waits for (a hang).
    del model, scores, loss
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_two_workers_match_one_process_on_the_global_batch(tmp_path, loss_name):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(out), loss_name), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)

    model = Towers(loss_name)
    audio, text = inputs()
    loss = batch_loss(loss_name, model(audio, LENGTHS, text), AUDIO_IDS, CAPTION_IDS, model.scale())
    loss.backward()
    assert torch.allclose(distributed["loss"], loss.detach(), atol=1e-6)
    assert set(distributed["grads"]) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert torch.allclose(distributed["grads"][name], param.grad, atol=1e-6), name


def test_single_process_gather_is_identity():
    a, lengths, t, ids = torch.randn(3, 1, 2), torch.ones(3), torch.randn(3, 2), torch.arange(3)
    assert gather_pairs(a, lengths, t) == (a, lengths, t) and gather_ids(ids) is ids and world() == (1, 0)
