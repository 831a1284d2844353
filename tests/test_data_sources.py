"""Data beyond Clotho: tags turned into captions, Hugging Face datasets imported, several datasets in training."""

import io
import json
import logging
import math
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import REPO_ROOT, index_dataset
from datasets import Audio, Dataset, DatasetDict, IterableDataset
from test_towers import whisper_recipe

import main
import utils.training as training
from models.tiny import tiny_roberta, tiny_whisper
from preprocessing import hf_dataset, keywords_to_captions
from preprocessing.audio_logmel import extract_split
from preprocessing.clotho_dataset import index_split
from preprocessing.sbert_embeddings import embed_captions
from utils.audio import load_audio
from utils.config import load_raw, validate, with_overrides
from utils.errors import ConfigError, DatasetError, InputError
from utils.stores import LogmelStore, logmel_file
from utils.tower_stores import audio_store, extra_sources, text_store

RATE = 16000


def tone(seconds, hz, rate=RATE, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * np.random.default_rng(int(hz)).standard_normal(t.size)
    return np.repeat(wave[:, None], channels, axis=1).astype(np.float32) if channels > 1 else wave.astype(np.float32)


def keywords(*args):
    return keywords_to_captions.convert(keywords_to_captions.build_parser().parse_args([str(a) for a in args]))


def import_hf(*args):
    return hf_dataset.import_dataset(hf_dataset.build_parser().parse_args([str(a) for a in args]))


def test_labels_become_one_caption_per_template_in_the_clotho_layout(tmp_path, caplog):
    audio = tmp_path / "audio"
    audio.mkdir()
    for name, hz in (("a.wav", 300), ("b.wav", 600), ("c.wav", 900)):
        sf.write(audio / name, tone(0.5, hz), RATE)
    (tmp_path / "tags.csv").write_text(
        'fname,labels\na,Dog_bark\nb.wav,"Dog_bark,Rain"\nc,"Dog,Car_passing_by,Rain,Dog"\nd,Rain\ne,\nb,Rain\n'
    )
    out = tmp_path / "out"
    templates = ["--template", "the sound of {labels}", "--template", "{labels} can be heard"]
    tags = ["--labels", tmp_path / "tags.csv", "--audio-dir", audio, "--output-dir", out]
    with caplog.at_level(logging.WARNING, logger="keywords_to_captions"):
        keywords(*tags, *templates)
    assert (out / "development_captions.csv").read_text() == (
        "fname,raw_text\n"
        "a.wav,the sound of dog bark\n"
        "a.wav,dog bark can be heard\n"
        "b.wav,the sound of dog bark and rain\n"
        "b.wav,dog bark and rain can be heard\n"
        'c.wav,"the sound of dog, car passing by and rain"\n'
        'c.wav,"dog, car passing by and rain can be heard"\n'
    )
    assert "line 5: no audio file 'd' nor 'd.wav'" in caplog.text and "line 6: no labels for 'e'" in caplog.text
    assert "line 7: 'b.wav' repeats line 3" in caplog.text
    assert (out / "development" / "a.wav").is_symlink() and (out / "development" / "a.wav").resolve() == audio / "a.wav"
    # the project's indexer reads it as it reads Clotho: two captions per clip, the text column normalised
    clips, text, problems = index_split(out, "development")
    assert clips["fname"].tolist() == ["a.wav", "b.wav", "c.wav"] and problems == []
    assert text.groupby("fname").size().tolist() == [2, 2, 2]
    assert text["text"].tolist()[4] == "the sound of dog car passing by and rain"

    # AudioSet's ids through its vocabulary, the default templates, copied audio
    sf.write(audio / "yt1.flac", tone(0.5, 400), RATE)
    (tmp_path / "vocab.csv").write_text(
        'index,mid,display_name\n0,/m/0bt9lr,Dog\n1,/m/09x0r,"Male speech, man speaking"\n2,/m/06mb1,Rain\n'
    )
    (tmp_path / "audioset.csv").write_text('YTID,positive_labels\nyt1,"/m/0bt9lr,/m/09x0r,/m/06mb1"\nyt2,/m/0xx\n')
    ids = ["--file-column", "YTID", "--labels-column", "positive_labels", "--audio-extension", ".flac"]
    keywords(
        *("--labels", tmp_path / "audioset.csv", "--audio-dir", audio, "--output-dir", tmp_path / "ids", *ids),
        *("--vocabulary", tmp_path / "vocab.csv", "--copy"),
    )
    assert (tmp_path / "ids" / "development_captions.csv").read_text() == (
        "fname,raw_text\n"
        'yt1.flac,"the sound of dog, male speech and rain"\n'
        'yt1.flac,"dog, male speech and rain can be heard"\n'
        'yt1.flac,"a recording of dog, male speech and rain"\n'
        'yt1.flac,"this is a sound of dog, male speech and rain"\n'
    )
    copied = tmp_path / "ids" / "development" / "yt1.flac"
    assert not copied.is_symlink() and copied.read_bytes() == (audio / "yt1.flac").read_bytes()
    assert "line 3: unknown label id(s) /m/0xx for 'yt2'; skipped" in caplog.text
    with pytest.raises(InputError, match=r"--template 'the sound of \{label\}': needs \{labels\}"):
        keywords(*tags, "--template", "the sound of {label}")


def encoded(wave, fmt, rate=RATE):
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt)
    return buffer.getvalue()


