"""Index a Clotho-layout dataset: stable audio/caption ids, durations, and a report of bad rows.

Reads each split's captions and ``{split}/`` audio. Captions come in either form, and the log
says which one was found:

- Clotho as downloaded: ``clotho_captions_{split}.csv`` with ``file_name,caption_1,...,caption_5``;
- one caption per row: ``{split}_captions.csv`` with ``fname,raw_text`` and optionally ``text``
  (the DCASE baseline's reshaped files); this one wins when both are there.

``text``, when the file has none, is ``raw_text`` lower-cased with its punctuation removed
(``utils.text.normalise_caption``); ``text_embeddings.caption_column`` says which of the two the
text model embeds. Writes ``{split}_audio.csv`` (``fid,fname,duration``) and
``{split}_text.csv`` (``cid,fid,fname,raw_text,text``). Ids are not random: ``fid`` is the
clip's position in the sorted list of file names of the captions file and ``cid`` the
caption's position in the file (row by row, then caption_1 to caption_5), so they are the same
on every run and do not shift when a bad row or file is dropped.

Dropped with a warning naming the line or file: empty captions, repeated (file, caption)
rows, file names with a folder in them (a CSV may not point outside ``{split}/``), and
clips whose audio is missing, unreadable, empty or truncated. A file name used in more than
one split is reported too (Clotho v2 itself has four). The tables are written only when
complete, never half.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from utils.audio import audio_duration
from utils.cli import add_config_arguments, exit_on_input_error, make_parser, raw_config, setup_logging
from utils.config_files import validate_section
from utils.errors import AudioError, DatasetError
from utils.stores import (
    CAPTION_COLUMNS,
    RELEASE_COLUMNS,
    DataConfig,
    audio_table,
    captions_csv,
    dataset_member,
    read_csv,
    release_captions_csv,
    split_lock,
    text_table,
    write_csv,
)
from utils.text import normalise_caption

log = logging.getLogger("clotho_dataset")


def read_captions(dataset_dir: Path, split: str) -> tuple[pd.DataFrame, Path]:
    """``(captions, the file they came from)``: one row per caption with ``cid, fname, raw_text, text``
    and ``where``, the caption's place in the file for messages (``line 12``, ``line 4 caption_3``).

    The format is told by the columns, whichever of the two file names holds them.
    """
    long_file, release_file = captions_csv(dataset_dir, split), release_captions_csv(dataset_dir, split)
    path = long_file if long_file.is_file() or not release_file.is_file() else release_file
    if not path.is_file():
        raise DatasetError(
            f"no captions for {split}: neither {release_file.name} (Clotho as downloaded) nor {long_file.name} "
            f"is in {dataset_dir}"
        )
    table = read_csv(path, (), dtype=str)
    if set(RELEASE_COLUMNS) <= set(table.columns):
        # (n_files, 5) -> 5 n_files rows, file by file, caption_1 to caption_5 (the order of the file)
        columns = list(RELEASE_COLUMNS[1:])
        table = table.melt(id_vars="file_name", value_vars=columns, var_name="column", ignore_index=False)
        table = table.rename_axis("row").reset_index().sort_values(["row", "column"], kind="stable")
        table = table.rename(columns={"file_name": "fname", "value": "raw_text"})
        table["where"] = [f"line {row + 2} {column}" for row, column in zip(table["row"], table["column"])]
        found = "the Clotho release format (file_name, caption_1..caption_5)"
    elif set(CAPTION_COLUMNS[:2]) <= set(table.columns):
        table["where"] = [f"line {row + 2}" for row in range(len(table))]  # line 1 is the header
        found = "one caption per row (fname, raw_text" + (
            ", text)" if "text" in table else "; text made from raw_text)"
        )
    else:
        raise DatasetError(
            f"{path}: missing column(s); expected Clotho's release columns {', '.join(RELEASE_COLUMNS)}, or one "
            f"caption per row with {', '.join(CAPTION_COLUMNS)} (text optional); found "
            f"{', '.join(map(str, table.columns[:8]))}"
        )
    if "text" not in table:
        table["text"] = table["raw_text"].map(normalise_caption)
    log.info("%s: %s, %s", split, path.name, found)
    table = table[["fname", "raw_text", "text", "where"]].reset_index(drop=True).reset_index(names="cid")
    if table.empty:
        raise DatasetError(f"{path}: no caption rows")
    return table, path


def caption_problems(captions: pd.DataFrame, csv_name: str) -> tuple[pd.Series, list[str]]:
    """``(rows to keep, one line per dropped row)``: empty captions and repeated (file, caption) pairs."""
    empty = (captions["text"].str.strip() == "") | (captions["raw_text"].str.strip() == "")
    # repeats are looked for among the rows that are kept, so a row never repeats a dropped one
    filled = captions[~empty]
    repeat = filled.duplicated(["fname", "text"]).reindex(captions.index, fill_value=False)
    first = filled.groupby(["fname", "text"])["where"].transform("first")
    problems = [
        f"{csv_name} {row.where}: empty caption for {row.fname!r}; dropped" for row in captions[empty].itertuples()
    ]
    problems += [
        f"{csv_name} {row.where}: repeats {first[i]} ({row.fname!r}); dropped"
        for i, row in zip(captions.index[repeat], captions[repeat].itertuples())
    ]
    return ~empty & ~repeat, problems


def index_split(dataset_dir: Path, split: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """``(audio table, text table, problems)`` for one split; problems are human-readable lines."""
    captions, csv_path = read_captions(dataset_dir, split)
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
    parser = make_parser(__doc__)
    add_config_arguments(parser, "data", "data.dataset_dir=data/clotho")
    args = parser.parse_args()
    setup_logging()
    with exit_on_input_error():
        data = validate_section(raw_config(args), "data", DataConfig)
        dataset_dir = data.dataset_dir
        if not dataset_dir.is_dir():
            raise DatasetError(
                f"data.dataset_dir: {dataset_dir} is not a folder; give --dataset-dir or set it in the config"
            )
        index_splits(dataset_dir, args.splits or data.splits())


def index_splits(dataset_dir: Path, splits: list[str] | tuple[str, ...]) -> None:
    """Index each split and write its ``{split}_audio.csv`` and ``{split}_text.csv``, with the problems logged."""
    audio_tables = {}
    for split in splits:
        with split_lock(dataset_dir, split, "index"):
            audio, text, problems = index_split(dataset_dir, split)
            for line in problems:
                log.warning(line)
            if audio.empty:
                raise DatasetError(f"{split}: no usable clip (see the warnings above); nothing written")
            write_csv(audio, audio_table(dataset_dir, split))
            write_csv(text, text_table(dataset_dir, split))
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
