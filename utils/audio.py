"""Audio decoding and log-mel features, shared by preprocessing and ``example/``."""
from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from utils.config import FeatureConfig

LOG_OFFSET = 1e-8  # keeps log() finite on digital silence


class AudioError(ValueError):
    """An audio file that cannot be turned into features; the message names the file."""


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate``; any format libsndfile reads (wav, flac, ogg, mp3)."""
    try:
        wave, file_rate = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as err:  # libsndfile raises several types for corrupt or non-audio data
        raise AudioError(f"{path}: cannot decode audio ({err})") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: contains no samples")
    wave = wave.mean(axis=1)
    if file_rate != sample_rate:
        wave = librosa.resample(wave, orig_sr=file_rate, target_sr=sample_rate, res_type="soxr_hq")
    return wave.astype(np.float32, copy=False)


def logmel(wave: np.ndarray, features: FeatureConfig, name: str = "audio") -> np.ndarray:
    """Log-mel energies ``(frames, n_mels)`` of a mono wave at ``features.sample_rate``."""
    win = round(features.sample_rate * features.window_ms / 1000)
    hop = round(features.sample_rate * features.hop_ms / 1000)
    if wave.shape[0] < win:
        raise AudioError(f"{name}: {wave.shape[0]} samples is shorter than one {features.window_ms:g} ms analysis window")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: samples contain NaN or inf")
    n_fft = 1 << (win - 1).bit_length()  # next power of two >= window
    mel = librosa.feature.melspectrogram(
        y=wave, sr=features.sample_rate, n_fft=n_fft, win_length=win, hop_length=hop, n_mels=features.n_mels,
        fmin=features.fmin, fmax=features.fmax, center=True, power=2.0,
    )  # (n_mels, frames)
    return np.log(mel + LOG_OFFSET).T.astype(np.float32)


def file_logmel(path: str | Path, features: FeatureConfig) -> np.ndarray:
    """Decode, resample and analyse one file: ``(frames, n_mels)`` float32."""
    return logmel(load_audio(path, features.sample_rate), features, name=str(path))