def test_a_saved_dataset_is_imported_with_its_audio_and_captions(tmp_path, caplog, monkeypatch):
    # from files: Audio() cast from paths of generated wavs, one of them stereo at another rate
    files = []
    for i, (seconds, rate, channels) in enumerate(((0.5, RATE, 1), (0.8, 22050, 2), (0.3, RATE, 1))):
        files.append(tmp_path / f"clip {i}.wav")
        sf.write(files[-1], tone(seconds, 200 + 100 * i, rate, channels), rate)
    texts = ["a man speaks", "a dog barks", "rain falls"]  # one caption each
    saved = Dataset.from_dict({"audio": [str(f) for f in files], "text": texts, "id": [1, 2, 3]})
    saved.cast_column("audio", Audio()).save_to_disk(tmp_path / "from_files")
    import_hf(tmp_path / "from_files", "--output-dir", tmp_path / "out")
    clips, text, problems = index_split(tmp_path / "out", "development")
    assert clips["fname"].tolist() == ["clip 0.wav", "clip 1.wav", "clip 2.wav"] and problems == []
    assert text["raw_text"].tolist() == texts
    for source in files:  # the bytes as they came, so the samples too
        assert (tmp_path / "out" / "development" / source.name).read_bytes() == source.read_bytes()

    # from bytes held in the dataset: FLAC without a path, OGG, and items that cannot be used
    flac, ogg = tone(0.4, 500), tone(0.6, 700)
    audio = [
        {"bytes": encoded(flac, "FLAC"), "path": None},
        {"bytes": encoded(ogg, "OGG"), "path": "clips/x.ogg"},
        {"bytes": b"not audio at all" * 64, "path": "bad.m4a"},
        {"bytes": encoded(flac, "FLAC"), "path": "quiet.flac"},
        {"bytes": encoded(ogg, "OGG"), "path": "x.ogg"},  # the name is taken: the index names it
    ]
    captions = [["one", "two"], ["three"], ["four"], [" "], ["five"]]  # lists: several captions a clip
    in_memory = Dataset.from_dict({"audio": audio, "caption": captions}).cast_column("audio", Audio())
    DatasetDict({"train": in_memory, "test": in_memory.select([0])}).save_to_disk(tmp_path / "from_bytes")
    with pytest.raises(InputError, match="choose one of its splits train, test with --hf-split"):
        import_hf(tmp_path / "from_bytes", "--output-dir", tmp_path / "bytes", "--text-column", "caption")
    for flags in ([], ["--wav"]):
        out = tmp_path / f"bytes{len(flags)}"
        with caplog.at_level(logging.WARNING, logger="hf_dataset"):
            import_hf(
                tmp_path / "from_bytes", "--output-dir", out, "--hf-split", "train", "--text-column", "caption", *flags
            )
        assert "item 2 (bad.m4a): not a readable audio file" in caplog.text
        assert "item 3 (quiet.flac): no text; skipped" in caplog.text
        clips, text, problems = index_split(out, "development")
        suffix = [".wav"] * 3 if flags else [".flac", ".ogg", ".ogg"]
        names = [f"00000000{suffix[0]}", f"x{suffix[1]}", f"00000004{suffix[2]}"]
        assert text["fname"].tolist() == [names[0], names[0], names[1], names[2]] and problems == []
        for name, item in zip(names[:2], audio):
            source = sf.read(io.BytesIO(item["bytes"]), dtype="float32")[0]  # what the source's bytes decode to
            # as they came: the same samples; as 16-bit WAV: within 16-bit rounding
            np.testing.assert_allclose(
                load_audio(out / "development" / name, RATE), source, rtol=0, atol=2**-15 * len(flags)
            )
        if flags:
            assert sf.info(out / "development" / names[0]).subtype == "PCM_16"

    # streamed, and no further than --max-items
    table = import_hf(tmp_path / "from_files", "--output-dir", tmp_path / "two", "--streaming", "--max-items", 2)
    assert sorted(set(table["fname"])) == ["clip 0.wav", "clip 1.wav"]
    with pytest.raises(InputError, match=r"--text-column caption: .* has no such column; it has audio, text, id"):
        import_hf(tmp_path / "from_files", "--output-dir", tmp_path / "none", "--text-column", "caption")
    with pytest.raises(DatasetError, match=r"^nobody/no-such-dataset: cannot load it: no such folder.*Offline"):
        import_hf("nobody/no-such-dataset", "--output-dir", tmp_path / "none", "--streaming")

    # a streamed hub dataset that gives no features: its items come as stored, their columns checked one by one
    items = [{"audio": {"bytes": encoded(flac, "WAV"), "path": "s.wav"}, "text": "streamed"}]
    streamed = IterableDataset.from_generator(lambda: iter(items))
    assert streamed.features is None
    monkeypatch.setattr(hf_dataset, "open_source", lambda *args: (streamed, None))
    assert import_hf("some/hub-id", "--output-dir", tmp_path / "hub").values.tolist() == [["s.wav", "streamed"]]
    with pytest.raises(InputError, match=r"^--text-column caption: item 0 has no such column; it has audio, text$"):
        import_hf("some/hub-id", "--output-dir", tmp_path / "hub", "--text-column", "caption")


