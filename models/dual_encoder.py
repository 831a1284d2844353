"""The dual encoder: audio and text towers projected into one L2-normalised embedding space."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from models.audio_encoders import AUDIO_ENCODERS
from models.heads import PROJECTIONS, LinearProjection, MLPProjection
from models.hf_audio import PretrainedAudioTower
from models.hf_text import PretrainedTextTower
from models.pooling import POOLING
from models.pretrained import load_pretrained
from models.registry import StrictModel
from models.text_encoders import TEXT_ENCODERS
from utils.errors import ConfigError


class LearnableTemperature(StrictModel):
    """A temperature trained with the model, as CLIP's: stored as ``log(1 / T)``, so the logit scale
    ``1 / T`` stays positive, and clamped at ``max_logit_scale`` (CLIP: 100, i.e. T >= 0.01)."""

    init: PositiveFloat = 0.07  # CLIP's and open_clip's starting temperature
    max_logit_scale: float = Field(100.0, gt=1)


class DualEncoderModel(nn.Module):
    """Audio tower, pooling head and text tower, each tower followed by a projection head to ``embed_dim``.

    Outputs are L2-normalised, so a dot product between them is a cosine similarity; the
    loss's temperature, or the model's own learnable ``logit_scale``, turns those similarities
    into logits. With a text-aware pooling head a clip has no embedding of its own: the head pools the
    clip's projected frames for each caption, and ``pair_scores`` scores every (clip, caption) pair through it.
    """

    class Config(StrictModel):
        """The ``model`` section: the shared space's width and one registered encoder per tower."""

        name: Literal["DualEncoderModel"] = "DualEncoderModel"
        embed_dim: PositiveInt  # no default: the width of the shared space is each experiment's choice
        audio_enc: AUDIO_ENCODERS.config_union()
        text_enc: TEXT_ENCODERS.config_union()
        projection: PROJECTIONS.config_union() = LinearProjection.Config()  # the head of each tower
        # how the audio encoder's frames become a clip vector; None: the encoder's own (CNNs: MeanMaxPooling, as
        # PANNs; transformers towers: MeanPooling). TextAwareAttentionPooling pools projected frames per caption.
        pooling: POOLING.config_union() | None = None
        # None: the loss's fixed criterion.temperature; else a temperature trained with the model
        learnable_temperature: LearnableTemperature | None = None
        # a released CLAP checkpoint (hub id, id@revision or folder) whose projections and logit scale start the
        # heads (MLPProjection, embed_dim = its projection_dim) and the learnable temperature: with the CLAP
        # towers of the same id it is the whole released model, zero-shot before any training
        init_from: str | None = None

    def __init__(
        self,
        audio_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int,
        projection: StrictModel | None = None,
        learnable_temperature: LearnableTemperature | None = None,
        pooling: StrictModel | None = None,
    ) -> None:
        super().__init__()
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        pooling = pooling or POOLING.get(audio_encoder.default_pooling).Config()
        self.text_aware = POOLING.get(pooling.name).text_aware
        # a sequence head (audio2img) gives each clip a sequence (B, L, W) to align position by position with a
        # sequence text tower's (CLIPTextEncoder's hidden states): both left unnormalised, as a pipeline takes them
        self.sequence = POOLING.get(pooling.name).sequence
        # a text-aware head meets the captions in the shared space; the others pool the encoder's own frames
        self.pooling = POOLING.build(pooling, dim=embed_dim if self.text_aware else audio_encoder.frame_dim)
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
        """Trainable parameters by part, for per-part learning rates: ``heads`` (projections, adapters, pooling),
        ``audio_encoder``, ``text_encoder`` and ``logit_scale``; frozen parameters and empty parts left out."""
        # a tower's trainable adapter goes with the heads: both are new layers on pretrained features
        adapter = getattr(self.audio_encoder, "adapter", nn.Identity())
        adapter_ids = {id(p) for p in adapter.parameters()}
        parts = {
            "heads": [*adapter.parameters(), *self.audio_proj.parameters(), *self.text_proj.parameters()],
            "pooling": list(self.pooling.parameters()),
            "audio_encoder": [p for p in self.audio_encoder.parameters() if id(p) not in adapter_ids],
            "text_encoder": list(self.text_encoder.parameters()),
            "logit_scale": [self.logit_scale] if self.max_logit_scale is not None else [],
        }
        trainable = {name: [p for p in params if p.requires_grad] for name, params in parts.items()}
        return {name: params for name, params in trainable.items() if params}

    def audio_frames(self, *inputs: torch.Tensor, **named: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio tower's inputs -> the audio side of pair scoring: ``(B, T, embed_dim)`` and valid lengths
        ``(B,)``. That is the clip's unit vector ``(B, 1, embed_dim)`` (lengths 1) for heads that ignore the text,
        and the projected frames for a text-aware head, which pools them per caption (``pair_scores``).
        Inputs: ``(B, T, n_mels)`` padded log-mels and ``(B,)`` frame counts for the CNNs, model inputs or
        cached frames for the ``transformers`` towers."""
        frames, lengths = self.audio_encoder(*inputs, **named)  # (B, T', frame_dim), (B,)
        if self.text_aware:
            return self.audio_proj(self.audio_encoder.embed(frames)), lengths
        pooled = self.audio_proj(self.audio_encoder.embed(self.pooling(frames, lengths)))  # (B, [L,] embed_dim)
        if self.sequence:
            return pooled, torch.full_like(lengths, pooled.size(1))
        return F.normalize(pooled, dim=-1)[:, None], torch.ones_like(lengths)

    def encode_audio(self, *inputs: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        """The audio tower's inputs (see ``audio_frames``) -> ``(B, embed_dim)`` unit vectors, or with a sequence
        head the sequences ``(B, L, embed_dim)`` (audio2img: a Stable Diffusion pipeline's ``prompt_embeds``)."""
        if self.text_aware:
            raise TypeError(
                f"{type(self.pooling).__name__} pools each clip per caption, so a clip has no embedding of its own: "
                "score pairs with audio_frames and pair_scores (or score_all)"
            )
        audio = self.audio_frames(*inputs, **named)[0]
        return audio if self.sequence else audio[:, 0]

    def encode_text(self, *inputs: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        """The text tower's inputs -> ``(B, embed_dim)`` unit vectors: ``(B, D)`` sentence embeddings (or a
        frozen tower's cached vectors), or tokens ``input_ids``/``attention_mask`` ``(B, L)``. A sequence tower's
        ``(B, L, embed_dim)`` hidden states are left unnormalised: they are the targets as a pipeline takes them."""
        text = self.text_proj(self.text_encoder(*inputs, **named))
        return text if getattr(self.text_encoder, "sequence", False) else F.normalize(text, dim=-1)

    def pair_scores(self, audio: torch.Tensor, lengths: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine scores ``(B_a, B_t)`` of every pair of ``audio_frames`` output ``(B_a, T, E)``, ``(B_a,)`` and
        ``encode_text`` output ``(B_t, E)``: through the text-aware head, the cosine of each pair's pooled clip
        with its caption. With a sequence head: per-position cosines ``(L, B_a, B_t)`` of ``(B_a, L, E)`` and
        ``(B_t, L, E)`` sequences (``SequenceContrastiveLoss`` takes them)."""
        if self.sequence:
            return torch.einsum("alw,tlw->lat", F.normalize(audio, dim=-1), F.normalize(text, dim=-1))
        if not self.text_aware:
            return audio[:, 0] @ text.T
        return caption_cosines(self.pooling(audio, lengths, text), text)

    def score_all(self, audio: torch.Tensor, lengths: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``pair_scores`` of a whole split ``(n_audio, n_captions)``, in chunks of pairs that keep a text-aware
        head's intermediates within its ``chunk_mb`` (a Python loop over chunks, never over pairs). Sequences are
        retrieved by their mean over positions."""
        if self.sequence:
            return F.normalize(audio.mean(1), dim=-1) @ F.normalize(text.mean(1), dim=-1).T
        if not self.text_aware:
            return self.pair_scores(audio, lengths, text)
        n_audio, n_text = len(audio), len(text)
        clips, captions = self.pooling.chunk_sizes(n_audio, n_text, audio.size(1))
        scores = torch.empty(n_audio, n_text, device=audio.device)
        for a in range(0, n_audio, clips):
            longest = int(lengths[a : a + clips].max())  # a chunk's frames padded only to its own longest clip
            prepared, chunk_lengths = self.pooling.prepare(audio[a : a + clips, :longest]), lengths[a : a + clips]
            for t in range(0, n_text, captions):
                chunk = text[t : t + captions]
                scores[a : a + clips, t : t + captions] = caption_cosines(
                    self.pooling.attend(prepared, chunk_lengths, chunk), chunk
                )
        return scores

    def forward(
        self,
        audio: dict[str, torch.Tensor],
        text: dict[str, torch.Tensor],
        gather: Callable[..., tuple[torch.Tensor, ...]] | None = None,
    ) -> torch.Tensor:
        """A batch's named audio and text inputs -> cosine scores ``(B, B)`` of every (clip, caption) pair, row i
        and column i the batch's i-th pair (with a sequence head ``(L, B, B)``, one matrix per position).
        ``gather`` (data-parallel training) turns this worker's ``audio_frames``
        and text embeddings into the global batch's, so the pairs are scored across workers."""
        frames, lengths = self.audio_frames(**audio)
        text_embeds = self.encode_text(**text)
        if gather is not None:
            frames, lengths, text_embeds = gather(frames, lengths, text_embeds)
        return self.pair_scores(frames.float(), lengths, text_embeds.float())


def caption_cosines(pooled: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(B_t, B_a, E)`` clips pooled per caption and the ``(B_t, E)`` unit captions -> cosines ``(B_a, B_t)``."""
    return torch.einsum("tae,te->at", F.normalize(pooled, dim=-1), text)


def create_model(
    config: DualEncoderModel.Config,
    n_mels: int | None = None,
    text_dim: int | None = None,
    audio_dim: int | None = None,
    backbones: bool = True,
) -> DualEncoderModel:
    """Build a ``DualEncoderModel`` from the ``model`` config section.

    The sizes come from the data, so one config works for any features and any cached tower: ``n_mels``
    (log-mel bands, for the CNNs), ``text_dim`` (the width of precomputed caption vectors) and
    ``audio_dim`` (of a frozen audio backbone's cached frames). With ``backbones=False`` frozen
    ``transformers`` backbones are not loaded at all: training reads their cached outputs.
    """
    audio_enc, text_enc = config.audio_enc, config.text_enc
    audio_cls, text_cls = AUDIO_ENCODERS.get(audio_enc.name), TEXT_ENCODERS.get(text_enc.name)
    if issubclass(audio_cls, PretrainedAudioTower):
        audio = audio_cls(audio_enc, frame_dim=audio_dim, load_backbone=backbones)
    else:
        audio = audio_cls(audio_enc, n_mels=n_mels)
    if issubclass(text_cls, PretrainedTextTower):
        text = text_cls(text_enc, in_dim=text_dim, load_backbone=backbones)
    else:
        text = text_cls(text_enc, in_dim=text_dim)
    model = DualEncoderModel(
        audio, text, config.embed_dim, config.projection, config.learnable_temperature, config.pooling
    )
    if config.init_from is not None:
        init_from_clap(model, config.init_from)
    return model


def init_from_clap(model: DualEncoderModel, model_id: str) -> None:
    """Copy a released ``ClapModel``'s audio and text projections (``linear1``, ReLU, ``linear2``) into the
    model's ``MLPProjection`` heads and its text-to-audio logit scale into ``logit_scale``."""
    from transformers import ClapModel

    clap = load_pretrained(ClapModel.from_pretrained, model_id, "model.init_from")
    if model.max_logit_scale is None:
        raise ConfigError("model.init_from needs model.learnable_temperature: it starts from the checkpoint's")
    for head, released in ((model.audio_proj, clap.audio_projection), (model.text_proj, clap.text_projection)):
        first, last = released.linear1, released.linear2
        if not isinstance(head, MLPProjection) or (head[0].weight.shape, head[3].weight.shape) != (
            first.weight.shape,
            last.weight.shape,
        ):
            raise ConfigError(
                f"model.init_from: {model_id!r} has {first.in_features} -> {first.out_features} -> "
                f"{last.out_features} MLP projections; set model.projection to MLPProjection and model.embed_dim "
                f"to {last.out_features}, with CLAP towers of the same id"
            )
        with torch.no_grad():
            head[0].load_state_dict(first.state_dict())
            head[3].load_state_dict(last.state_dict())
    with torch.no_grad():
        # CLAP scales text->audio and audio->text logits separately; one scale serves both here
        model.logit_scale.copy_(clap.logit_scale_t.clamp(max=math.log(model.max_logit_scale)))
