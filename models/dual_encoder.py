"""The dual encoder: audio and text towers projected into one L2-normalised embedding space."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from models.audio_encoders import AUDIO_ENCODERS
from models.heads import PROJECTIONS, LinearProjection
from models.registry import StrictModel
from models.text_encoders import TEXT_ENCODERS


class LearnableTemperature(StrictModel):
    """A temperature trained with the model, as CLIP's: stored as ``log(1 / T)``, so the logit scale
    ``1 / T`` stays positive, and clamped at ``max_logit_scale`` (CLIP: 100, i.e. T >= 0.01)."""

    init: PositiveFloat = 0.07  # CLIP's and open_clip's starting temperature
    max_logit_scale: float = Field(100.0, gt=1)


class DualEncoderModel(nn.Module):
    """Audio tower + text tower, each followed by a projection head to ``embed_dim``.

    Outputs are L2-normalised, so a dot product between them is a cosine similarity; the
    loss's temperature, or the model's own learnable ``logit_scale``, turns those similarities
    into logits.
    """

    class Config(StrictModel):
        """The ``model`` section: the shared space's width and one registered encoder per tower."""

        name: Literal["DualEncoderModel"] = "DualEncoderModel"
        embed_dim: PositiveInt  # no default: the width of the shared space is each experiment's choice
        audio_enc: AUDIO_ENCODERS.config_union()
        text_enc: TEXT_ENCODERS.config_union()
        projection: PROJECTIONS.config_union() = LinearProjection.Config()  # the head of each tower
        # None: the loss's fixed criterion.temperature; else a temperature trained with the model
        learnable_temperature: LearnableTemperature | None = None

    def __init__(
        self,
        audio_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int,
        projection: StrictModel | None = None,
        learnable_temperature: LearnableTemperature | None = None,
    ) -> None:
        super().__init__()
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        projection = projection or LinearProjection.Config()
        self.audio_proj = PROJECTIONS.build(projection, in_dim=audio_encoder.out_dim, out_dim=embed_dim)
        self.text_proj = PROJECTIONS.build(projection, in_dim=text_encoder.out_dim, out_dim=embed_dim)
        self.max_logit_scale = None
        if learnable_temperature is not None:
            # log(1 / T): a scalar parameter, checkpointed and optimised with the model (open_clip's logit_scale)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / learnable_temperature.init)))
            self.max_logit_scale = learnable_temperature.max_logit_scale

    def scale(self) -> torch.Tensor | None:
        """The learnable ``1 / temperature`` (a scalar, clamped at ``max_logit_scale``), or None when the
        temperature is the loss's fixed one."""
        if self.max_logit_scale is None:
            return None
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part, for per-part learning rates: ``heads`` (projections),
        ``audio_encoder``, ``text_encoder`` and ``logit_scale``; frozen parameters and empty parts left out."""
        parts = {
            "heads": [*self.audio_proj.parameters(), *self.text_proj.parameters()],
            "audio_encoder": list(self.audio_encoder.parameters()),
            "text_encoder": list(self.text_encoder.parameters()),
            "logit_scale": [self.logit_scale] if self.max_logit_scale is not None else [],
        }
        trainable = {name: [p for p in params if p.requires_grad] for name, params in parts.items()}
        return {name: params for name, params in trainable.items() if params}

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
    return DualEncoderModel(audio, text, config.embed_dim, config.projection, config.learnable_temperature)