@pytest.fixture(scope="module")
def tag_dataset(tiny_dataset, sentence_model, tmp_path_factory):
    """A converted tag dataset of 8 clips, two captions each, preprocessed with the tiny dataset's config."""
    root = tmp_path_factory.mktemp("tags")
    (root / "audio").mkdir()
    rows = []
    for i in range(8):
        sf.write(root / "audio" / f"t{i}.wav", tone(1.0 + 0.1 * i, 250 + 150 * i), RATE)
        rows.append({"fname": f"t{i}", "labels": ["Dog_bark", "Rain,Thunder", "Engine"][i % 3]})
    pd.DataFrame(rows).to_csv(root / "tags.csv", index=False)
    templates = ["--template", "the sound of {labels}", "--template", "{labels} can be heard"]
    keywords("--labels", root / "tags.csv", "--audio-dir", root / "audio", "--output-dir", root / "tags", *templates)
    dataset = root / "tags"
    index_dataset(dataset, ["development"])
    config = validate(load_raw(REPO_ROOT / "conf.yaml", [f"data.dataset_dir={tiny_dataset}"]))
    assert extract_split(dataset, "development", config.features, workers=1) == []
    embed_captions(dataset, "development", sentence_model, config.text_embeddings)
    return dataset


def with_tags(raw, tags, split="development"):
    return with_overrides(raw, {"data.extra_train": [{"dataset_dir": str(tags), "split": split}]})


class Recorded:
    """A loader whose batches' clip ids are kept."""

    def __init__(self, loader, into):
        self.loader, self.into = loader, into

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.into.append(batch["audio_ids"].clone())
            yield batch


def test_training_sees_every_source_and_validates_on_one_split(tiny_raw, tag_dataset, monkeypatch):
    config = validate(with_tags(tiny_raw, tag_dataset))
    pairs = training.TrainingPairs(config)
    assert len(pairs) == 24 * 5 + 8 * 2
    tags = pairs.datasets[1]
    fid = int(tags.fids[0])
    audio, _, clip_id, _ = pairs[24 * 5]  # the first tag caption: its own store, its id past the tiny dataset's 24
    assert clip_id == 24 + fid and np.array_equal(audio, LogmelStore(logmel_file(tag_dataset, "development"))[fid])

    seen = {"train": [], "val": []}
    run_epoch = training.run_epoch

    def recording(model, loader, criterion, device, optimizer=None, *args):
        kept = seen["train" if optimizer is not None else "val"]
        return run_epoch(model, Recorded(loader, kept), criterion, device, optimizer, *args)

    monkeypatch.setattr(training, "run_epoch", recording)
    reports = []
    training.train(config, lambda metrics, folder: reports.append(metrics))
    assert len(seen["train"]) == math.ceil(136 / 16)  # batches of 16 over the union
    ids, counts = torch.cat(seen["train"]).unique(return_counts=True)
    assert ids.tolist() == list(range(32)) and counts.tolist() == [5] * 24 + [2] * 8
    ids, counts = torch.cat(seen["val"]).unique(return_counts=True)  # the tiny dataset's validation split only
    assert ids.tolist() == list(range(12)) and counts.tolist() == [5] * 12
    assert [m["epoch"] for m in reports] == [1] and np.isfinite(reports[0]["val/t2a_mAP@10"])


