"""Turn a tag or label dataset into a captioned one in the Clotho layout: one caption per template and clip.

Reads a CSV of file names and labels (FSD50K's fname,labels; ESC-50's filename,category with --file-column
and --labels-column; AudioSet's ids such as /m/0bt9lr with --vocabulary, its class_labels_indices.csv),
writes each label as people write it (Dog_bark -> "dog bark"; of AudioSet's "Male speech, man speaking"
the first name), joins a clip's labels as "a", "a and b", "a, b and c", puts them into every template
("the sound of {labels}", ...) and writes {split}_captions.csv (fname,raw_text: one caption per row, as
clotho_dataset.py reads it) into --output-dir, with the clips linked (--copy: copied) into {split}/. The
folder is then preprocessed like any other (clotho_dataset.py, audio_logmel.py, sbert_embeddings.py with
--dataset-dir and --splits) and trained on alone or beside Clotho (data.extra_train).

Rows are skipped with a warning naming their line when their audio is missing, their file name has a folder
in it or repeats an earlier row's, or their labels are empty or (with --vocabulary) unknown.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import exit_on_input_error, make_parser, setup_logging

# Several phrasings give several captions per clip, as Clotho's five do (CLAP's "this is a sound of" among them).
DEFAULT_TEMPLATES = (
    "the sound of {labels}",
    "{labels} can be heard",
    "a recording of {labels}",
    "this is a sound of {labels}",
)
SLOT = "{labels}"


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument("--labels", type=Path, required=True, help="CSV with a file name and a labels column")
    parser.add_argument("--audio-dir", type=Path, required=True, help="folder holding the CSV's audio files")
    parser.add_argument("--output-dir", type=Path, required=True, help="dataset folder to write (Clotho layout)")
    parser.add_argument("--split", default="development", help="split name to write (default: development)")
    parser.add_argument(
        "--template",
        action="append",
        dest="templates",
        metavar="TEXT",
        help=f"a caption template with {SLOT}; repeat it for several captions per clip (default: "
        f"{'; '.join(DEFAULT_TEMPLATES)})",
    )
    parser.add_argument("--label-separator", default=",", help="what separates a row's labels (default: ,)")
    parser.add_argument("--file-column", default="fname", help="the CSV's file name column (default: fname)")
    parser.add_argument("--labels-column", default="labels", help="the CSV's labels column (default: labels)")
    parser.add_argument(
        "--audio-extension",
        default=".wav",
        help="added to file names that name no file as they are (FSD50K's 64760 -> 64760.wav; default: .wav)",
    )
    parser.add_argument(
        "--vocabulary", type=Path, help="CSV mapping label ids to names (AudioSet's class_labels_indices.csv)"
    )
    parser.add_argument(
        "--vocabulary-columns",
        nargs=2,
        default=("mid", "display_name"),
        metavar=("ID", "NAME"),
        help="the vocabulary's id and name columns (default: mid display_name)",
    )
    parser.add_argument(
        "--copy", action="store_true", help="copy the audio files (default: symbolic links where possible)"
    )
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before pandas loads

import pandas as pd
from tqdm import tqdm

from utils.errors import DatasetError, InputError
from utils.stores import atomic_path, dataset_member, read_csv, write_caption_rows

log = logging.getLogger("keywords_to_captions")


def label_name(label: str) -> str:
    """A label as a caption writes it: ``Dog_bark`` -> ``dog bark``; of ``Male speech, man speaking`` (AudioSet's
    names list synonyms) the first name."""
    return " ".join(label.split(",")[0].replace("_", " ").split()).lower()


def join_labels(names: list[str]) -> str:
    """``a``; ``a and b``; ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_templates(templates: list[str]) -> list[str]:
    """The templates, each holding ``{labels}`` and no other field (a typo such as ``{label}``), none twice."""
    for template in templates:
        if SLOT not in template or "{" in template.replace(SLOT, "") or "}" in template.replace(SLOT, ""):
            raise InputError(f"--template {template!r}: needs {SLOT}, and no other {{...}} field")
    if len(set(templates)) < len(templates):
        raise InputError("--template: the same template twice would give the same caption twice")
    return templates


def read_vocabulary(path: Path, id_column: str, name_column: str) -> dict[str, str]:
    """Label id -> label name, from a CSV with those two columns."""
    table = read_csv(path, (id_column, name_column), dtype=str)
    return dict(zip(table[id_column].str.strip(), table[name_column]))


