"""MaskedBatchNorm2d is nn.BatchNorm2d on the valid positions alone (training outputs, running statistics,
gradients), so a CNN encoder's training-mode embedding of a clip does not depend on how far its batch is padded;
synchronised across two gloo workers it gives what one process gives on their batches together."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models import SmallCNNEncoder
from models.audio_encoders import ConvStackEncoder, time_mask
from models.masked_norm import MaskedBatchNorm2d, synchronise_batch_norms
from models.pooling import MeanMaxPooling

LENGTHS = torch.tensor([7, 3, 5])  # frames of each of three clips, padded to 7


def padded_batch(lengths: torch.Tensor, steps: int, channels: int = 4, width: int = 5) -> torch.Tensor:
    """``(B, channels, steps, width)`` values around 2, with loud garbage past each clip's length."""
    g = torch.Generator().manual_seed(0)
    x = 2 + 1.5 * torch.randn(len(lengths), channels, steps, width, generator=g)
    garbage = 100 * torch.randn(x.shape, generator=g)
    return torch.where(time_mask(lengths, steps).bool(), x, garbage)


def seeded_norm(momentum: float | None = 0.1, affine: bool = True) -> MaskedBatchNorm2d:
    norm = MaskedBatchNorm2d(4, momentum=momentum, affine=affine)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor, low, high in [(norm.weight, 0.5, 2), (norm.bias, -1, 1), (norm.running_mean, -1, 1)]:
            if tensor is not None:
                tensor.uniform_(low, high, generator=g)
        norm.running_var.uniform_(0.5, 2, generator=g)
    return norm


# momentum None: the cumulative average of the batches' statistics; affine False: no weight and bias
@pytest.mark.parametrize("momentum, affine", [(0.1, True), (None, True), (0.1, False)])
def test_training_statistics_are_those_of_the_valid_frames_alone(momentum, affine):
    """Against nn.BatchNorm2d on the valid frames alone, laid out as one image ``(1, C, N, W)``: outputs, running
    statistics after two updates, and gradients."""
    norm = seeded_norm(momentum, affine).train()
    reference = nn.BatchNorm2d(4, momentum=momentum, affine=affine).train()
    reference.load_state_dict(norm.state_dict())  # the same names: nn.BatchNorm2d checkpoints load both ways
    valid = time_mask(LENGTHS, 7)  # (B, 1, T, 1)
    frames = valid[:, 0, :, 0].bool()  # (B, T)
    x = padded_batch(LENGTHS, 7).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    for _ in range(2):  # two updates of the running statistics
        out = norm(x, valid)  # (B, C, T, W)
        ref_out = reference(x_ref.transpose(0, 1)[:, frames][None])[0]  # (C, N, W): the N valid frames
    assert torch.allclose(out.transpose(0, 1)[:, frames], ref_out, atol=1e-5)
    assert torch.all(out.transpose(0, 1)[:, ~frames] == 0)  # padding zeroed for the next convolution
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(norm, name), getattr(reference, name), atol=1e-6), name

    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))  # a loss that weighs every output
    (out * weights).sum().backward()
    (ref_out * weights.transpose(0, 1)[:, frames]).sum().backward()
    assert torch.allclose(x.grad.transpose(0, 1)[:, frames], x_ref.grad.transpose(0, 1)[:, frames], atol=1e-5)
    assert torch.all(x.grad.transpose(0, 1)[:, ~frames] == 0)  # padding reaches neither output nor statistics
    for name in ("weight", "bias") if affine else ():
        assert torch.allclose(getattr(norm, name).grad, getattr(reference, name).grad, atol=1e-4), name


def test_without_padding_it_is_nn_batchnorm2d_and_in_eval_it_masks_the_running_statistics_output():
    x = padded_batch(torch.tensor([7, 7, 7]), 7)
    norm, reference = seeded_norm(), nn.BatchNorm2d(4)
    reference.load_state_dict(norm.state_dict())
    assert torch.allclose(norm(x, time_mask(torch.tensor([7, 7, 7]), 7)), reference(x), atol=1e-5)
    assert torch.allclose(norm(x), reference(x), atol=1e-5)  # no mask: nothing is padded
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(norm, name), getattr(reference, name), atol=1e-6), name
    norm.eval(), reference.eval()
    reference.load_state_dict(norm.state_dict())
    x, valid = padded_batch(LENGTHS, 7), time_mask(LENGTHS, 7)
    running_mean = norm.running_mean.clone()
    assert torch.equal(norm(x, valid), reference(x) * valid)  # eval: the running statistics, padding zeroed
    assert torch.equal(norm.running_mean, running_mean)  # and no update