def test_extra_sources_are_checked_and_their_missing_files_named(tiny_raw, tiny_dataset, tag_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.extra_train\[0\]\.dataset_dir: .*nowhere does not exist"):
        extra_sources(validate(with_tags(tiny_raw, tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"^data\.extra_train\[0\]\.split: .* has neither a train/ folder nor"):
        extra_sources(validate(with_tags(tiny_raw, tag_dataset, "train")))
    with pytest.raises(ConfigError, match=r"extra_train\[0\] is the 'validation' split of .*, already data\.val_split"):
        validate(with_tags(tiny_raw, tiny_dataset, "validation"))  # held-out data cannot join training
    # a relative folder is the config file's, as data.dataset_dir is
    (tmp_path / "conf.yaml").write_text("data:\n  dataset_dir: a\n  extra_train: [{dataset_dir: ../tags}]\n")
    assert load_raw(tmp_path / "conf.yaml")["data"]["extra_train"][0]["dataset_dir"] == str(tmp_path.parent / "tags")

    # log-mels made with other features are refused before training, naming the source's store
    other = tmp_path / "other"
    shutil.copytree(tag_dataset, other, symlinks=True)
    with h5py.File(logmel_file(other, "development"), "r+") as f:
        f.attrs["features"] = json.dumps(json.loads(f.attrs["features"]) | {"n_mels": 32})
    with pytest.raises(DatasetError, match=r"other/development_logmel\.h5: made with other features \(n_mels 32"):
        training.train(validate(with_tags(tiny_raw, other)), lambda metrics, folder: None)

    # main.py lists every missing file of every source, with the commands that make them
    fresh = tmp_path / "fresh"
    shutil.copytree(tag_dataset, fresh, symlinks=True, ignore=shutil.ignore_patterns("*.h5", "*_audio.csv"))
    config = validate(with_tags(tiny_raw, fresh))
    commands = " && ".join(
        f"python preprocessing/{script} --dataset-dir {fresh} --splits development"
        for script in ("clotho_dataset.py", "audio_logmel.py", "sbert_embeddings.py")
    )
    assert main.missing_preprocessing(config) == [
        f"data.extra_train[0]: {fresh} has no development_audio.csv, development_logmel.h5, "
        f"development_text_embeds.h5: {commands}"
    ]
    with pytest.raises(ConfigError, match=r"^data\.extra_train\[0\]: .* run the preprocessing scripts first"):
        main.check_before_ray(config, joins_cluster=True)


def test_frozen_tower_stores_are_made_for_every_source_and_trained_on(tiny_dataset, tag_dataset, tmp_path, monkeypatch):
    folders = {"whisper": tiny_whisper(tmp_path / "whisper"), "roberta": tiny_roberta(tmp_path / "roberta")}
    raw = whisper_recipe(tiny_dataset, folders, tmp_path / "runs", **{"model.text_enc.trainable": False})
    config = validate(with_tags(raw, tag_dataset))
    # prepare_stores' Ray tasks, run here one after the other (a store task sets torch's threads: left alone)
    monkeypatch.setattr(main.ray, "remote", lambda **resources: lambda task: type("Task", (), {"remote": task}))
    monkeypatch.setattr(main.ray, "get", lambda futures: futures)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    main.prepare_stores(config)
    (source,) = extra_sources(config)
    for store in (audio_store(source, "development"), text_store(source, "development")):
        assert store[0].parent == tag_dataset and store[0].is_file()
    pairs = training.TrainingPairs(config)
    assert len(pairs) == 136 and pairs[24 * 5][2] == 24 + int(pairs.datasets[1].fids[0])
    reports = []
    training.train(config, lambda metrics, folder: reports.append(metrics))
    assert [m["epoch"] for m in reports] == [1] and np.isfinite(reports[0]["train/loss"])
