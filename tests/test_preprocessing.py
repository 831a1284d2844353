import functools
import hashlib

import h5py
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import REPO_ROOT, index_dataset

from preprocessing.audio_logmel import extract_split
from preprocessing.clotho_dataset import index_split
from preprocessing.demo_dataset import prepare_demo, write_demo_dataset
from utils.audio import FeatureConfig
from utils.config import load_config
from utils.errors import ConfigError
from utils.stores import LogmelStore, logmel_file, read_text_embeds, text_embeds_file
from utils.text import TextEmbeddingConfig, normalise_caption

FEATURES = FeatureConfig(sample_rate=16000, window_ms=40, hop_ms=20, n_mels=32)


def digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_demo_dataset_is_deterministic_and_clotho_shaped(tmp_path):
    write_demo_dataset(tmp_path / "a", {"development": 6}, seed=3)
    write_demo_dataset(tmp_path / "b", {"development": 6}, seed=3)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    captions = pd.read_csv(tmp_path / "a" / "development_captions.csv")
    assert list(captions.columns) == ["fname", "raw_text", "text"]
    assert captions.groupby("fname").size().eq(5).all() and captions["fname"].nunique() == 6
    assert captions["raw_text"].nunique() > 20  # paraphrases, not copies


@pytest.fixture
def dataset_with_bad_files(tmp_path):
    write_demo_dataset(tmp_path, {"development": 5}, seed=0)
    folder = tmp_path / "development"
    (folder / "dev_scene_0001.wav").write_bytes(b"this is not audio at all")  # non-audio
    sf.write(folder / "dev_scene_0002.wav", np.zeros(0, np.float32), 16000)  # zero samples
    (folder / "dev_scene_0003.wav").unlink()  # caption rows naming a missing file
    return tmp_path


def test_bad_audio_is_reported_by_name_and_dropped(dataset_with_bad_files):
    audio, text, problems = index_split(dataset_with_bad_files, "development")
    assert audio["fname"].tolist() == ["dev_scene_0000.wav", "dev_scene_0004.wav"]
    report = "\n".join(problems)
    for name in ("dev_scene_0001.wav", "dev_scene_0002.wav", "dev_scene_0003.wav"):
        assert name in report
    assert "missing" in report and "not a readable audio file" in report and "no samples" in report
    assert set(text["fname"]) == {"dev_scene_0000.wav", "dev_scene_0004.wav"} and len(text) == 10
    # Ids come from the captions file, not from which files survived: clip 4 keeps fid 4.
    assert audio["fid"].tolist() == [0, 4]
    assert text.loc[text["fname"] == "dev_scene_0004.wav", "cid"].tolist() == [20, 21, 22, 23, 24]


def test_logmel_skips_files_that_break_after_indexing(dataset_with_bad_files):
    index_dataset(dataset_with_bad_files, ["development"])
    # Truncate a file that was fine when indexed: a header with no data behind it.
    good = dataset_with_bad_files / "development" / "dev_scene_0004.wav"
    good.write_bytes(good.read_bytes()[:30])
    skipped = extract_split(dataset_with_bad_files, "development", FEATURES, workers=1)
    assert len(skipped) == 1 and "dev_scene_0004.wav" in skipped[0]
    store = LogmelStore(logmel_file(dataset_with_bad_files, "development"))
    assert store.fids.tolist() == [0] and store[0].shape[1] == 32
    assert not list(dataset_with_bad_files.glob("*.partial"))


def test_logmel_matches_config_and_handles_stereo_48k(tmp_path):
    write_demo_dataset(tmp_path, {"development": 2}, seed=0)
    stereo = np.random.default_rng(0).uniform(-0.5, 0.5, size=(48000 * 2, 2)).astype(np.float32)
    sf.write(tmp_path / "development" / "dev_scene_0001.wav", stereo, 48000)
    index_dataset(tmp_path, ["development"])
    assert extract_split(tmp_path, "development", FEATURES, workers=1) == []
    store = LogmelStore(logmel_file(tmp_path, "development"))
    frames = store[1].shape[0]
    assert abs(frames - 2.0 / 0.020) <= 2  # 2 s at a 20 ms hop
    assert np.isfinite(store[1]).all()
    with h5py.File(logmel_file(tmp_path, "development")) as f:
        assert FeatureConfig.model_validate_json(f.attrs["features"]) == FEATURES


