"""Bad input gets a one-line error naming the file, row or key, and never leaves partial output."""

import io
import json
import re
import shutil
import subprocess
import sys

import h5py
import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import REPO_ROOT, index_dataset
from safetensors.torch import save_file

from preprocessing import audio_logmel
from preprocessing.audio_logmel import extract_split
from preprocessing.clotho_dataset import index_split, shared_names
from preprocessing.demo_dataset import write_demo_dataset
from preprocessing.sbert_embeddings import embed_captions
from utils import training
from utils.audio import FeatureConfig, file_logmel
from utils.checkpoints import (
    CHECKPOINT_FILE,
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    build_model,
    load_trained_model,
    save_checkpoint,
)
from utils.config import load_raw, validate, with_overrides
from utils.errors import AudioError, CheckpointError, DatasetError
from utils.stores import LogmelStore, audio_table, logmel_file, text_embeds_file, text_table
from utils.text import TextEmbeddingConfig
from utils.tower_stores import check_inputs
from utils.training import train

FEATURES = FeatureConfig(sample_rate=16000, window_ms=40, hop_ms=20, n_mels=32)


def sine(rate: int, seconds: float = 1.5, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def encoded(fmt: str, wave: np.ndarray, rate: int, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_AUDIO = {
    "empty.wav": (lambda: b"", "not a readable audio file"),
    "text.wav": (lambda: b"fname,raw_text,text\nnot audio at all\n", "not a readable audio file"),
    "movie.m4a": (lambda: b"\x00\x00\x00\x18ftypM4A \x00\x00\x02\x00" + bytes(200), "not a readable audio file"),
    "zero.wav": (lambda: encoded("WAV", np.zeros(0, np.float32), 16000), "contains no samples"),
    "cut.wav": (lambda: half(encoded("WAV", sine(16000), 16000)), "truncated"),
    "cut.mp3": (lambda: half(encoded("MP3", sine(16000), 16000)), "truncated"),
    "cut.flac": (lambda: half(encoded("FLAC", sine(16000), 16000)), "truncated|cannot decode"),
    "nan.wav": (lambda: encoded("WAV", np.full(16000, np.nan, np.float32), 16000, "FLOAT"), "NaN or inf"),
    "inf.wav": (lambda: encoded("WAV", np.full(16000, np.inf, np.float32), 16000, "FLOAT"), "NaN or inf"),
    "overflow.wav": (lambda: encoded("WAV", 1e30 * sine(16000), 16000, "FLOAT"), "features contain NaN or inf"),
    "blip.wav": (lambda: encoded("WAV", sine(16000, seconds=0.01), 16000), "shorter than one 40 ms analysis window"),
    "hour.wav": (lambda: encoded("WAV", sine(8000, seconds=4), 8000), "longer than features.max_seconds=3"),
    "slow.wav": (lambda: encoded("WAV", sine(500, seconds=2, hz=100), 500), "implausible sample rate 500 Hz"),
}


@pytest.mark.parametrize("name", BAD_AUDIO)
def test_unusable_audio_is_an_error_naming_the_file(tmp_path, name):
    make, message = BAD_AUDIO[name]
    (tmp_path / name).write_bytes(make())
    with pytest.raises(AudioError, match=message) as err:
        file_logmel(tmp_path / name, FEATURES.model_copy(update={"max_seconds": 3}))
    assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "fmt, subtype, rate, channels",
    [
        ("WAV", "PCM_16", 48000, 2),
        ("WAV", "PCM_24", 8000, 1),
        ("WAV", "FLOAT", 16000, 3),
        ("FLAC", None, 22050, 1),
        ("OGG", None, 44100, 2),
        ("MP3", None, 32000, 1),
        ("AIFF", None, 11025, 2),
    ],
)
def test_any_rate_channels_and_format_give_the_same_analysis(tmp_path, fmt, subtype, rate, channels):
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(encoded(fmt, np.repeat(sine(rate)[:, None], channels, axis=1), rate, subtype))
    mel = file_logmel(path, FEATURES)
    assert mel.shape[1] == 32 and abs(mel.shape[0] - 1.5 / 0.020) <= 2  # resampled to 16 kHz, 20 ms hop
    assert np.isfinite(mel).all()
    centres = librosa.mel_frequencies(n_mels=32 + 2, fmax=8000)[1:-1]
    assert abs(centres[mel.mean(axis=0).argmax()] - 1000) < 200  # the 1 kHz tone stays at 1 kHz


def write_captions(dataset, rows, split="development", header="fname,raw_text,text"):
    lines = [header] + [",".join(row) for row in rows]
    (dataset / f"{split}_captions.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def dataset(tmp_path):
    """Three good 1 s clips in development/, and a real audio file just outside the dataset."""
    root = tmp_path / "dataset"
    (root / "development" / "sub").mkdir(parents=True)
    for name in ("a.wav", "b.wav", "c.wav", "sub/d.wav"):
        (root / "development" / name).write_bytes(encoded("WAV", sine(16000, 1.0), 16000))
    (tmp_path / "secret.wav").write_bytes(encoded("WAV", sine(16000, 1.0), 16000))
    return root


def test_caption_rows_are_checked_line_by_line(dataset):
    write_captions(
        dataset,
        [
            ("a.wav", "a dog barks", "a dog barks"),  # line 2
            ("a.wav", " ", " "),  # line 3: empty caption
            ("b.wav", "rain falls", "rain falls"),  # line 4
            ("a.wav", "a dog barks", "a dog barks"),  # line 5: repeats line 2
            ("missing.wav", "wind", "wind"),  # line 6: no such file
            ("c.wav", "", "a car passes"),  # line 7: empty raw caption
            ("c.wav", "a car passes", "a car passes"),  # line 8: kept, line 7 was dropped
        ],
    )
    audio, text, problems = index_split(dataset, "development")
    report = "\n".join(problems)
    assert "development_captions.csv line 3: empty caption for 'a.wav'" in report
    assert "development_captions.csv line 7: empty caption for 'c.wav'" in report
    assert "development_captions.csv line 5: repeats line 2 ('a.wav')" in report
    assert "missing.wav: audio file is missing" in report
    assert "line 8" not in report
    assert audio["fname"].tolist() == ["a.wav", "b.wav", "c.wav"]
    assert text["cid"].tolist() == [0, 2, 6] and text["text"].tolist() == ["a dog barks", "rain falls", "a car passes"]


def test_file_names_cannot_point_outside_the_split_folder(dataset):
    names = ["../../secret.wav", str(dataset.parent / "secret.wav"), "sub/d.wav", "..", "a.wav\\..\\b.wav"]
    write_captions(dataset, [(name, "a caption", "a caption") for name in names] + [("a.wav", "fine", "fine")])
    audio, text, problems = index_split(dataset, "development")
    assert audio["fname"].tolist() == ["a.wav"] and text["fname"].tolist() == ["a.wav"]
    assert len(problems) == len(names) and all("must be a plain file name inside" in p for p in problems)

    # A hand-edited clip table is held to the same rule when features are extracted.
    index_dataset(dataset, ["development"])
    table = pd.read_csv(audio_table(dataset, "development"))
    table.loc[len(table)] = {"fid": 99, "fname": "../../secret.wav", "duration": 1.0}
    table.to_csv(audio_table(dataset, "development"), index=False)
    skipped = extract_split(dataset, "development", FEATURES, workers=1)
    assert len(skipped) == 1 and "'../../secret.wav' must be a plain file name" in skipped[0]
    assert LogmelStore(logmel_file(dataset, "development")).fids.tolist() == audio["fid"].tolist()


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "file_name,caption_1,caption_2\na.wav,x,y\n",
            "missing column(s); expected Clotho's release columns file_name, caption_1, caption_2, caption_3, "
            "caption_4, caption_5, or one caption per row with fname, raw_text, text (text optional); "
            "found file_name, caption_1, caption_2",
        ),
        ("fname,raw_text,text\n", "no caption rows"),
        ("", "not a readable UTF-8 CSV"),
        (b"\xff\xfe\x00garbage\x81\x82", "not a readable UTF-8 CSV"),
        ('fname,raw_text,text\na.wav,"unclosed quote,x\n', "not a readable UTF-8 CSV"),
    ],
)
def test_unreadable_captions_file_is_one_error_naming_it(dataset, content, message):
    path = dataset / "development_captions.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError) as err:
        index_split(dataset, "development")
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_clotho_dataset_script_fails_in_one_line_and_writes_nothing_for_a_bad_split(dataset):
    write_captions(dataset, [("a.wav", "a dog barks", "a dog barks")])
    write_captions(dataset, [("x.wav", "y")], split="validation", header="file_name,caption_1")
    result = run_script(
        REPO_ROOT / "preprocessing" / "clotho_dataset.py",
        "--dataset-dir",
        dataset,
        "--splits",
        "development",
        "validation",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "validation_captions.csv: missing column(s)" in last
    assert audio_table(dataset, "development").is_file()  # the good split is complete
    assert not audio_table(dataset, "validation").exists() and not list(dataset.glob("*.partial"))


def test_names_shared_between_splits_are_reported():
    tables = {
        "development": pd.DataFrame({"fname": ["a.wav", "b.wav"]}),
        "validation": pd.DataFrame({"fname": ["b.wav"]}),
        "evaluation": pd.DataFrame({"fname": ["c.wav"]}),
    }
    (line,) = shared_names(tables)
    assert line.startswith("1 file name(s) in both development and validation, e.g. 'b.wav'")


def stores(path):
    store = LogmelStore(path)
    return {fid: store[fid] for fid in store.fids.tolist()}


def test_logmel_resumes_after_a_crash_without_redoing_finished_parts(tmp_path, monkeypatch):
    write_demo_dataset(tmp_path, {"development": 10}, seed=2)
    index_dataset(tmp_path, ["development"])
    (tmp_path / "development" / "dev_scene_0001.wav").write_bytes(b"not audio")  # skipped, in the first part
    calls = []

    def crash_on_seventh(path, features):
        calls.append(path)
        if len(calls) == 7:
            raise RuntimeError("power cut")
        return file_logmel(path, features)

    monkeypatch.setattr(audio_logmel, "file_logmel", crash_on_seventh)
    with pytest.raises(RuntimeError, match="power cut"):
        extract_split(tmp_path, "development", FEATURES, workers=1, part_size=3)
    parts = tmp_path / "development_logmel.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["part_00000.h5", "part_00001.h5"]  # no half-written part
    assert not logmel_file(tmp_path, "development").exists()

    calls.clear()
    monkeypatch.setattr(
        audio_logmel, "file_logmel", lambda path, features: calls.append(path) or file_logmel(path, features)
    )
    skipped = extract_split(tmp_path, "development", FEATURES, workers=1, part_size=3)
    assert len(calls) == 4  # clips 7-10 only
    assert len(skipped) == 1 and "dev_scene_0001.wav" in skipped[0]  # reported although found before the crash
    assert not parts.exists()
    resumed = stores(logmel_file(tmp_path, "development"))

    calls.clear()
    assert extract_split(tmp_path, "development", FEATURES, workers=1, part_size=3) == skipped
    assert calls == []  # up to date: nothing redone

    assert extract_split(tmp_path, "development", FEATURES, workers=1, overwrite=True) == skipped
    assert len(calls) == 10
    fresh = stores(logmel_file(tmp_path, "development"))
    assert resumed.keys() == fresh.keys() and all(np.array_equal(resumed[f], fresh[f]) for f in fresh)

    calls.clear()
    extract_split(tmp_path, "development", FEATURES.model_copy(update={"n_mels": 16}), workers=1)
    assert len(calls) == 10 and LogmelStore(logmel_file(tmp_path, "development")).n_mels == 16  # new features: redone

    calls.clear()
    sf.write(tmp_path / "development" / "dev_scene_0005.wav", sine(16000), 16000)  # same name, new recording
    extract_split(tmp_path, "development", FEATURES.model_copy(update={"n_mels": 16}), workers=1, part_size=3)
    assert len(calls) == 10  # the store no longer matches the files


def test_logmel_store_records_what_it_was_made_from(tmp_path):
    write_demo_dataset(tmp_path, {"development": 3}, seed=0)
    index_dataset(tmp_path, ["development"])
    extract_split(tmp_path, "development", FEATURES, workers=2)
    with h5py.File(logmel_file(tmp_path, "development")) as f:
        assert FeatureConfig.model_validate_json(f.attrs["features"]) == FEATURES
        assert f["source_fname"].asstr()[:].tolist() == [f"dev_scene_000{i}.wav" for i in range(3)]
        assert f["logmel"].dtype == np.float32 and f["skipped_reason"].shape == (0,)


def test_all_clips_unusable_is_an_error_and_writes_no_store(tmp_path):
    write_demo_dataset(tmp_path, {"development": 2}, seed=0)
    index_dataset(tmp_path, ["development"])
    for wav in (tmp_path / "development").glob("*.wav"):
        wav.write_bytes(b"")
    with pytest.raises(
        DatasetError,
        match=r"no usable audio file: all 2 clips were skipped, e\.g\. .*dev_scene_0000\.wav: "
        r"not a readable audio file",
    ):
        extract_split(tmp_path, "development", FEATURES, workers=1)
    assert not logmel_file(tmp_path, "development").exists()


class CountingModel:
    """Wraps a sentence model and counts ``encode`` calls."""

    def __init__(self, model, poison=False):
        self.model, self.poison, self.calls = model, poison, 0

    def encode(self, sentences, **kwargs):
        self.calls += 1
        embeds = self.model.encode(sentences, **kwargs)
        if self.poison:
            embeds[1] = np.nan
        return embeds


def test_sentence_embeddings_skip_finished_splits_and_refuse_nan(tiny_dataset, sentence_model, tmp_path):
    dataset = tmp_path / "copy"
    shutil.copytree(tiny_dataset, dataset)
    settings = TextEmbeddingConfig()  # all-MiniLM-L6-v2 on raw_text
    model = CountingModel(sentence_model)
    embed_captions(dataset, "validation", model, settings)
    assert model.calls == 0  # same captions, same model: up to date
    embed_captions(dataset, "validation", model, settings, overwrite=True)
    assert model.calls == 1
    table = pd.read_csv(text_table(dataset, "validation"), keep_default_na=False)
    table.loc[3, "raw_text"] = "An edited caption keeps its id."
    table.to_csv(text_table(dataset, "validation"), index=False)
    embed_captions(dataset, "validation", model, settings)
    assert model.calls == 2  # same ids, new text: embedded again
    embed_captions(dataset, "validation", model, settings.model_copy(update={"caption_column": "text"}))
    assert model.calls == 3  # the other column is other text

    text_embeds_file(dataset, "validation").unlink()
    with pytest.raises(DatasetError, match=r"NaN/inf embeddings for caption id\(s\) \[\d+\]; nothing written"):
        embed_captions(dataset, "validation", CountingModel(sentence_model, poison=True), settings)
    assert not text_embeds_file(dataset, "validation").exists() and not list(dataset.glob("*.partial"))


def test_weights_of_another_architecture_are_refused_with_their_keys(tiny_raw, tmp_path):
    cpu = torch.device("cpu")
    export = tmp_path / "best"
    export.mkdir()
    save_file(build_model(validate(tiny_raw), cpu).state_dict(), str(export / EXPORT_WEIGHTS))
    other = validate(with_overrides(tiny_raw, {"model.embed_dim": 32, "model.audio_enc.channels": [4, 8, 16]}))
    (export / EXPORT_CONFIG).write_text(json.dumps(other.model_dump(mode="json")))
    with pytest.raises(CheckpointError) as err:
        load_trained_model(export, cpu)
    message = str(err.value)
    assert message.startswith(f"{export}: weights from another architecture; missing audio_encoder.conv_block3.")
    assert "shape mismatch audio_encoder.fc1.weight: (16, 8) in the checkpoint, (16, 16) in the model" in message
    assert "audio_proj.weight: (16, 16) in the checkpoint, (32, 16) in the model" in message

    result = run_script(
        REPO_ROOT / "postprocessing" / "xmodal_retrieval.py", "--checkpoint", export, "--split", "validation"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {export}: weights from another architecture")


def test_resuming_from_a_checkpoint_of_another_architecture_names_the_keys(tiny_raw, tmp_path):
    config = validate(tiny_raw)
    model = build_model(config, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    save_checkpoint(tmp_path, model, optimizer, scheduler, config, epoch=1, metrics={})
    wider = validate(with_overrides(tiny_raw, {"model.embed_dim": 24}))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch audio_proj\.weight: \(16, 16\) in the checkpoint, \(24, 16\)"
    ):
        train(wider, lambda metrics, folder: None, resume_from=tmp_path / CHECKPOINT_FILE)


def test_out_of_memory_fails_the_trial_with_advice(tiny_raw, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(training, "run_epoch", no_memory)
    with pytest.raises(
        torch.OutOfMemoryError,
        match=r"out of cpu memory in epoch 1 with param_conf\.batch_size=16: lower the batch size",
    ):
        train(validate(tiny_raw), lambda metrics, folder: None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["ray_conf.cpus_per_trial=4096"],
            r"one trial needs 4096 CPU \(1 worker\(s\) x cpus/gpus_per_trial\) but this machine has \d+",
        ),
        (["ray_conf.gpus_per_trial=64"], r"one trial needs 64 GPU .* but this machine has \d+"),
        (["device=cuda"], r"device: 'cuda' needs ray_conf.gpus_per_trial > 0"),
        (["ray_conf.cpus_per_trail=1"], r"ray_conf.cpus_per_trail"),
        (
            ["param_conf.batch_size=large", "optimizer.lr=fast"],
            r"invalid config: optimizer.lr: .*; param_conf.batch_size: ",
        ),
    ],
)
def test_main_refuses_impossible_configs_before_ray_starts(tiny_dataset, overrides, message):
    result = run_script(
        REPO_ROOT / "main.py", f"data.dataset_dir={tiny_dataset}", "ray_conf.include_dashboard=false", *overrides
    )
    assert (
        result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    )  # one line, nothing else
    assert re.search(message, result.stderr)


def test_stores_out_of_step_with_tables_or_config_are_refused(tiny_dataset, tmp_path):
    dataset = tmp_path / "copy"
    shutil.copytree(tiny_dataset, dataset)
    config = validate(load_raw(REPO_ROOT / "conf.yaml", [f"data.dataset_dir={dataset}"]))
    features = config.features
    check_inputs(config, "validation")  # in step

    with pytest.raises(
        DatasetError,
        match=r"made with other features \(n_mels 64 in the store, 32 in the config\); "
        r"rerun preprocessing/audio_logmel\.py",
    ):
        check_inputs(config.model_copy(update={"features": features.model_copy(update={"n_mels": 32})}), "validation")

    # A clip added to the captions file shifts the ids of every clip sorted after it.
    captions = pd.read_csv(dataset / "validation_captions.csv")
    shutil.copy(dataset / "validation" / captions["fname"][0], dataset / "validation" / "aaa_new.wav")
    captions.loc[len(captions)] = {"fname": "aaa_new.wav", "raw_text": "a new clip", "text": "a new clip"}
    captions.to_csv(dataset / "validation_captions.csv", index=False)
    index_dataset(dataset, ["validation"])
    with pytest.raises(
        DatasetError, match=r"validation_logmel\.h5: made from another clip list than validation_audio\.csv"
    ):
        check_inputs(config, "validation")
    extract_split(dataset, "validation", features, workers=1)
    with pytest.raises(
        DatasetError,
        match=r"no embedding for caption id\(s\) \[60\] of validation_text\.csv; "
        r"rerun preprocessing/sbert_embeddings\.py",
    ):
        check_inputs(config, "validation")


def test_damaged_best_json_is_one_line(tmp_path):
    (tmp_path / "best.json").write_text('{"model": ')
    result = run_script(REPO_ROOT / "postprocessing" / "xmodal_retrieval.py", "--best", tmp_path / "best.json")
    assert result.returncode == 1 and result.stderr.startswith(f"error: {tmp_path / 'best.json'}: not valid JSON")


def test_caption_embeddings_of_another_model_or_column_are_refused(tiny_dataset):
    config = validate(load_raw(REPO_ROOT / "conf.yaml", [f"data.dataset_dir={tiny_dataset}"]))
    check_inputs(config, "validation")  # in step
    for change, said in [
        (
            {"caption_column": "text"},
            "from the raw_text column, the config asks for sentence-transformers/all-MiniLM-L6-v2 on text",
        ),
        ({"model_name": "all-mpnet-base-v2"}, "the config asks for all-mpnet-base-v2 on raw_text"),
    ]:
        with pytest.raises(DatasetError, match=re.escape(said) + r"; rerun preprocessing/sbert_embeddings\.py"):
            text_embeddings = config.text_embeddings.model_copy(update=change)
            check_inputs(config.model_copy(update={"text_embeddings": text_embeddings}), "validation")
