"""Audio decoding and log-mel features (``FeatureConfig``), shared by preprocessing and ``example/``.

Every way a file can be unusable (not audio, no samples, cut short, absurdly long, NaN
samples, shorter than one analysis window) is an ``AudioError`` naming the file, so
preprocessing can skip it with a reason instead of crashing or training on garbage.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import librosa
import numpy as np
import soundfile as sf
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from models.registry import StrictModel
from utils.errors import AudioError

LOG_OFFSET = 1e-8  # keeps log() finite on digital silence
READABLE = "WAV, FLAC, OGG, MP3, AIFF and the other formats libsndfile reads"
# Decoded length below this share of the header's frame count means the file was cut short
# (MP3 lengths without a length header are estimates, hence not exactly 1).
TRUNCATED_SHARE = 0.99
# libsndfile's log line for a WAV whose data chunk promises more bytes than the file holds.
WAV_DATA_CUT = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)
SAMPLE_RATE_RANGE = (1000, 384000)
LIBSNDFILE_PREFIX = re.compile(r"^Error opening .*?: ")  # it repeats the path we already name


class FeatureConfig(StrictModel):
    """The ``features`` section: log-mel analysis. The DCASE baseline used 40 ms windows, 20 ms hops
    and 64 mel bands; the sample rate has no default because it belongs to the dataset."""

    sample_rate: int = Field(ge=SAMPLE_RATE_RANGE[0], le=SAMPLE_RATE_RANGE[1])
    window_ms: PositiveFloat = 40.0
    hop_ms: PositiveFloat = 20.0
    n_mels: PositiveInt = 64
    fmin: float = Field(0.0, ge=0)
    fmax: PositiveFloat | None = None  # None: half the sample rate
    max_seconds: PositiveFloat = 600.0  # longer files are skipped: this trains on clips (Clotho: 15-30 s)

    @model_validator(mode="after")
    def _band_is_inside_the_spectrum(self) -> FeatureConfig:
        top = self.fmax if self.fmax is not None else self.sample_rate / 2
        if not self.fmin < top <= self.sample_rate / 2:
            raise ValueError(
                f"need fmin < fmax <= sample_rate / 2, "
                f"got fmin {self.fmin:g}, fmax {top:g}, sample_rate {self.sample_rate}"
            )
        return self


class CropConfig(StrictModel):
    """The ``crops`` section: the views of a clip the audio tower sees.

    With ``seconds`` unset a tower sees whole clips (as its feature extractor takes them: Whisper pads or
    cuts to 30 s, CLAP to 10 s). With it set, training sees random crops of that length, and evaluation
    one centred crop or, with ``eval_hop_seconds``, sliding windows whose embeddings are averaged. Clips
    shorter than a crop are repeated, then zero-padded (``pad: repeat``) or only zero-padded.
    """

    seconds: PositiveFloat | None = None
    # 0: a fresh random crop each time a clip is drawn (log-mel towers only: a transformers tower reads its
    # inputs or outputs from a store); K: K random crops drawn once per clip (stored), one sampled per draw
    train_views: NonNegativeInt = 0
    eval_hop_seconds: PositiveFloat | None = None
    pad: Literal["repeat", "zero"] = "repeat"


def fit_length(x: np.ndarray, n: int, pad: str) -> np.ndarray:
    """``x`` (time first) cut or padded to ``n`` steps: repeated first when ``pad`` is ``repeat``, then zeros."""
    if len(x) >= n:
        return x[:n]
    if pad == "repeat":
        x = np.concatenate([x] * (n // len(x)))
    return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])


def random_crops(x: np.ndarray, n: int, count: int, rng: np.random.Generator, pad: str) -> list[np.ndarray]:
    """``count`` crops of ``n`` steps at uniformly random starts (a shorter ``x`` is padded instead)."""
    if len(x) <= n:
        return [fit_length(x, n, pad)] * count
    return [x[start : start + n] for start in rng.integers(0, len(x) - n + 1, size=count)]


def eval_crops(x: np.ndarray, n: int, hop: int | None, pad: str) -> list[np.ndarray]:
    """The evaluation views of ``x``: one centred crop of ``n`` steps, or windows every ``hop`` steps with the
    last one ending at the end (their embeddings are averaged). A shorter ``x`` is one padded view."""
    if len(x) <= n:
        return [fit_length(x, n, pad)]
    if hop is None:
        start = (len(x) - n) // 2
        return [x[start : start + n]]
    starts = list(range(0, len(x) - n, hop)) + [len(x) - n]
    return [x[start : start + n] for start in starts]


def open_audio(path: str | Path) -> sf.SoundFile:
    """Open ``path`` for reading after checking its header: readable, non-empty, not cut short."""
    if not os.path.isfile(path):  # unlike Path.is_file, also False for names the OS refuses (too long)
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        f = sf.SoundFile(str(path))
    except Exception as err:  # libsndfile raises several types for corrupt, unsupported or non-audio data
        reason = LIBSNDFILE_PREFIX.sub("", str(err)).strip().rstrip(".")
        raise AudioError(f"{path}: not a readable audio file ({reason}); readable formats: {READABLE}") from None
    cut = WAV_DATA_CUT.search(f.extra_info)
    problem = None
    if f.frames == 0:
        problem = "contains no samples"
    elif not SAMPLE_RATE_RANGE[0] <= f.samplerate <= SAMPLE_RATE_RANGE[1]:
        problem = f"implausible sample rate {f.samplerate} Hz"
    elif cut and int(cut[2]) < int(cut[1]):
        problem = f"truncated: its header declares {cut[1]} bytes of audio, the file holds {cut[2]}"
    if problem:
        f.close()
        raise AudioError(f"{path}: {problem}")
    return f


def audio_duration(path: str | Path) -> float:
    """Seconds of audio in ``path``, from its header."""
    with open_audio(path) as f:
        return f.frames / f.samplerate


def load_audio(path: str | Path, sample_rate: int, max_seconds: float = float("inf")) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate``; stereo is averaged, other rates resampled."""
    with open_audio(path) as f:
        if f.frames / f.samplerate > max_seconds:
            # checked before decoding: a corrupt header can claim hours and exhaust memory
            raise AudioError(
                f"{path}: {f.frames / f.samplerate:.0f} s is longer than features.max_seconds={max_seconds:g}"
            )
        try:
            wave = f.read(dtype="float32", always_2d=True)  # (samples, channels)
        except Exception as err:
            raise AudioError(f"{path}: cannot decode audio ({str(err).strip()})") from None
        if wave.shape[0] < TRUNCATED_SHARE * f.frames:
            raise AudioError(f"{path}: truncated: its header declares {f.frames} samples, only {wave.shape[0]} decode")
        file_rate = f.samplerate
    wave = wave.mean(axis=1)
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: samples contain NaN or inf")
    if file_rate != sample_rate:
        wave = librosa.resample(wave, orig_sr=file_rate, target_sr=sample_rate, res_type="soxr_hq")
    return wave.astype(np.float32, copy=False)