def test_real_example_clip_gives_features():
    from utils.audio import file_logmel

    mel = file_logmel(REPO_ROOT / "example" / "example.wav", FEATURES)
    assert mel.shape == (pytest.approx(500, abs=2), 32) and np.isfinite(mel).all()


def test_text_embeddings_are_keyed_by_caption_id(tiny_dataset):
    cids, embeds, model = read_text_embeds(text_embeds_file(tiny_dataset, "validation"))
    text = pd.read_csv(tiny_dataset / "validation_text.csv")
    assert cids.tolist() == text["cid"].tolist() and embeds.shape == (len(text), 384)
    assert model == "sentence-transformers/all-MiniLM-L6-v2"
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-3)  # MiniLM normalises its output


def test_captions_are_normalised_like_the_dcase_baseline_text_column():
    assert normalise_caption("The beep, beep, beep of a walkie-talkie.") == "the beep beep beep of a walkie-talkie"
    assert normalise_caption("  A kid's toy:   squeaks!? ") == "a kid's toy squeaks"
    assert TextEmbeddingConfig().caption("A Dog barks.") == "A Dog barks."  # raw_text: as written
    assert TextEmbeddingConfig(caption_column="text").caption("A Dog barks.") == "a dog barks"


def test_clotho_release_captions_are_read_as_downloaded(tmp_path):
    (tmp_path / "development").mkdir()
    names = ["b (1) &amp; c.wav", "a, d&#39;e.wav"]
    for name in names:
        sf.write(tmp_path / "development" / name, np.zeros(16000, np.float32), 16000)
    rows = [[names[0], "One.", "Two, three.", "", "Four!", "One."], [names[1], "A", "B", "C", "D", "E"]]
    pd.DataFrame(rows, columns=["file_name"] + [f"caption_{k}" for k in range(1, 6)]).to_csv(
        tmp_path / "clotho_captions_development.csv", index=False
    )
    audio, text, problems = index_split(tmp_path, "development")
    assert audio["fname"].tolist() == sorted(names)
    # cids follow the file: row by row, caption_1 to caption_5; the dropped ones keep their place
    assert text["cid"].tolist() == [0, 1, 3, 5, 6, 7, 8, 9]
    assert text["raw_text"].tolist()[:3] == ["One.", "Two, three.", "Four!"] and text["text"][1] == "two three"
    assert problems == [
        "clotho_captions_development.csv line 2 caption_3: empty caption for 'b (1) &amp; c.wav'; dropped",
        "clotho_captions_development.csv line 2 caption_5: repeats line 2 caption_1 ('b (1) &amp; c.wav'); dropped",
    ]


def test_a_first_main_run_prepares_the_missing_demo_dataset_itself(tmp_path, monkeypatch):
    import main

    demo = tmp_path / "demo"
    monkeypatch.setattr(main, "DEMO_DIRS", {demo: "distinct"})  # conf.yaml's data/demo, here a smaller one
    small = {"development": 4, "validation": 2, "evaluation": 2}
    monkeypatch.setattr(main, "prepare_demo", functools.partial(prepare_demo, clips=small, workers=1))
    config, _ = load_config(REPO_ROOT / "conf.yaml", [f"data.dataset_dir={demo}", "device=cpu"])
    with pytest.raises(ConfigError, match="does not exist"):
        main.check_before_ray(config, joins_cluster=False)
    main.prepare_demo_if_missing(config)
    main.check_before_ray(config, joins_cluster=False)  # every store the search reads is there now
    assert len(read_text_embeds(text_embeds_file(demo, "development"))[0]) == 4 * 5
    assert LogmelStore(logmel_file(demo, "evaluation")).fids.tolist() == [0, 1]

    monkeypatch.setattr(main, "prepare_demo", lambda config, **_: pytest.fail("the demo is ready: nothing to redo"))
    main.prepare_demo_if_missing(config)
    other, _ = load_config(REPO_ROOT / "conf.yaml", [f"data.dataset_dir={tmp_path / 'clotho'}"])
    main.prepare_demo_if_missing(other)  # any other dataset is the user's to prepare
    assert not (tmp_path / "clotho").exists()
