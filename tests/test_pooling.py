"""Pooling heads against plain implementations of their definitions, one clip (and one pair) at a time."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import DualEncoderModel, create_model
from models.losses import ClipLoss, LogSoftmaxLoss
from models.pooling import POOLING, AttentionPooling, MeanMaxPooling, MeanPooling, TextAwareAttentionPooling
from utils.errors import ConfigError

LENGTHS = torch.tensor([6, 1, 3, 4])


def padded_frames(dim: int = 8, garbage: float = 0.0) -> torch.Tensor:
    """``(4, 6, dim)`` frames whose padding (past ``LENGTHS``) holds ``garbage`` times random values."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(4, 6, dim, generator=g)
    pad = torch.arange(6)[None, :] >= LENGTHS[:, None]
    return torch.where(pad[..., None], garbage * torch.randn(4, 6, dim, generator=g), frames)


def tap_pair(tap: TextAwareAttentionPooling, frames: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The TAP equations for one caption ``(dim,)`` and one clip's valid frames ``(T, dim)``: ``Q = LN(t) W_q``,
    ``K = LN(F) W_k``, ``V = LN(F) W_v``, ``z = LN(softmax(Q K^T / sqrt(D_p)) V W_o)``."""
    ln = tap.layer_norm
    q, k, v = tap.w_q(ln(text)), tap.w_k(ln(frames)), tap.w_v(ln(frames))
    weights = torch.softmax(k @ q / math.sqrt(q.numel()), dim=0)  # (T,)
    return ln(tap.w_o(weights @ v))


def test_tap_equals_its_equations_pair_by_pair_and_ignores_padded_frames():
    torch.manual_seed(0)
    tap = TextAwareAttentionPooling(8, 16).eval()  # the contract: (dim, proj_dim), dropout 0.1 off in eval
    with torch.no_grad():  # a trained LayerNorm, not the identity it starts as
        tap.layer_norm.weight.uniform_(0.5, 1.5)
        tap.layer_norm.bias.normal_()
    assert tap.config.attn_dropout == 0.1 and tap.config.proj_dropout == 0.0
    text = torch.randn(3, 8)
    with torch.no_grad():
        out = tap(padded_frames(), LENGTHS, text)
        assert out.shape == (3, 4, 8)
        for t in range(3):
            for a in range(4):
                expected = tap_pair(tap, padded_frames()[a, : LENGTHS[a]], text[t])
                assert torch.allclose(out[t, a], expected, atol=1e-5), (t, a)
        assert torch.allclose(tap(padded_frames(garbage=1e3), LENGTHS, text), out, atol=1e-5)
        # one clip alone, cut to its valid frames, gets what it gets in the padded batch
        assert torch.allclose(tap(padded_frames()[2:3, :3], LENGTHS[2:3], text), out[:, 2:3], atol=1e-5)


def test_tap_dropout_is_on_the_attention_weights_and_the_output_in_training_only():
    torch.manual_seed(0)
    tap = TextAwareAttentionPooling(8, 4, attn_dropout=0.5, proj_dropout=0.5)
    frames, text = padded_frames(), torch.randn(2, 8)
    assert not torch.allclose(tap(frames, LENGTHS, text), tap(frames, LENGTHS, text))
    tap.eval()
    assert torch.equal(tap(frames, LENGTHS, text), tap(frames, LENGTHS, text))


def test_text_agnostic_heads_equal_their_definitions_clip_by_clip():
    torch.manual_seed(0)
    frames, noisy = padded_frames(), padded_frames(garbage=1e3)
    attention = AttentionPooling(dim=8).eval()
    heads = {
        MeanPooling(dim=8): lambda f: f.mean(0),
        MeanMaxPooling(dim=8): lambda f: f.mean(0) + f.max(0).values,
        attention: lambda f: torch.softmax(attention.w_k(attention.norm(f)) @ attention.query / math.sqrt(8), 0) @ f,
    }
    with torch.no_grad():
        for head, definition in heads.items():
            expected = torch.stack([definition(frames[a, :n]) for a, n in enumerate(LENGTHS)])
            assert torch.allclose(head(frames, LENGTHS), expected, atol=1e-5), type(head).__name__
            assert torch.allclose(head(noisy, LENGTHS), expected, atol=1e-5), type(head).__name__


def tap_model(chunk_mb: float = 256.0) -> DualEncoderModel:
    config = DualEncoderModel.Config(
        embed_dim=8,
        audio_enc={"name": "SmallCNNEncoder", "channels": [4, 8], "out_dim": 6},
        text_enc={"name": "SentBERTBaseEncoder"},
        pooling={"name": "TextAwareAttentionPooling", "proj_dim": 12, "chunk_mb": chunk_mb},
    )
    torch.manual_seed(0)
    return create_model(config, n_mels=16, text_dim=10).eval()


def test_a_tap_model_scores_every_pair_through_the_head_and_in_chunks_alike():
    model = tap_model()
    logmels, lengths = torch.randn(5, 40, 16), torch.tensor([40, 12, 30, 25, 8])
    text_inputs = torch.randn(7, 10)
    with torch.no_grad():
        frames, frame_lengths = model.audio_frames(logmels, lengths)  # (5, 10, 8): projected frames
        assert frames.shape == (5, 10, 8) and frame_lengths.tolist() == [10, 3, 7, 6, 2]
        text = model.encode_text(text_inputs)
        scores = model.pair_scores(frames, frame_lengths, text)  # (5, 7)
        for a in range(5):
            for t in range(7):
                pooled = tap_pair(model.pooling, frames[a, : frame_lengths[a]], text[t])
                assert torch.isclose(scores[a, t], F.cosine_similarity(pooled, text[t], dim=0), atol=1e-5)
        more = model.encode_text(torch.randn(30, 10))
        per_clip, per_pair = 4 * 10 * (2 * 12 + 3 * 8), 4 * (2 * 10 + 3 * 8)  # bytes: prepare, and each pair
        for budget, sizes in ((1e-4, (1, 1)), (4 * per_clip / 2**20, (2, 10))):  # one pair; 2 clips x 10 captions
            small = tap_model(chunk_mb=budget)
            assert small.pooling.chunk_sizes(5, 30, 10) == sizes
            clips, captions = sizes
            assert clips * per_clip + clips * captions * per_pair <= budget * 2**20 or sizes == (1, 1)
            expected = model.pair_scores(frames, frame_lengths, more)
            assert torch.allclose(small.score_all(frames, frame_lengths, more), expected, atol=1e-5)
        assert torch.allclose(model.score_all(frames, frame_lengths, text), scores, atol=1e-5)
        batch = model({"logmels": logmels[:5], "lengths": lengths[:5]}, {"text_embeds": text_inputs[:5]})
        assert torch.allclose(batch, scores[:, :5], atol=1e-5)
    with pytest.raises(TypeError, match="no embedding of its own"):
        model.encode_audio(logmels, lengths)


@pytest.mark.parametrize("loss", [LogSoftmaxLoss(), ClipLoss()])
def test_a_tap_model_trains_on_its_batch_pair_scores(loss):
    model = tap_model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    audio = {"logmels": torch.randn(6, 40, 16), "lengths": torch.tensor([40, 40, 32, 24, 16, 40])}
    text = {"text_embeds": torch.randn(6, 10)}
    ids = torch.arange(6)
    before = [p.detach().clone() for p in model.pooling.parameters()]
    losses = []
    for _ in range(20):
        value = loss.from_pair_scores(model(audio, text), ids)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.pooling.parameters()))  # TAP itself learns


def test_pooling_heads_are_one_registry_checked_by_the_config():
    assert POOLING.names() == [
        "AttentionPooling",
        "MeanMaxPooling",
        "MeanPooling",
        "SequenceResampling",
        "TextAwareAttentionPooling",
    ]
    with pytest.raises(KeyError, match="Did you mean 'MeanPooling'"):
        POOLING.get("MeanPoolng")
    with pytest.raises(ValueError, match="attn_dropout"):
        TextAwareAttentionPooling.Config(attn_dropout=1.0)
    from utils.config import load_config

    with pytest.raises(ConfigError, match="model.pooling"):
        load_config("conf.yaml", ["model.pooling.name=TAP"])
