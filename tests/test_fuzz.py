"""Random bytes and random CSVs into the preprocessing entry points: a clean error or a clean skip,
never a crash or a hang."""

import csv
import io
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import REPO_ROOT

from preprocessing.clotho_dataset import index_split
from utils.audio import FeatureConfig, audio_duration, file_logmel
from utils.errors import AudioError, DatasetError
from utils.stores import LogmelStore, logmel_file

FEATURES = FeatureConfig(sample_rate=16000, window_ms=40, hop_ms=20, n_mels=32, max_seconds=60)
MAGIC = [b"", b"RIFF", b"fLaC", b"OggS", b"ID3\x03", b"FORM", b"\xff\xfb"]


def valid_audio(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    fmt = ["WAV", "FLAC", "OGG", "MP3"][rng.integers(4)]
    sf.write(buffer, rng.uniform(-0.5, 0.5, int(rng.integers(800, 16000))).astype(np.float32), 16000, format=fmt)
    return buffer.getvalue()


def random_audio_bytes(rng: np.random.Generator) -> bytes:
    """Random bytes behind a format's magic number, or a valid file with flipped bytes or a cut."""
    kind = rng.integers(3)
    if kind == 0:
        return MAGIC[rng.integers(len(MAGIC))] + rng.bytes(int(rng.integers(0, 4096)))
    data = bytearray(valid_audio(rng))
    if kind == 1:
        for at in rng.integers(
            0, min(len(data), 200), size=int(rng.integers(1, 8))
        ):  # the header is where parsers trip
            data[at] = int(rng.integers(256))
        return bytes(data)
    return bytes(data[: int(rng.integers(0, len(data)))])


@pytest.mark.timeout(300)
def test_random_audio_bytes_give_features_or_an_audio_error(tmp_path):
    rng = np.random.default_rng(20261122)
    outcomes = {"features": 0, "error": 0}
    for i in range(150):
        path = tmp_path / f"fuzz_{i}.wav"
        path.write_bytes(random_audio_bytes(rng))
        try:
            assert audio_duration(path) > 0
            mel = file_logmel(path, FEATURES)
        except AudioError as err:
            assert str(err).startswith(str(path)) and "\n" not in str(err)
            outcomes["error"] += 1
        else:
            assert mel.ndim == 2 and mel.shape[1] == 32 and mel.dtype == np.float32 and np.isfinite(mel).all()
            outcomes["features"] += 1
    assert min(outcomes.values()) > 10, outcomes  # both paths were exercised


CELLS = [
    "a.wav",
    "b.wav",
    "../a.wav",
    "/etc/passwd",
    "",
    " ",
    "..",
    "sub/b.wav",
    "a dog barks",
    "rain, then wind",
    'quote " inside',
    "line\nbreak",
    "\u00e9t\u00e9 \u266b",
    "x" * 5000,
    "nul\x00byte",
    "nan",
    "NULL",
    "1e308",
]
HEADERS = [
    ["fname", "raw_text", "text"],
    ["text", "fname", "raw_text", "extra"],
    ["file_name", "caption_1"],
    ["fname", "text"],
    [],
]


def random_captions(rng: np.random.Generator) -> bytes:
    """A CSV with a random header and random cells, or random bytes."""
    if rng.random() < 0.15:
        return rng.bytes(int(rng.integers(0, 2000)))
    header = HEADERS[0] if rng.random() < 0.6 else HEADERS[rng.integers(1, len(HEADERS))]
    width = len(header) or 3
    ragged = rng.random() < 0.2  # rows of other lengths than the header
    rows = [
        [CELLS[rng.integers(len(CELLS))] for _ in range(width + (int(rng.integers(-1, 2)) if ragged else 0))]
        for _ in range(int(rng.integers(0, 12)))
    ]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    text = (",".join(header) + "\n" if header else "") + buffer.getvalue()
    if rng.random() < 0.2:  # break the quoting
        text = text.replace('"', "", int(rng.integers(1, 3)))
    return text.encode()


@pytest.mark.timeout(300)
def test_random_caption_files_give_clean_tables_or_a_dataset_error(tmp_path):
    (tmp_path / "development" / "sub").mkdir(parents=True)
    for name in ("a.wav", "b.wav", "sub/b.wav"):
        sf.write(tmp_path / "development" / name, np.zeros(16000, np.float32) + 0.1, 16000)
    rng = np.random.default_rng(7)
    outcomes = {"tables": 0, "error": 0}
    for _ in range(150):
        (tmp_path / "development_captions.csv").write_bytes(random_captions(rng))
        try:
            audio, text, problems = index_split(tmp_path, "development")
        except DatasetError as err:
            assert "development_captions.csv" in str(err)
            outcomes["error"] += 1
            continue
        outcomes["tables"] += 1
        assert set(audio["fname"]) <= {"a.wav", "b.wav"}  # only plain names of files that exist
        assert set(text["fid"]) <= set(audio["fid"]) and text["cid"].is_unique
        assert (text["text"].str.strip() != "").all() and not text.duplicated(["fname", "text"]).any()
        assert all(isinstance(line, str) and line for line in problems)
    assert min(outcomes.values()) > 10, outcomes


@pytest.mark.timeout(300)
def test_preprocessing_scripts_skip_fuzzed_files_and_keep_the_good_ones(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "development").mkdir()
    rows, good = [], []
    for i in range(24):
        name = f"clip_{i:02d}.wav"
        if i % 3 == 0:
            sf.write(tmp_path / "development" / name, rng.uniform(-0.5, 0.5, 16000).astype(np.float32), 16000)
            good.append(i)
        else:
            (tmp_path / "development" / name).write_bytes(MAGIC[i % len(MAGIC)] + rng.bytes(int(rng.integers(0, 3000))))
        rows.append({"fname": name, "raw_text": f"caption {i}", "text": f"caption {i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "development_captions.csv", index=False)
    for script, args in [("clotho_dataset.py", []), ("audio_logmel.py", ["--workers", "2", "features.n_mels=32"])]:
        result = subprocess.run(
            [
                sys.executable,
                REPO_ROOT / "preprocessing" / script,
                "--dataset-dir",
                tmp_path,
                "--splits",
                "development",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert sorted(LogmelStore(logmel_file(tmp_path, "development")).fids.tolist()) == good
