"""The dual encoder: audio and text towers projected into one L2-normalised embedding space."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from models.audio_encoders import AUDIO_ENCODERS
from models.registry import StrictModel
from models.text_encoders import TEXT_ENCODERS


class DualEncoderModel(nn.Module):
    """Audio tower + text tower, each followed by a linear projection to ``embed_dim``.

    Outputs are L2-normalised, so a dot product between them is a cosine similarity; the
    loss's temperature turns those similarities into logits.
    """

    class Config(StrictModel):
        """The ``model`` section: the shared space's width and one registered encoder per tower."""

        name: Literal["DualEncoderModel"] = "DualEncoderModel"
        embed_dim: PositiveInt  # no default: the width of the shared space is each experiment's choice
        audio_enc: AUDIO_ENCODERS.config_union()
        text_enc: TEXT_ENCODERS.config_union()

    def __init__(self, audio_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        self.audio_proj = nn.Linear(audio_encoder.out_dim, embed_dim)
        self.text_proj = nn.Linear(text_encoder.out_dim, embed_dim)

    def encode_audio(self, logmels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(B, T, n_mels)`` padded log-mels + ``(B,)`` frame counts -> ``(B, embed_dim)`` unit vectors."""
        return F.normalize(self.audio_proj(self.audio_encoder(logmels, lengths)), dim=-1)

    def encode_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, sbert_dim)`` sentence embeddings -> ``(B, embed_dim)`` unit vectors."""
        return F.normalize(self.text_proj(self.text_encoder(text_embeds)), dim=-1)

    def forward(
        self, logmels: torch.Tensor, lengths: torch.Tensor, text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers at once: ``(B, embed_dim)`` audio and text unit vectors."""
        return self.encode_audio(logmels, lengths), self.encode_text(text_embeds)


def create_model(config: DualEncoderModel.Config, n_mels: int, text_dim: int) -> DualEncoderModel:
    """Build a ``DualEncoderModel`` from the ``model`` config section.

    ``n_mels`` comes from the feature store and ``text_dim`` from the embedding file, so the
    same config works for any feature settings and any Sentence-BERT model.
    """
    audio = AUDIO_ENCODERS.build(config.audio_enc, n_mels=n_mels)
    text = TEXT_ENCODERS.build(config.text_enc, in_dim=text_dim)
    return DualEncoderModel(audio, text, config.embed_dim)
