"""Pooling heads: an audio encoder's frames ``(B, T, D)`` and valid lengths ``(B,)`` -> one vector per clip, or,
text-aware, one per (caption, clip) pair. One registry (``model.pooling.name`` in the config).

Every audio encoder hands its frames to one of these, so "mean pooling or attention?" is a config value like any
other. Padded frames never reach a result: each head masks them out, so a clip's embedding does not depend on
the clips it is batched with.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from models.registry import Registry, StrictModel, configured

POOLING: Registry[type[nn.Module]] = Registry("pooling head")

Dropout = Annotated[float, Field(ge=0, lt=1)]


def valid_frames(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """``(B,)`` valid lengths -> ``(B, steps)`` bool mask of the valid frames (a prefix of each row)."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean of ``frames`` ``(B, T, D)`` over the first ``lengths`` ``(B,)`` frames of each row -> ``(B, D)``."""
    valid = valid_frames(lengths, frames.size(1)).to(frames.dtype)
    return (frames * valid[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(frames.dtype)


class PoolingHead(nn.Module):
    """What the heads share: ``text_aware`` heads are called with the captions too (``pair pooling``);
    ``sequence`` heads give a sequence of vectors per clip ``(B, positions, D)`` instead of one ``(B, D)``."""

    text_aware: ClassVar[bool] = False
    sequence: ClassVar[bool] = False


@POOLING.register
class MeanPooling(PoolingHead):
    """The mean over the valid frames (the ``transformers`` towers' default)."""

    class Config(StrictModel):
        name: Literal["MeanPooling"] = "MeanPooling"

    def __init__(self, config: Config | None = None, *, dim: int) -> None:
        super().__init__()
        self.config = configured(self.Config, config, {})

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return masked_mean(frames, lengths)


@POOLING.register
class MeanMaxPooling(PoolingHead):
    """Mean plus maximum over the valid frames, per channel: PANNs' global pooling (the CNNs' default; CNN14's
    embedding is its ``fc1`` on this)."""

    class Config(StrictModel):
        name: Literal["MeanMaxPooling"] = "MeanMaxPooling"

    def __init__(self, config: Config | None = None, *, dim: int) -> None:
        super().__init__()
        self.config = configured(self.Config, config, {})

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        valid = valid_frames(lengths, frames.size(1))[..., None]  # (B, T, 1)
        return masked_mean(frames, lengths) + frames.masked_fill(~valid, float("-inf")).amax(1)


@POOLING.register
class AttentionPooling(PoolingHead):
    """Single-head attention with a learned query: ``softmax(q . LN(f_t) W_k / sqrt(D))`` over the valid frames
    weighs the frames themselves, so the output keeps the encoder's width ``(B, D)``."""

    class Config(StrictModel):
        name: Literal["AttentionPooling"] = "AttentionPooling"
        attn_dropout: Dropout = 0.0

    def __init__(self, config: Config | None = None, *, dim: int, **fields: object) -> None:
        super().__init__()
        self.config = configured(self.Config, config, fields)
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.norm = nn.LayerNorm(dim)
        self.w_k = nn.Linear(dim, dim)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        logits = self.w_k(self.norm(frames)) @ self.query / math.sqrt(frames.size(-1))  # (B, T)
        logits = logits.masked_fill(~valid_frames(lengths, frames.size(1)), float("-inf"))
        weights = F.dropout(logits.softmax(-1), self.config.attn_dropout, self.training)
        return torch.einsum("bt,btd->bd", weights, frames)


@POOLING.register
class TextAwareAttentionPooling(PoolingHead):
    """Text-aware attention pooling (salsa/TAP): each caption picks the frames of each clip that matter to it.

    For caption ``t`` ``(dim,)`` and the frames ``F`` ``(T, dim)`` of a clip, with one LayerNorm ``LN`` (as the
    reference implementation shares it) and ``D_p = proj_dim``::

        Q = LN(t) W_q,  K = LN(F) W_k,  V = LN(F) W_v,  z = LN(softmax(Q K^T / sqrt(D_p)) V W_o)

    single-headed, padded frames masked out of the softmax, dropout on the attention weights (``attn_dropout``)
    and on ``z`` (``proj_dropout``). ``tap(frames, lengths, text)`` gives every clip as seen by every caption,
    ``(B_t, B_a, dim)``; a pair's score is the cosine between its ``z`` and the caption.
    """

    text_aware: ClassVar[bool] = True

    class Config(StrictModel):
        name: Literal["TextAwareAttentionPooling"] = "TextAwareAttentionPooling"
        proj_dim: PositiveInt | None = None  # D_p (salsa: 2048); None: the shared space's width
        attn_dropout: Dropout = 0.1
        proj_dropout: Dropout = 0.0
        # bound on the intermediates of one chunk of pairs when a whole split is scored (xmodal_scores, validation)
        chunk_mb: PositiveFloat = 256.0

    def __init__(
        self,
        dim: int,
        proj_dim: int | None = None,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.0,
        *,
        config: Config | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            config = self.Config(proj_dim=proj_dim, attn_dropout=attn_dropout, proj_dropout=proj_dropout)
        elif (proj_dim, attn_dropout, proj_dropout) != (None, 0.1, 0.0):
            raise TypeError("TextAwareAttentionPooling takes its settings as arguments or as config=, not both")
        self.config = config
        proj_dim = config.proj_dim or dim
        self.layer_norm = nn.LayerNorm(dim)
        self.w_q, self.w_k, self.w_v = (nn.Linear(dim, proj_dim) for _ in range(3))
        self.w_o = nn.Linear(proj_dim, dim)

    @classmethod
    def from_config(cls, config: Config, *, dim: int) -> TextAwareAttentionPooling:
        """The registry's constructor: ``model.pooling`` and the width of the shared space."""
        return cls(dim, config=config)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``frames`` ``(B_a, T, dim)``, ``lengths`` ``(B_a,)``, ``text`` ``(B_t, dim)`` -> ``(B_t, B_a, dim)``."""
        return self.attend(self.prepare(frames), lengths, text)

    def prepare(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What each clip brings to every pair, computed once per clip: ``(B_a, T, dim)`` keys with the query
        projection folded in, ``(B_a, T)`` their dot product with the query's bias, ``(B_a, T, dim)`` values."""
        frames = self.layer_norm(frames)
        keys = self.w_k(frames)  # (B_a, T, D_p)
        # q . k = LN(t) . (W_q^T k) + b_q . k: with W_q folded into the keys a pair costs dim per frame, not D_p.
        # (A V) W_o = A (V W_o) likewise: W_o meets the B_a * T frames once, not the B_t * B_a pooled values.
        return keys @ self.w_q.weight, keys @ self.w_q.bias, self.w_v(frames) @ self.w_o.weight.T

    def attend(
        self, prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lengths: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """``prepare``'s clips, their ``(B_a,)`` lengths and ``(B_t, dim)`` captions -> ``(B_t, B_a, dim)``."""
        keys, key_bias, values = prepared
        logits = torch.einsum("qd,atd->qat", self.layer_norm(text), keys) + key_bias  # (B_t, B_a, T)
        logits = logits.masked_fill(~valid_frames(lengths, keys.size(1))[None], float("-inf"))
        weights = F.dropout(
            (logits / math.sqrt(self.w_q.out_features)).softmax(-1), self.config.attn_dropout, self.training
        )
        # W_o's bias is added after the weighting, which keeps the fold exact when dropout makes the weights no
        # longer sum to one
        pooled = torch.einsum("qat,atd->qad", weights, values) + self.w_o.bias  # (B_t, B_a, dim)
        return F.dropout(self.layer_norm(pooled), self.config.proj_dropout, self.training)

    def chunk_sizes(self, n_audio: int, n_text: int, frames: int) -> tuple[int, int]:
        """``(clips, captions)`` per chunk of a whole split's scoring, so that one chunk's intermediates (float32)
        stay within ``chunk_mb`` for clips of ``frames`` frames: ``prepare`` holds ``2 * D_p + 3 * dim`` numbers per
        frame of each clip, each (caption, clip) pair its attention logits and weights and three ``dim``-wide
        vectors. The clips take at most half the budget, the captions beside them the rest: few, large chunks
        whichever of the two dominates."""
        dim, proj = self.w_o.out_features, self.w_q.out_features
        per_clip, per_pair = 4 * frames * (2 * proj + 3 * dim), 4 * (2 * frames + 3 * dim)
        budget = self.config.chunk_mb * 2**20
        clips = max(1, min(n_audio, int(budget / 2 // per_clip)))
        captions = max(1, min(n_text, int((budget - clips * per_clip) // (clips * per_pair))))
        return clips, captions


@POOLING.register
class SequenceResampling(PoolingHead):
    """Each clip's valid frames linearly resampled to a fixed number of positions ``(B, positions, D)``: an audio
    sequence to set against a text encoder's (77 for CLIP, a Stable Diffusion pipeline's ``prompt_embeds``).

    Exactly ``F.interpolate(frames[b, :n].T[None], size=positions, mode="linear", align_corners=False)`` clip by
    clip, in one batched gather: output position k reads the clip at ``s = (k + 1/2) n / positions - 1/2``
    (clamped at 0), mixing its frames ``floor(s)`` and ``floor(s) + 1`` (clamped to the last valid frame). Only
    valid frames are ever read, so padding does not matter; a 1-frame clip repeats its frame.
    """

    sequence: ClassVar[bool] = True

    class Config(StrictModel):
        name: Literal["SequenceResampling"] = "SequenceResampling"
        positions: PositiveInt = 77  # CLIP's text length

    def __init__(self, config: Config | None = None, *, dim: int, **fields: object) -> None:
        super().__init__()
        self.config = configured(self.Config, config, fields)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``frames`` ``(B, T, D)``, ``lengths`` ``(B,)`` valid frames -> ``(B, positions, D)``."""
        n = lengths.to(frames.device).clamp(min=1)  # (B,)
        # source coordinates computed as PyTorch's kernel does: scale = n / positions, in float32 (its opmath type)
        # for every floating dtype but float64, whose coordinates it computes in float64
        coords = torch.float64 if frames.dtype == torch.float64 else torch.float32
        scale = n.to(coords) / self.config.positions  # (B,)
        k = torch.arange(self.config.positions, device=frames.device, dtype=coords)
        source = (scale[:, None] * (k[None, :] + 0.5) - 0.5).clamp(min=0)  # (B, P)
        left = source.long().clamp(max=n[:, None] - 1)  # (B, P): the floor, as source >= 0
        right = (left + 1).clamp(max=n[:, None] - 1)
        weight = (source - left).to(frames.dtype)[..., None]  # (B, P, 1): the right frame's share
        d = frames.size(-1)
        left_frames = frames.gather(1, left[..., None].expand(-1, -1, d))  # (B, P, D)
        right_frames = frames.gather(1, right[..., None].expand(-1, -1, d))
        # lerp is exact where both frames are one (a 1-frame clip, the last position): the frame itself
        return torch.lerp(left_frames, right_frames, weight)