def clip_labels(
    table: pd.DataFrame,
    csv_name: str,
    file_column: str,
    labels_column: str,
    separator: str,
    vocabulary: dict[str, str] | None,
) -> tuple[list[tuple[int, str, list[str]]], list[str]]:
    """``([(row, file name, label names)], problems)``: each row's labels split, mapped through ``vocabulary``
    (when given), written as captions write them and deduplicated in their order; rows without labels or with
    an unknown id are problems."""
    clips, problems = [], []
    for row, (fname, cell) in enumerate(zip(table[file_column], table[labels_column])):
        labels = [label.strip() for label in cell.split(separator) if label.strip()]
        unknown = [label for label in labels if vocabulary is not None and label not in vocabulary]
        names = [label_name(vocabulary.get(label, "") if vocabulary is not None else label) for label in labels]
        names = list(dict.fromkeys(name for name in names if name))  # two ids may have one name
        if not names or unknown:
            why = f"unknown label id(s) {', '.join(unknown)}" if unknown else "no labels"
            problems.append(f"{csv_name} line {row + 2}: {why} for {fname!r}; skipped")
            continue
        clips.append((row, fname, names))
    return clips, problems


def find_audio(audio_dir: Path, fname: str, extension: str) -> Path | None:
    """The file a CSV row names: ``fname`` itself, else ``fname`` plus ``extension``; None when neither exists.
    A name with a folder in it is a ``DatasetError`` (``dataset_member``)."""
    for name in (fname, fname + extension):
        path = dataset_member(audio_dir, name)
        if path.is_file():
            return path
    return None


def place_audio(source: Path, target: Path, copy: bool) -> None:
    """``target`` as a symbolic link to ``source`` (a copy with ``copy``, or where links cannot be made), written
    under a temporary name and renamed; nothing is done when ``target`` is ``source`` already."""
    if target.exists() and os.path.samefile(source, target):
        return
    with atomic_path(target) as partial:
        partial.unlink(missing_ok=True)  # left by a run that was killed
        if copy or not _symlinked(partial, source):
            shutil.copyfile(source, partial)


def _symlinked(link: Path, source: Path) -> bool:
    """Make ``link`` point at ``source``; False where the filesystem cannot (then the file is copied)."""
    try:
        link.symlink_to(source.resolve())
    except OSError:
        return False
    return True


def convert(args: argparse.Namespace) -> pd.DataFrame:
    """Write the captions file and place the audio; returns the captions (``fname, raw_text``)."""
    templates = check_templates(args.templates or list(DEFAULT_TEMPLATES))
    vocabulary = read_vocabulary(args.vocabulary, *args.vocabulary_columns) if args.vocabulary else None
    table = read_csv(args.labels, (args.file_column, args.labels_column), dtype=str)
    clips, problems = clip_labels(
        table, args.labels.name, args.file_column, args.labels_column, args.label_separator, vocabulary
    )
    split_dir = args.output_dir / args.split
    split_dir.mkdir(parents=True, exist_ok=True)
    rows, placed = [], {}  # placed: output file name -> the line that gave it
    for row, fname, names in tqdm(clips, desc=f"{args.split} audio", unit="clip"):
        where = f"{args.labels.name} line {row + 2}"
        try:
            source = find_audio(args.audio_dir, fname, args.audio_extension)
        except DatasetError as err:
            problems.append(f"{where}: {err}; skipped")
            continue
        if source is None:
            problems.append(
                f"{where}: no audio file {fname!r} nor {fname + args.audio_extension!r} in {args.audio_dir}; skipped"
            )
            continue
        if source.name in placed:
            problems.append(f"{where}: {source.name!r} repeats {placed[source.name]}; skipped")
            continue
        placed[source.name] = f"line {row + 2}"
        place_audio(source, split_dir / source.name, args.copy)
        rows += [(source.name, template.replace(SLOT, join_labels(names))) for template in templates]
    captions = write_caption_rows(rows, problems, str(args.labels), "row", args.output_dir, args.split)
    log.info("%s: %d clips, %d captions, %d row(s) skipped", args.split, len(placed), len(captions), len(problems))
    return captions


def main() -> None:
    args = build_parser().parse_args()
    setup_logging()
    with exit_on_input_error():
        convert(args)


if __name__ == "__main__":
    main()