def logmel(wave: np.ndarray, features: FeatureConfig, name: str = "audio") -> np.ndarray:
    """Log-mel energies ``(frames, n_mels)`` of a mono wave at ``features.sample_rate``."""
    win = round(features.sample_rate * features.window_ms / 1000)
    hop = round(features.sample_rate * features.hop_ms / 1000)
    if wave.shape[0] < win:
        raise AudioError(
            f"{name}: {wave.shape[0]} samples is shorter than one {features.window_ms:g} ms analysis window"
        )
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: samples contain NaN or inf")
    n_fft = 1 << (win - 1).bit_length()  # next power of two >= window
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught below, with the file's name
        mel = librosa.feature.melspectrogram(
            y=wave,
            sr=features.sample_rate,
            n_fft=n_fft,
            win_length=win,
            hop_length=hop,
            n_mels=features.n_mels,
            fmin=features.fmin,
            fmax=features.fmax,
            center=True,
            power=2.0,
        )  # (n_mels, frames)
        features_out = np.log(mel + LOG_OFFSET).T.astype(np.float32)
    if not np.isfinite(features_out).all():  # e.g. float samples so large that their power overflows
        raise AudioError(f"{name}: log-mel features contain NaN or inf (sample values out of range?)")
    return features_out


def file_logmel(path: str | Path, features: FeatureConfig) -> np.ndarray:
    """Decode, resample and analyse one file: ``(frames, n_mels)`` float32."""
    return logmel(load_audio(path, features.sample_rate, features.max_seconds), features, name=str(path))


def clip_views(
    x: np.ndarray, steps_per_second: float, crops: CropConfig, train: bool, rng: np.random.Generator
) -> list[np.ndarray]:
    """The views of one clip ``x`` (time first, ``steps_per_second`` samples or frames a second) that
    ``crops`` asks for: the whole clip; or in training ``max(1, train_views)`` random crops, in evaluation
    the centred crop or the sliding windows."""
    if crops.seconds is None:
        return [x]
    n = max(1, round(crops.seconds * steps_per_second))
    if train:
        return random_crops(x, n, max(1, crops.train_views), rng, crops.pad)
    hop = None if crops.eval_hop_seconds is None else max(1, round(crops.eval_hop_seconds * steps_per_second))
    return eval_crops(x, n, hop, crops.pad)
