"""Index a Clotho-layout dataset: stable audio/caption ids, durations, and a report of bad rows.

Reads ``{split}_captions.csv`` (``fname,raw_text,text``) and ``{split}/`` audio, writes
``{split}_audio.csv`` (``fid,fname,duration``) and ``{split}_text.csv``
(``cid,fid,fname,raw_text,text``). Ids are not random: ``fid`` is the clip's position in the
sorted list of file names of the captions file and ``cid`` the caption's row in it, so they
are the same on every run and do not shift when a bad row or file is dropped.

Dropped with a warning naming the line or file: empty captions, repeated (file, caption)
rows, file names with a folder in them (a CSV may not point outside ``{split}/``), and
clips whose audio is missing, unreadable, empty or truncated. A file name used in more than
one split is reported too (Clotho v2 itself has four). The tables are written only when
complete, never half.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from utils.audio import audio_duration
from utils.cli import SPLITS, exit_on_input_error, setup_logging
from utils.errors import AudioError, DatasetError
from utils.stores import CAPTION_COLUMNS, audio_table, captions_csv, dataset_member, read_csv, text_table, write_csv

log = logging.getLogger("clotho_dataset")


def caption_problems(captions: pd.DataFrame, csv_name: str) -> tuple[pd.Series, list[str]]:
    """``(rows to keep, one line per dropped row)``: empty captions and repeated (file, caption) pairs.

    Data row ``cid`` is line ``cid + 2`` of the file (line 1 is the header), unless a caption
    above it spans several lines.
    """
    empty = (captions["text"].str.strip() == "") | (captions["raw_text"].str.strip() == "")
    # repeats are looked for among the rows that are kept, so a row never repeats a dropped one
    filled = captions[~empty]
    repeat = filled.duplicated(["fname", "text"]).reindex(captions.index, fill_value=False)
    first_line = filled.groupby(["fname", "text"])["cid"].transform("first") + 2
    problems = [
        f"{csv_name} line {row.cid + 2}: empty caption for {row.fname!r}; dropped"
        for row in captions[empty].itertuples()
    ]
    problems += [
        f"{csv_name} line {row.cid + 2}: repeats line {first_line[i]} ({row.fname!r}); dropped"
        for i, row in zip(captions.index[repeat], captions[repeat].itertuples())
    ]
    return ~empty & ~repeat, problems


def index_split(dataset_dir: Path, split: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``(audio table, text table, problems)`` for one split; problems are human-readable lines."""
    csv_path = captions_csv(dataset_dir, split)
    if not csv_path.is_file():
        raise DatasetError(
            f"{csv_path} not found: each split needs its captions file (columns {','.join(CAPTION_COLUMNS)})"
        )
    captions = read_csv(csv_path, CAPTION_COLUMNS, dtype=str).reset_index(names="cid")
    if captions.empty:
        raise DatasetError(f"{csv_path}: no caption rows")
    fid_of = {fname: fid for fid, fname in enumerate(sorted(captions["fname"].unique()))}
    keep, problems = caption_problems(captions, csv_path.name)
    captions = captions[keep]

    audio_rows = []
    for fname in sorted(captions["fname"].unique()):
        try:
            duration = audio_duration(dataset_member(Path(dataset_dir) / split, fname))
        except FileNotFoundError:
            problems.append(f"{split}/{fname}: audio file is missing; its captions are dropped")
        except AudioError as err:
            problems.append(f"{err}; its captions are dropped")
        except DatasetError as err:
            problems.append(f"{csv_path.name}: {err}; its captions are dropped")
        else:
            audio_rows.append({"fid": fid_of[fname], "fname": fname, "duration": round(duration, 3)})
    audio = pd.DataFrame(audio_rows, columns=["fid", "fname", "duration"])
    text = captions[captions["fname"].isin(audio["fname"])].copy()
    text.insert(1, "fid", text["fname"].map(fid_of).astype(int))
    return audio, text[["cid", "fid", "fname", "raw_text", "text"]], problems


def shared_names(audio_tables: dict[str, pd.DataFrame]) -> list[str]:
    """One line per pair of splits that use the same file names (a possible leak between splits)."""
    splits = list(audio_tables)
    lines = []
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            common = sorted(set(audio_tables[a]["fname"]) & set(audio_tables[b]["fname"]))
            if common:
                lines.append(
                    f"{len(common)} file name(s) in both {a} and {b}, e.g. {common[0]!r}: "
                    "make sure they are different recordings"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset-dir", type=Path, required=True, help="folder with {split}/ audio and {split}_captions.csv"
    )
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), help="splits to index")
    args = parser.parse_args()
    setup_logging()
    with exit_on_input_error():
        if not args.dataset_dir.is_dir():
            raise DatasetError(f"--dataset-dir {args.dataset_dir} is not a folder")
        audio_tables = {}
        for split in args.splits:
            audio, text, problems = index_split(args.dataset_dir, split)
            for line in problems:
                log.warning(line)
            if audio.empty:
                raise DatasetError(f"{split}: no usable clip (see the warnings above); nothing written")
            write_csv(audio, audio_table(args.dataset_dir, split))
            write_csv(text, text_table(args.dataset_dir, split))
            audio_tables[split] = audio
            log.info(
                "%s: %d clips (%.1f h), %d captions, %d problem(s)",
                split,
                len(audio),
                audio["duration"].sum() / 3600,
                len(text),
                len(problems),
            )
        for line in shared_names(audio_tables):
            log.warning(line)


if __name__ == "__main__":
    main()
