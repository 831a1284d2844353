"""Contrastive losses for audio-text dual encoders, one registry (``criterion.name`` in the config)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.registry import Registry, StrictModel, configured

LOSSES: Registry[type[nn.Module]] = Registry("loss")

Distance = Literal["dot_product", "cosine_similarity"]


def similarity(audio_embeds: torch.Tensor, text_embeds: torch.Tensor, dist: Distance) -> torch.Tensor:
    """Pairwise scores ``(n_audio, n_text)`` between ``(n_audio, E)`` and ``(n_text, E)`` embeddings."""
    if dist == "cosine_similarity":
        audio_embeds = F.normalize(audio_embeds, dim=-1)
        text_embeds = F.normalize(text_embeds, dim=-1)
    return audio_embeds @ text_embeds.T


@LOSSES.register
class LogSoftmaxLoss(nn.Module):
    """Symmetric InfoNCE loss of the DCASE 2023 Task 6B baseline, vectorised.

    For anchor pair i the candidates are every row whose audio clip differs from row i's,
    plus row i itself: other captions of the same clip in the batch are not negatives.
    Cross-entropy is taken audio->text and text->audio, summed over anchors, divided by N.
    Build it from its ``Config`` or keyword fields: ``LogSoftmaxLoss(temperature=0.1)``.
    """

    class Config(StrictModel):
        name: Literal["LogSoftmaxLoss"] = "LogSoftmaxLoss"
        temperature: float = Field(0.07, gt=0)  # scores are divided by it: 0 would give inf logits
        dist: Distance = "dot_product"

    def __init__(self, config: Config | None = None, **fields: object) -> None:
        super().__init__()
        self.config = configured(self.Config, config, fields)

    def forward(self, audio_embeds: torch.Tensor, text_embeds: torch.Tensor, audio_ids: torch.Tensor) -> torch.Tensor:
        """``audio_embeds``, ``text_embeds``: ``(N, E)`` row-aligned pairs; ``audio_ids``: ``(N,)`` clip of each row."""
        n = audio_embeds.size(0)
        # scores[i, j] = s(audio_i, text_j) / T, shape (N, N)
        scores = similarity(audio_embeds, text_embeds, self.config.dist) / self.config.temperature
        eye = torch.eye(n, dtype=torch.bool, device=scores.device)
        # candidates[i, j]: j is a negative of anchor i (different clip) or j is i itself
        candidates = (audio_ids[:, None] != audio_ids[None, :]) | eye
        masked_a2t = scores.masked_fill(~candidates, float("-inf"))  # anchor audio_i vs texts j
        masked_t2a = scores.T.masked_fill(~candidates, float("-inf"))  # anchor text_i vs audios j
        positive = scores.diagonal()
        loss_a2t = torch.logsumexp(masked_a2t, dim=1) - positive
        loss_t2a = torch.logsumexp(masked_t2a, dim=1) - positive
        return (loss_a2t + loss_t2a).sum() / n
