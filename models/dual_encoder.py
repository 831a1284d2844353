"""The dual encoder: audio and text towers projected into one L2-normalised embedding space."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.audio_encoders import AUDIO_ENCODERS
from models.text_encoders import TEXT_ENCODERS


class DualEncoderModel(nn.Module):
    """Audio tower + text tower, each followed by a linear projection to ``embed_dim``.

    Outputs are L2-normalised, so a dot product between them is a cosine similarity; the
    loss's temperature turns those similarities into logits.
    """

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

    def forward(self, logmels: torch.Tensor, lengths: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_audio(logmels, lengths), self.encode_text(text_embeds)


def create_model(model_config: Any, n_mels: int, text_dim: int) -> DualEncoderModel:
    """Build a ``DualEncoderModel`` from the ``model`` config section.

    ``n_mels`` comes from the feature config and ``text_dim`` from the embedding file, so the
    same config works for any Sentence-BERT model.
    """
    audio = AUDIO_ENCODERS.build(model_config.audio_enc, n_mels=n_mels)
    text = TEXT_ENCODERS.build(model_config.text_enc, in_dim=text_dim)
    return DualEncoderModel(audio, text, model_config.embed_dim)
