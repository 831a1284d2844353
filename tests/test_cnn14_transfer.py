"""PANNs Cnn14 -> CNN14Encoder, on a checkpoint built with PANNs' exact key layout and shapes."""

import pytest
import torch

from models import CNN14Encoder
from preprocessing.cnn14_transfer import transfer
from utils.errors import CheckpointError

PANNS_CHANNELS = [(1, 64), (64, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048)]


def panns_cnn14_state() -> dict:
    """The state dict of PANNs' Cnn14 (sample_rate 32000, window 1024, 64 mels, 527 classes), random values."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731

    def bn(prefix, n):
        return {
            f"{prefix}.weight": rand(n),
            f"{prefix}.bias": rand(n),
            f"{prefix}.running_mean": rand(n),
            f"{prefix}.running_var": rand(n).abs(),
            f"{prefix}.num_batches_tracked": torch.tensor(7),
        }

    state = {
        "spectrogram_extractor.stft.conv_real.weight": rand(513, 1, 1024),
        "spectrogram_extractor.stft.conv_imag.weight": rand(513, 1, 1024),
        "logmel_extractor.melW": rand(513, 64),
        **bn("bn0", 64),
    }
    for i, (c_in, c_out) in enumerate(PANNS_CHANNELS, start=1):
        state[f"conv_block{i}.conv1.weight"] = rand(c_out, c_in, 3, 3)
        state[f"conv_block{i}.conv2.weight"] = rand(c_out, c_out, 3, 3)
        state.update(bn(f"conv_block{i}.bn1", c_out))
        state.update(bn(f"conv_block{i}.bn2", c_out))
    state.update(
        {
            "fc1.weight": rand(2048, 2048),
            "fc1.bias": rand(2048),
            "fc_audioset.weight": rand(527, 2048),
            "fc_audioset.bias": rand(527),
        }
    )
    return state


def test_panns_checkpoint_transfers_into_cnn14_encoder(tmp_path):
    panns = panns_cnn14_state()
    torch.save({"model": panns, "iteration": 600000}, tmp_path / "Cnn14_mAP=0.431.pth")
    weights = transfer(tmp_path / "Cnn14_mAP=0.431.pth", tmp_path / "cnn14.safetensors")

    encoder = CNN14Encoder(n_mels=64, weight=weights)
    loaded = encoder.state_dict()
    for key in ("bn0.running_var", "conv_block1.conv1.weight", "conv_block6.bn2.bias", "fc1.weight"):
        assert torch.equal(loaded[key], panns[key])
    assert not any(k.startswith(("fc_audioset", "spectrogram_extractor", "logmel_extractor")) for k in loaded)


def test_wrong_checkpoint_is_rejected_with_the_keys(tmp_path):
    panns = panns_cnn14_state()
    panns["conv_block2.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    del panns["fc1.bias"]
    torch.save({"model": panns}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing fc1\.bias"):
        transfer(tmp_path / "bad.pth", tmp_path / "out.safetensors")
    del panns["fc_audioset.weight"]
    panns["fc1.bias"] = torch.zeros(2048)
    torch.save({"model": panns}, tmp_path / "bad.pth")
    with pytest.raises(
        CheckpointError,
        match=r"conv_block2\.conv1\.weight: \(128, 64, 5, 5\) in the checkpoint, \(128, 64, 3, 3\) in the model",
    ):
        transfer(tmp_path / "bad.pth", tmp_path / "out.safetensors")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="under 'model'"):
        transfer(tmp_path / "other.pth", tmp_path / "out.safetensors")
