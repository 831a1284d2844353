"""Index a Clotho-layout dataset: stable audio/caption ids, durations, and a report of bad rows.

Reads ``{split}_captions.csv`` (``fname,raw_text,text``) and ``{split}/`` audio, writes
``{split}_audio.csv`` (``fid,fname,duration``) and ``{split}_text.csv``
(``cid,fid,fname,raw_text,text``). Ids are not random: ``fid`` is the clip's position in the
sorted list of file names of the captions file and ``cid`` the caption's row in it, so they
are the same on every run and do not shift when a bad file is dropped. A caption whose
audio file is missing or unreadable is reported by name and dropped.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any folder

from utils.data import audio_table, captions_csv, text_table  # noqa: E402
from utils.runtime import setup_logging  # noqa: E402

log = logging.getLogger("clotho_dataset")

CAPTION_COLUMNS = ("fname", "raw_text", "text")


def audio_duration(path: Path) -> float:
    """Seconds of audio in ``path``; raises ``ValueError`` naming the file when it is unreadable or empty."""
    try:
        info = sf.info(str(path))
    except Exception as err:  # libsndfile raises several types for corrupt or non-audio data
        raise ValueError(f"{path.name}: unreadable audio ({err})") from None
    if info.frames == 0:
        raise ValueError(f"{path.name}: contains no samples")
    return info.frames / info.samplerate


def index_split(dataset_dir: Path, split: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``(audio table, text table, problems)`` for one split; problems are human-readable lines."""
    captions = pd.read_csv(captions_csv(dataset_dir, split), keep_default_na=False, dtype=str)
    missing = [c for c in CAPTION_COLUMNS if c not in captions.columns]
    if missing:
        raise ValueError(f"{captions_csv(dataset_dir, split)}: missing column(s) {missing}; expected {list(CAPTION_COLUMNS)}")
    captions = captions.reset_index(names="cid")
    fnames = sorted(captions["fname"].unique())
    audio_rows, problems = [], []
    for fid, fname in enumerate(fnames):
        path = dataset_dir / split / fname
        if Path(fname).name != fname:
            problems.append(f"{split}/{fname}: file name must not contain a folder; skipped")
            continue
        if not path.is_file():
            problems.append(f"{split}/{fname}: audio file is missing; its captions are dropped")
            continue
        try:
            audio_rows.append({"fid": fid, "fname": fname, "duration": round(audio_duration(path), 3)})
        except ValueError as err:
            problems.append(f"{split}/{err}; its captions are dropped")
    audio = pd.DataFrame(audio_rows, columns=["fid", "fname", "duration"])
    fid_of = dict(zip(audio["fname"], audio["fid"]))
    text = captions[captions["fname"].isin(fid_of)].copy()
    text.insert(1, "fid", text["fname"].map(fid_of).astype(int))
    return audio, text[["cid", "fid", "fname", "raw_text", "text"]], problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, required=True, help="folder with {split}/ audio and {split}_captions.csv")
    parser.add_argument("--splits", nargs="+", default=["development", "validation", "evaluation"], help="splits to index")
    args = parser.parse_args()
    setup_logging()
    for split in args.splits:
        if not captions_csv(args.dataset_dir, split).is_file():
            sys.exit(f"error: {captions_csv(args.dataset_dir, split)} not found")
        audio, text, problems = index_split(args.dataset_dir, split)
        for line in problems:
            log.warning(line)
        audio.to_csv(audio_table(args.dataset_dir, split), index=False)
        text.to_csv(text_table(args.dataset_dir, split), index=False)
        log.info("%s: %d clips (%.1f h), %d captions, %d problem(s)", split, len(audio), audio["duration"].sum() / 3600, len(text), len(problems))


if __name__ == "__main__":
    main()
