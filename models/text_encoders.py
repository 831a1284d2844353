"""Text encoders: caption -> sentence embedding ``(B, out_dim)``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from models.registry import Registry, StrictModel, configured

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

    def __init__(self, config: Config | None = None, *, in_dim: int) -> None:
        super().__init__()
        self.config = configured(self.Config, config, {})
        self.out_dim = in_dim

    def forward(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, in_dim)`` precomputed sentence embeddings, passed through unchanged."""
        return text_embeds
