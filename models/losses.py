"""Contrastive losses for audio-text dual encoders, one registry (``criterion.name`` in the config).

Users' scripts call a loss as ``loss(audio_embeds, text_embeds, audio_ids)``: it scores every pair of
the batch and hands them to ``loss.from_pair_scores(scores, audio_ids)``, which divides by the
temperature and calls ``from_scores``. Training calls ``from_pair_scores`` with
``DualEncoderModel.forward``'s ``(B, B)`` cosines, which a text-aware pooling head computes pair by pair. A learnable
temperature lives with the model (``DualEncoderModel.logit_scale``) and is passed in as
``logit_scale``, replacing the loss's fixed ``1 / temperature``.

``SequenceContrastiveLoss`` scores sequences instead, position by position: its pair scores are ``(L, N, N)``.
"""

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


class LossConfig(StrictModel):
    """What every loss's ``Config`` holds; each loss narrows ``name`` to its own class name."""

    name: str
    temperature: float = Field(0.07, gt=0)  # scores are divided by it: 0 would give inf logits


class ContrastiveLossConfig(LossConfig):
    """A loss on one embedding per side, scored by ``dist``."""

    dist: Distance = "dot_product"


class ContrastiveLoss(nn.Module):
    """What the losses share: the config, pair scoring and the fixed or learnable temperature."""

    Config: type[LossConfig]

    def __init__(self, config: LossConfig | None = None, **fields: object) -> None:
        super().__init__()
        self.config = configured(self.Config, config, fields)

    def forward(
        self,
        audio_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        audio_ids: torch.Tensor,
        logit_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``audio_embeds``, ``text_embeds``: ``(N, E)`` row-aligned pairs; ``audio_ids``: ``(N,)`` clip of
        each row; ``logit_scale``: a learnable ``1 / temperature`` (scalar) that replaces the config's."""
        scores = similarity(audio_embeds, text_embeds, self.config.dist)  # (N, N): s(audio_i, text_j)
        return self.from_pair_scores(scores, audio_ids, logit_scale)

    def from_pair_scores(
        self, scores: torch.Tensor, audio_ids: torch.Tensor, logit_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss of ``(N, N)`` unscaled pair scores (``DualEncoderModel.forward``'s cosines), divided by the
        temperature or multiplied by a learnable ``logit_scale``."""
        return self.from_scores(self.scaled(scores, logit_scale), audio_ids)

    def scaled(self, scores: torch.Tensor, logit_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled pair scores divided by the temperature, or multiplied by a learnable ``logit_scale``."""
        return scores / self.config.temperature if logit_scale is None else scores * logit_scale

    def from_scores(self, scores: torch.Tensor, audio_ids: torch.Tensor) -> torch.Tensor:
        """The loss of a ``(N, N)`` matrix of scaled pair scores (row: audio i, column: text j, the
        diagonal the given pairs) whose rows came from clips ``audio_ids`` ``(N,)``."""
        raise NotImplementedError


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """salsa's stage-2 loss: the cross-entropy between the student's scaled pair scores ``logits`` ``(N, N)`` (row:
    audio i, column: text j) and the softmax of the teachers' ``teacher_logits`` (their averaged cosines divided by
    the temperature), over the texts of each audio row and over the audios of each text column, each averaged over
    its N anchors, then the two averaged. The targets carry no gradient."""
    targets = teacher_logits.detach()
    a2t = -(targets.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()
    t2a = -(targets.softmax(dim=0) * logits.log_softmax(dim=0)).sum(dim=0).mean()
    return (a2t + t2a) / 2


@LOSSES.register
class LogSoftmaxLoss(ContrastiveLoss):
    """Symmetric InfoNCE loss of the DCASE 2023 Task 6B baseline, vectorised.

    For anchor pair i the candidates are every row whose audio clip differs from row i's,
    plus row i itself: other captions of the same clip in the batch are not negatives.
    Cross-entropy is taken audio->text and text->audio, summed over anchors, divided by N.
    Build it from its ``Config`` or keyword fields: ``LogSoftmaxLoss(temperature=0.1)``.
    """

    class Config(ContrastiveLossConfig):
        name: Literal["LogSoftmaxLoss"] = "LogSoftmaxLoss"

    def from_scores(self, scores: torch.Tensor, audio_ids: torch.Tensor) -> torch.Tensor:
        n = scores.size(0)
        eye = torch.eye(n, dtype=torch.bool, device=scores.device)
        # candidates[i, j]: j is a negative of anchor i (different clip) or j is i itself
        candidates = (audio_ids[:, None] != audio_ids[None, :]) | eye
        masked_a2t = scores.masked_fill(~candidates, float("-inf"))  # anchor audio_i vs texts j
        masked_t2a = scores.T.masked_fill(~candidates, float("-inf"))  # anchor text_i vs audios j
        positive = scores.diagonal()
        loss_a2t = torch.logsumexp(masked_a2t, dim=1) - positive
        loss_t2a = torch.logsumexp(masked_t2a, dim=1) - positive
        return (loss_a2t + loss_t2a).sum() / n


@LOSSES.register
class ClipLoss(ContrastiveLoss):
    """CLIP's symmetric cross-entropy (open_clip's definition): row i's positive is column i and every
    other column of the batch is a negative, audio->text and text->audio, each averaged over the
    rows, then the two averaged. A batch holding two captions of one clip therefore counts the
    other caption as a negative; ``LogSoftmaxLoss`` does not, which is why it is the Clotho default.
    """

    class Config(ContrastiveLossConfig):
        name: Literal["ClipLoss"] = "ClipLoss"  # 0.07 is also CLIP's initial temperature

    def from_scores(self, scores: torch.Tensor, audio_ids: torch.Tensor) -> torch.Tensor:
        targets = torch.arange(scores.size(0), device=scores.device)  # (N,): the diagonal
        return (F.cross_entropy(scores, targets) + F.cross_entropy(scores.T, targets)) / 2


@LOSSES.register
class SequenceContrastiveLoss(ContrastiveLoss):
    """Contrastive loss between sequences, position by position (audio2img: an audio tower's output sequence
    trained towards the frozen CLIP text encoder's hidden states, a Stable Diffusion pipeline's ``prompt_embeds``).

    For audio sequences ``A`` and caption target sequences ``T``, both ``(N, L, W)`` with row i of each a pair, at
    every position ``l`` audio i's ``A[i, l]`` is scored by cosine against ``T[j, l]`` for every caption j of the
    batch, divided by the temperature, and cross-entropy picks caption i; the loss is the mean over the ``L``
    positions and the ``N`` rows. Audio -> text only (the targets are frozen), and, as in ``ClipLoss``, every
    other row is a negative, another caption of the same clip too: ``audio_ids`` is accepted for the common
    interface and not used. ``from_pair_scores`` takes the ``(L, N, N)`` unscaled per-position cosines
    ``scores[l, i, j] = cos(A[i, l], T[j, l])`` (``DualEncoderModel.forward`` gives them for a sequence head).

    Always cosine: the ``dist`` of the one-vector losses does not apply (a CLIP hidden state's norm varies wildly
    between positions, the first one's most of all), so its ``Config`` has no ``dist`` key and a config that
    sets one is refused by name. Positions where every caption has the same target (the first, the start token
    that CLIP's causal attention lets see only itself) add a constant ``log N`` and no gradient.
    """

    class Config(LossConfig):
        name: Literal["SequenceContrastiveLoss"] = "SequenceContrastiveLoss"
        temperature: float = Field(0.15, gt=0)

    def forward(
        self,
        audio_seqs: torch.Tensor,
        text_seqs: torch.Tensor,
        audio_ids: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``audio_seqs``, ``text_seqs``: ``(N, L, W)`` row-aligned pairs; ``audio_ids``: ``(N,)`` (unused);
        ``logit_scale``: a learnable ``1 / temperature`` (scalar) that replaces the config's -> scalar loss."""
        if audio_seqs.shape != text_seqs.shape:
            raise ValueError(f"audio and text sequences differ in shape: {audio_seqs.shape} vs {text_seqs.shape}")
        audio, text = F.normalize(audio_seqs, dim=-1), F.normalize(text_seqs, dim=-1)
        scores = torch.einsum("ilw,jlw->lij", audio, text)  # (L, N, N): cos(A[i, l], T[j, l])
        return self.from_pair_scores(scores, audio_ids, logit_scale)

    def from_scores(self, scores: torch.Tensor, audio_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of ``(L, N, N)`` scaled per-position scores (a ``(N, N)`` matrix is one position)."""
        n = scores.size(-1)
        logits = scores.reshape(-1, n)  # (L * N, N): one row per (position, audio), over the batch's captions
        targets = torch.arange(n, device=scores.device).repeat(logits.size(0) // n)  # (L * N,): caption i of row i
        return F.cross_entropy(logits, targets)  # the mean over positions and rows
