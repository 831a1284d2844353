import pytest
import torch
import torch.nn.functional as F

from models import CNN14Encoder, DualEncoderModel, SentBERTBaseEncoder, SmallCNNEncoder, create_model
from models.pooling import MeanMaxPooling


def panns_cnn14_embedding(encoder: CNN14Encoder, logmels: torch.Tensor) -> torch.Tensor:
    """PANNs' own Cnn14 forward from its log-mels to its 2048-d ``embedding`` (in eval mode), written from PANNs'
    definition: bn0 over mel bands, six conv blocks (2x2 average pooling, none after the last), the mean over
    frequency, then the max plus the mean over time, then ``relu(fc1)``."""
    x = encoder.bn0(logmels[:, None].transpose(1, 3)).transpose(1, 3)  # (B, 1, T, M)
    for i in range(1, 7):
        block = getattr(encoder, f"conv_block{i}")
        x = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))))
        x = F.avg_pool2d(x, 2) if i < 6 else x
    x = x.mean(dim=3)  # (B, C, T')
    return F.relu(encoder.fc1(x.max(dim=2).values + x.mean(dim=2)))


def test_cnn14_gives_frames_and_its_panns_embedding_after_mean_max_pooling():
    torch.manual_seed(0)
    encoder = CNN14Encoder(n_mels=64).eval()
    for module in encoder.modules():  # running statistics away from 0/1, so bn0 and the blocks matter
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    logmels = torch.randn(2, 96, 64)
    with torch.no_grad():
        frames, lengths = encoder(logmels, torch.tensor([96, 96]))
        assert frames.shape == (2, 3, 2048) and lengths.tolist() == [3, 3]  # 5 poolings of 2: 96 -> 3 frames
        embedding = encoder.embed(MeanMaxPooling(dim=2048)(frames, lengths))
        assert torch.allclose(embedding, panns_cnn14_embedding(encoder, logmels), atol=1e-4)


def test_padding_does_not_change_a_clip_embedding():
    torch.manual_seed(0)
    encoder = SmallCNNEncoder(n_mels=16, channels=[4, 8, 8], out_dim=8).eval()
    pool = MeanMaxPooling(dim=8)
    clip = torch.randn(1, 40, 16)
    alone = pool(*encoder(clip, torch.tensor([40])))
    padded = torch.cat([clip, torch.randn(1, 24, 16) * 100], dim=1)  # loud garbage in the padding
    assert torch.allclose(alone, pool(*encoder(padded, torch.tensor([40]))), atol=1e-5)


def test_dual_encoder_outputs_unit_vectors():
    config = DualEncoderModel.Config(
        embed_dim=12,
        audio_enc={"name": "SmallCNNEncoder", "channels": [4, 8], "out_dim": 16},
        text_enc={"name": "SentBERTBaseEncoder"},
    )
    model = create_model(config, n_mels=16, text_dim=10).eval()
    assert isinstance(model, DualEncoderModel) and isinstance(model.text_encoder, SentBERTBaseEncoder)
    audio_inputs = {"logmels": torch.randn(3, 30, 16), "lengths": torch.tensor([30, 20, 10])}
    text_inputs = {"text_embeds": torch.randn(3, 10)}
    audio, text = model.encode_audio(**audio_inputs), model.encode_text(**text_inputs)
    assert audio.shape == text.shape == (3, 12)
    assert torch.allclose(audio.norm(dim=-1), torch.ones(3)) and torch.allclose(text.norm(dim=-1), torch.ones(3))
    assert torch.allclose(model(audio_inputs, text_inputs), audio @ text.T, atol=1e-6)  # (3, 3) pair cosines


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
