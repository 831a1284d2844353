"""Text encoders: caption -> sentence embedding ``(B, out_dim)``."""
from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from utils.registry import Registry
from utils.strict_model import StrictModel

log = logging.getLogger(__name__)

TEXT_ENCODERS: Registry[type[nn.Module]] = Registry("text encoder")


@TEXT_ENCODERS.register
class SentBERTBaseEncoder(nn.Module):
    """Frozen Sentence-BERT: caption embeddings are precomputed once by
    ``preprocessing/sbert_embeddings.py`` and fed in as ``(B, in_dim)`` vectors.

    Freezing the text tower (as the DCASE baseline does) lets every trial share one embedding
    file instead of running a transformer per step; the trainable part is the projection
    inside ``DualEncoderModel``.
    """

    class Config(StrictModel):
        name: Literal["SentBERTBaseEncoder"] = "SentBERTBaseEncoder"

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = in_dim

    def forward(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return text_embeds
