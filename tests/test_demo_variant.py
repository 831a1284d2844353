"""The demo generator's two variants: the default one unchanged, and the shared one whose captions fit several clips,
with its relevance table checked against the definition."""

import hashlib
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT

from preprocessing.demo_dataset import (
    COUNT_WORDS,
    SPLITS,
    Event,
    fits,
    shared_scenes,
    write_demo_dataset,
)
from utils.stores import captions_csv, relevance_csv

# sha256 of the files (sorted by path) that write_demo_dataset wrote for these splits and seed before the variants
# came: the published demo's figures rest on the default variant writing them byte for byte.
PUBLISHED_SPLITS, PUBLISHED_DIGEST = (
    {"development": 4, "validation": 2},
    "818a96b42b88a5ff059daedf795ac14c14c9f9e88d238b4cd1e064cf0b3661d0",
)


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_default_variant_writes_what_it_always_wrote(tmp_path):
    write_demo_dataset(tmp_path / "plain", PUBLISHED_SPLITS, seed=0)
    (tmp_path / "named").mkdir()
    stale = relevance_csv(tmp_path / "named", "development")
    stale.write_text("caption,fname,relevance\n")  # a shared variant's table left behind: it fits no new clip
    write_demo_dataset(tmp_path / "named", PUBLISHED_SPLITS, seed=0, variant="distinct")
    plain, named = files(tmp_path / "plain"), files(tmp_path / "named")
    assert plain == named and not stale.exists()
    assert not [name for name in plain if name.endswith("_relevance.csv")]
    assert hashlib.sha256(b"".join(plain.values())).hexdigest() == PUBLISHED_DIGEST
    with pytest.raises(ValueError, match="shared"):
        write_demo_dataset(tmp_path / "bad", PUBLISHED_SPLITS, variant="similar")


def test_the_shared_variant_is_deterministic_and_clotho_shaped(tmp_path):
    splits = {"development": 8, "validation": 4}
    write_demo_dataset(tmp_path / "a", splits, seed=3, variant="shared")
    write_demo_dataset(tmp_path / "b", splits, seed=3, variant="shared")
    write_demo_dataset(tmp_path / "c", splits, seed=4, variant="shared")
    a = files(tmp_path / "a")
    assert a == files(tmp_path / "b") and a != files(tmp_path / "c")
    for split, n_clips in splits.items():
        captions = pd.read_csv(captions_csv(tmp_path / "a", split))
        assert list(captions.columns) == ["fname", "raw_text", "text"]
        assert captions.groupby("fname").size().eq(5).all() and captions["fname"].nunique() == n_clips
        relevance = pd.read_csv(relevance_csv(tmp_path / "a", split))
        assert list(relevance.columns) == ["caption", "fname", "relevance"]


def test_fits_needs_the_same_events_in_order_and_every_detail_said():
    heard = (Event("beeps", "high", 3), Event("noise"), Event("clicks", None, 5))
    said = (Event("beeps", "high"), Event("noise"), Event("clicks"))
    assert fits(said, heard) and fits(heard, heard)
    assert fits((Event("beeps", "high", 3), Event("noise"), Event("clicks")), heard)
    assert not fits((Event("beeps", "high", 2), Event("noise"), Event("clicks")), heard)  # another count
    assert not fits((Event("beeps", "low"), Event("noise"), Event("clicks")), heard)  # another pitch
    assert not fits((Event("noise"), Event("beeps", "high"), Event("clicks")), heard)  # another order
    assert not fits(said[:2], heard)  # the caption leaves out an event


# A pitch word, unless it is the hum's "low" ("a low electrical hum", "a low humming noise", "a steady low drone").
PITCH_WORD = re.compile(r"\b(low|medium|high)\b(?! (?:electrical|humming|drone))")
COUNT_WORD = re.compile(rf"\b({'|'.join(COUNT_WORDS.values())})\b")


def test_the_relevance_table_lists_every_clip_each_caption_fits(tmp_path):
    seed, n_clips = 4, 60
    write_demo_dataset(tmp_path, {"development": n_clips}, seed=seed, variant="shared")
    captions = pd.read_csv(captions_csv(tmp_path, "development"))
    table = pd.read_csv(relevance_csv(tmp_path, "development"))
    # The first split draws its scenes first from the seed's generator: the same scenes and captions again.
    scenes = shared_scenes(np.random.default_rng(seed), n_clips)
    fnames = [f"dev_scene_{i:04d}.wav" for i in range(n_clips)]
    assert captions["raw_text"].tolist() == [text for _, own in scenes for text, _ in own]

    said_by_text = {}
    for heard, own in scenes:
        for text, said in own:
            assert said_by_text.setdefault(text, said) == said  # a caption's text settles what it says
            # What it says is what the text reads: the beeps' pitches and the counts given, in order.
            assert PITCH_WORD.findall(text.lower()) == [e.pitch for e in heard if e.kind == "beeps"]
            assert COUNT_WORD.findall(text.lower()) == [COUNT_WORDS[e.count] for e in said if e.count is not None]
            assert [e.kind for e in said] == [e.kind for e in heard]
        assert sum(said != tuple(e._replace(count=None) for e in heard) for _, said in own) <= 1  # one gives counts

    # The definition, spelled out: the same kinds and pitches in order, and any count said is the clip's.
    expected = set()
    for text, said in said_by_text.items():
        for fname, (heard, _) in zip(fnames, scenes):
            same_events = [(e.kind, e.pitch) for e in said] == [(e.kind, e.pitch) for e in heard]
            if same_events and all(s.count in (None, h.count) for s, h in zip(said, heard)):
                expected.add((text, fname))
    pairs = list(zip(table["caption"], table["fname"]))
    assert len(pairs) == len(set(pairs)) and set(pairs) == expected
    assert table["relevance"].eq(1.0).all()
    assert set(zip(captions["raw_text"], captions["fname"])) <= set(pairs)  # its own clip, always
    assert set(table["fname"]) <= {p.name for p in (tmp_path / "development").glob("*.wav")}

    per_caption = table.groupby("caption").size()[captions["raw_text"]]
    assert 1.5 <= per_caption.mean() <= 6
    assert per_caption.eq(1).any() and per_caption.ge(3).any()  # some captions fit one clip, many fit several


def test_the_command_line_writes_the_shared_variant(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "preprocessing.demo_dataset", "--variant", "shared", "--clips", "6", "3", "3"]
        + ["--dataset-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    for split, n_clips in zip(SPLITS, (6, 3, 3)):
        table = pd.read_csv(relevance_csv(tmp_path, split))
        assert table["fname"].nunique() == n_clips and f"{split}: {n_clips} clips" in result.stderr
    assert "relevant clips per caption" in result.stderr
