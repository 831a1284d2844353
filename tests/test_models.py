import pytest
import torch

from models import CNN14Encoder, DualEncoderModel, SentBERTBaseEncoder, SmallCNNEncoder, create_model


def test_cnn14_encoder_shapes():
    encoder = CNN14Encoder(n_mels=64).eval()
    out = encoder(torch.randn(2, 100, 64), torch.tensor([100, 64]))
    assert out.shape == (2, 2048)


def test_padding_does_not_change_a_clip_embedding():
    torch.manual_seed(0)
    encoder = SmallCNNEncoder(n_mels=16, channels=[4, 8, 8], out_dim=8).eval()
    clip = torch.randn(1, 40, 16)
    alone = encoder(clip, torch.tensor([40]))
    padded = torch.cat([clip, torch.randn(1, 24, 16) * 100], dim=1)  # loud garbage in the padding
    assert torch.allclose(alone, encoder(padded, torch.tensor([40])), atol=1e-5)


def test_dual_encoder_outputs_unit_vectors():
    config = DualEncoderModel.Config(
        embed_dim=12,
        audio_enc={"name": "SmallCNNEncoder", "channels": [4, 8], "out_dim": 16},
        text_enc={"name": "SentBERTBaseEncoder"},
    )
    model = create_model(config, n_mels=16, text_dim=10)
    assert isinstance(model, DualEncoderModel) and isinstance(model.text_encoder, SentBERTBaseEncoder)
    audio, text = model(
        {"logmels": torch.randn(3, 30, 16), "lengths": torch.tensor([30, 20, 10])}, {"text_embeds": torch.randn(3, 10)}
    )
    assert audio.shape == text.shape == (3, 12)
    assert torch.allclose(audio.norm(dim=-1), torch.ones(3)) and torch.allclose(text.norm(dim=-1), torch.ones(3))


def test_frozen_cnn14_has_no_trainable_parameters():
    encoder = CNN14Encoder(n_mels=64, trainable=False)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_small_cnn_needs_channels():
    with pytest.raises(ValueError, match="channel"):
        SmallCNNEncoder(n_mels=8, channels=[])


def test_components_take_their_config_or_keyword_fields_checked_alike():
    config = SmallCNNEncoder.Config(channels=[4, 8], out_dim=8)
    from_config, from_fields = (
        SmallCNNEncoder(config, n_mels=16),
        SmallCNNEncoder(n_mels=16, channels=[4, 8], out_dim=8),
    )
    assert from_config.config == from_fields.config == config
    assert SmallCNNEncoder(n_mels=16).config == SmallCNNEncoder.Config()  # the defaults live in the Config only
    with pytest.raises(ValueError, match="out_dim"):
        SmallCNNEncoder(n_mels=16, out_dim=0)
    with pytest.raises(ValueError, match="dropout"):
        CNN14Encoder(n_mels=64, dropout=1.0)
    with pytest.raises(TypeError, match="not both|or keyword fields"):
        SmallCNNEncoder(config, n_mels=16, out_dim=4)
