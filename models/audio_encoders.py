"""Audio encoders: log-mel ``(B, T, n_mels)`` + lengths ``(B,)`` -> frames ``(B, T', frame_dim)`` + their valid
lengths ``(B,)``, which a pooling head (``models/pooling.py``) turns into a clip vector; ``embed`` then maps a pooled
vector ``(..., frame_dim)`` to the encoder's embedding ``(..., out_dim)`` (CNN14: its ``fc1``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from models.masked_norm import MaskedBatchNorm2d
from models.pooling import valid_frames
from models.registry import Registry, StrictModel, configured
from models.weights import load_weights, read_safetensors
from utils.errors import CheckpointError

log = logging.getLogger(__name__)

AUDIO_ENCODERS: Registry[type[nn.Module]] = Registry("audio encoder")

Dropout = Annotated[float, Field(ge=0, lt=1)]  # a probability; 1 would zero every activation


class ConvBlock(nn.Module):
    """Two 3x3 conv + batch-norm + ReLU layers, then 2x2 average pooling (the PANNs block).

    ``valid`` ``(B, 1, T, 1)`` marks the input's valid frames. The batch norms take their statistics over those
    only and zero the padding, and the input is zeroed there too (after an odd length's pooling its last, half
    padded, frame lies past the valid ones): the convolutions see the same zeros at a clip's end whether or not
    the clip was padded in its batch, and in training a clip's output does not depend on its batch-mates' lengths.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = MaskedBatchNorm2d(out_channels)
        self.bn2 = MaskedBatchNorm2d(out_channels)
        self.pool = pool

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x * valid), valid))  # ReLU keeps the padding at 0
        x = F.relu(self.bn2(self.conv2(x), valid))
        return F.avg_pool2d(x, self.pool) if self.pool > 1 else x


def time_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """``(B,)`` valid lengths -> ``(B, 1, steps, 1)`` float mask of valid time steps."""
    return valid_frames(lengths, steps).float()[:, None, :, None]


class ConvStackEncoder(nn.Module):
    """PANNs-style stack: mel batch-norm, ``ConvBlock``s, mean over frequency -> frames; after the pooling head
    (PANNs: mean + max over time, ``MeanMaxPooling``), dropout and ``fc1`` with a ReLU."""

    default_pooling: ClassVar[str] = "MeanMaxPooling"

    def __init__(self, n_mels: int, channels: list[int], out_dim: int, dropout: float, last_pool: int = 2) -> None:
        super().__init__()
        self.bn0 = MaskedBatchNorm2d(n_mels)
        pools = [2] * (len(channels) - 1) + [last_pool]
        ins = [1] + channels[:-1]
        for i, (c_in, c_out, pool) in enumerate(zip(ins, channels, pools), start=1):
            self.add_module(f"conv_block{i}", ConvBlock(c_in, c_out, pool))
        self.pools = pools
        self.dropout = dropout
        self.fc1 = nn.Linear(channels[-1], out_dim)
        self.frame_dim, self.out_dim = channels[-1], out_dim

    def forward(self, logmels: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, M)`` log-mels and ``(B,)`` frame counts -> frames ``(B, T', C)`` and their valid counts."""
        # logmels: (B, T, M) -> (B, M, T, 1): batch-norm over mel bands as in PANNs (bn0 sees M as channels), over
        # the valid frames -> (B, 1, T, M), zero past each clip's end
        x = self.bn0(logmels.unsqueeze(1).transpose(1, 3), time_mask(lengths, logmels.size(1))).transpose(1, 3)
        for i, pool in enumerate(self.pools, start=1):
            x = getattr(self, f"conv_block{i}")(x, time_mask(lengths, x.size(2)))
            x = F.dropout(x, self.dropout, self.training)
            lengths = torch.div(lengths, pool, rounding_mode="floor").clamp(min=1)  # frames left after pooling
        frames = x.mean(dim=3).transpose(1, 2)  # (B, T', C): averaged over frequency
        return frames, lengths.clamp(max=frames.size(1))

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """A pooled vector (or each frame, for a text-aware head) ``(..., C)`` -> ``(..., out_dim)``."""
        return F.relu(self.fc1(F.dropout(pooled, self.dropout, self.training)))


@AUDIO_ENCODERS.register
class CNN14Encoder(ConvStackEncoder):
    """PANNs CNN14 (Kong et al. 2020) up to its 2048-d ``fc1`` embedding.

    Layer names match the PANNs checkpoint, so ``preprocessing/cnn14_transfer.py`` output loads
    directly through ``weight``. Expects 64 mel bands like the pretrained model.
    """

    class Config(StrictModel):
        name: Literal["CNN14Encoder"] = "CNN14Encoder"
        weight: Path | None = None  # safetensors file written by preprocessing/cnn14_transfer.py
        trainable: bool = True
        dropout: Dropout = 0.2

    def __init__(self, config: Config | None = None, *, n_mels: int, **fields: object) -> None:
        config = configured(self.Config, config, fields)
        super().__init__(n_mels, [64, 128, 256, 512, 1024, 2048], out_dim=2048, dropout=config.dropout, last_pool=1)
        self.config = config
        if config.weight is not None:
            if not config.weight.is_file():
                raise CheckpointError(
                    f"model.audio_enc.weight: {config.weight} not found; make it from the PANNs checkpoint with: "
                    f"python preprocessing/cnn14_transfer.py --checkpoint Cnn14_mAP=0.431.pth --output {config.weight}"
                )
            load_weights(self, read_safetensors(config.weight), f"model.audio_enc.weight {config.weight}")
            log.info("CNN14Encoder: loaded pretrained weights from %s", config.weight)
        self.requires_grad_(config.trainable)


@AUDIO_ENCODERS.register
class SmallCNNEncoder(ConvStackEncoder):
    """A narrow CNN14-shaped encoder that trains in minutes on a CPU (the demo and tests use it)."""

    class Config(StrictModel):
        name: Literal["SmallCNNEncoder"] = "SmallCNNEncoder"
        channels: list[PositiveInt] = Field([8, 16, 32, 64], min_length=1)  # one ConvBlock per width
        out_dim: PositiveInt = 128
        dropout: Dropout = 0.1

    def __init__(self, config: Config | None = None, *, n_mels: int, **fields: object) -> None:
        config = configured(self.Config, config, fields)
        super().__init__(n_mels, list(config.channels), out_dim=config.out_dim, dropout=config.dropout)
        self.config = config