@pytest.mark.parametrize(
    "make",
    [
        lambda: SmallCNNEncoder(n_mels=16, channels=[4, 8, 8], out_dim=8, dropout=0.0),
        # CNN14's layout (no pooling after its last block; the same code as CNN14Encoder) at small widths
        lambda: ConvStackEncoder(16, [4, 8, 8, 8], out_dim=8, dropout=0.0, last_pool=1),
    ],
    ids=["SmallCNNEncoder", "CNN14-shaped"],
)
def test_training_embedding_of_a_clip_does_not_depend_on_the_padding_of_its_batch(make):
    """The issue's check: clips of 37 and 22 frames (odd lengths pooled too), in training mode, padded to 37 and to
    111 frames with garbage: the same embeddings and running statistics (dropout off: its random masks would
    differ with the shape). In float64, so the only difference left, the rounding of sums taken over another
    length, is far below any tolerance."""
    torch.manual_seed(0)
    encoder = make().double().train()
    pool = MeanMaxPooling(dim=encoder.frame_dim)
    lengths = torch.tensor([37, 22])
    clips = torch.randn(2, 37, 16, dtype=torch.float64)
    embeddings, states = [], []
    for steps in (37, 111):
        copy_ = copy.deepcopy(encoder)
        logmels = torch.cat([clips, 100 * torch.randn(2, steps - 37, 16, dtype=torch.float64)], dim=1)
        logmels[1, 22:] = 100 * torch.randn(steps - 22, 16, dtype=torch.float64)  # the short clip's padding too
        with torch.no_grad():
            embeddings.append(copy_.embed(pool(*copy_(logmels, lengths))))
        states.append(copy_.state_dict())
    assert torch.allclose(embeddings[0], embeddings[1], rtol=0, atol=1e-10)
    for name, tensor in states[0].items():
        assert torch.allclose(tensor.double(), states[1][name].double(), rtol=0, atol=1e-10), name


GLOBAL_LENGTHS = torch.tensor([37, 22, 30, 13])  # rank 0 takes the first two (padded to 37), rank 1 the rest (30)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mels ``(4, 37, 16)`` of the global batch (garbage past each length), and loss weights ``(4, 8)``."""
    g = torch.Generator().manual_seed(3)
    logmels = torch.randn(4, 37, 16, generator=g)
    logmels[time_mask(GLOBAL_LENGTHS, 37)[:, 0, :, 0] == 0] = 50.0
    return logmels, torch.randn(4, 8, generator=g)


def trained_step(logmels: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor, sync: bool) -> dict:
    """One training forward and backward of a seeded encoder: embeddings, input and parameter gradients, state."""
    torch.manual_seed(0)
    encoder = SmallCNNEncoder(n_mels=16, channels=[4, 8, 8], out_dim=8, dropout=0.0).train()
    if sync:
        synchronise_batch_norms(encoder)
    logmels = logmels.clone().requires_grad_()
    embeddings = encoder.embed(MeanMaxPooling(dim=8)(*encoder(logmels, lengths)))
    (embeddings * weights).sum().backward()
    grads = {name: p.grad for name, p in encoder.named_parameters()}
    return {
        "embeddings": embeddings.detach(),
        "input_grad": logmels.grad,
        "grads": grads,
        "state": encoder.state_dict(),
    }


def sync_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    logmels, weights = global_batch()
    rows = slice(2 * rank, 2 * rank + 2)
    lengths = GLOBAL_LENGTHS[rows]
    result = trained_step(logmels[rows, : int(lengths.max())], lengths, weights[rows], sync=True)
    for grad in result["grads"].values():  # the global loss is the sum of the workers' losses
        dist.all_reduce(grad)
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_synchronised_workers_normalise_with_the_global_batch_statistics(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(sync_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    logmels, weights = global_batch()
    single = trained_step(logmels, GLOBAL_LENGTHS, weights, sync=False)

    assert torch.allclose(torch.cat([r["embeddings"] for r in ranks]), single["embeddings"], atol=1e-5)
    for rank, result in enumerate(ranks):
        grad = result["input_grad"]  # (2, T_rank, 16): the frames past T_rank are padding in one process too
        assert torch.allclose(grad, single["input_grad"][2 * rank : 2 * rank + 2, : grad.size(1)], atol=1e-5)
        for name, tensor in single["state"].items():
            assert torch.allclose(result["state"][name].float(), tensor.float(), atol=1e-5), (rank, name)
        for name, grad in single["grads"].items():
            assert torch.allclose(result["grads"][name], grad, atol=1e-5), (rank, name)
    assert torch.all(single["input_grad"][1, 22:] == 0)
