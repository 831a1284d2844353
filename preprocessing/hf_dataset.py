"""Import a Hugging Face ``datasets`` audio dataset into the Clotho layout: its audio files and captions.

SOURCE is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (--hf-split chooses
among a DatasetDict's splits), or a hub id (online only; --hf-config names a configuration, --streaming reads
it item by item instead of downloading it whole, and --max-items stops after N items: a slice of a corpus
such as GigaSpeech). The audio column is read without the ``datasets`` decoder (``Audio(decode=False)``:
each item's bytes or file path), so neither FFmpeg nor torchcodec is needed: the project's reader
(libsndfile: WAV, FLAC, OGG, MP3, ...) checks each file, which is written as it came into ``{split}/``, or
with --wav decoded and written as 16-bit PCM WAV (mono) at its own sample rate. The text column (a string,
or a list of strings: several captions) gives each clip's captions in ``{split}_captions.csv`` (fname,raw_text:
one caption per row, as clotho_dataset.py reads it). Preprocess the folder like any other and train on it
alone or beside Clotho (data.extra_train).

A clip's file name is its source file's name when it has one not taken by an earlier item, else its index
(``00000042.flac``), so a rerun writes the same names. Items without audio, with audio libsndfile cannot
read, or without text are skipped with a warning. Every file is written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import exit_on_input_error, make_parser, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument("source", help="a folder written by save_to_disk, or a hub id (online only)")
    parser.add_argument("--audio-column", default="audio", help="the column holding the audio (default: audio)")
    parser.add_argument(
        "--text-column", default="text", help="the column holding a caption or a list of captions (default: text)"
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="dataset folder to write (Clotho layout)")
    parser.add_argument("--split", default="development", help="split name to write (default: development)")
    parser.add_argument("--hf-split", help="the source's split (default: a DatasetDict's only split; hub: train)")
    parser.add_argument("--hf-config", help="a hub dataset's configuration name")
    parser.add_argument("--streaming", action="store_true", help="read item by item instead of loading it whole")
    parser.add_argument("--max-items", type=int, metavar="N", help="stop after N items (default: all)")
    parser.add_argument(
        "--wav", action="store_true", help="write every clip as 16-bit PCM WAV (default: the bytes as they came)"
    )
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before datasets loads (seconds)

import pandas as pd
import soundfile as sf
from datasets import Audio, DatasetDict, load_dataset, load_from_disk
from tqdm import tqdm

from models.pretrained import _reason
from utils.audio import load_audio, open_audio
from utils.errors import AudioError, DatasetError, InputError
from utils.stores import atomic_path, dataset_member, write_caption_rows

log = logging.getLogger("hf_dataset")


def open_source(source: str, hf_split: str | None, hf_config: str | None, streaming: bool) -> tuple[Any, int | None]:
    """``(dataset, number of items or None when streamed from the hub)``: a ``save_to_disk`` folder's
    dataset (or split), or the hub dataset ``source``."""
    if not Path(source).is_dir():
        try:
            dataset = load_dataset(source, hf_config, split=hf_split or "train", streaming=streaming)
        except Exception as err:  # offline, unknown id, gated, no such split: "cannot load"
            raise DatasetError(
                f"{source}: cannot load it: no such folder, and the Hugging Face hub did not give that dataset "
                f"({_reason(err)}); where there is internet, save it with save_to_disk and name that folder"
            ) from None
        return dataset, None if streaming else len(dataset)
    try:
        dataset = load_from_disk(source)
    except Exception as err:
        raise DatasetError(f"{source}: not a folder written by save_to_disk ({_reason(err)})") from None
    if isinstance(dataset, DatasetDict):
        if hf_split is None and len(dataset) == 1:
            hf_split = next(iter(dataset))
        if hf_split not in dataset:
            raise InputError(f"{source}: choose one of its splits {', '.join(dataset)} with --hf-split")
        dataset = dataset[hf_split]
    elif hf_split is not None:
        raise InputError(f"--hf-split {hf_split}: {source} holds one dataset, without splits")
    return (dataset.to_iterable_dataset() if streaming else dataset), len(dataset)


def select_columns(dataset: Any, source: str, audio_column: str, text_column: str) -> Any:
    """The dataset's audio and text columns only, the audio as ``{"bytes", "path"}`` (``Audio(decode=False)``).
    A streamed dataset that does not give its features is left as it is: nothing decodes its items, which come as
    stored, and ``import_dataset`` checks their columns."""
    if dataset.features is None:
        return dataset
    for option, column in (("--audio-column", audio_column), ("--text-column", text_column)):
        if column not in dataset.features:
            raise InputError(f"{option} {column}: {source} has no such column; it has {', '.join(dataset.features)}")
    return dataset.select_columns([audio_column, text_column]).cast_column(audio_column, Audio(decode=False))


def captions_of(value: Any, text_column: str, index: int) -> list[str]:
    """An item's captions: its text (a string or a list of strings), stripped, the empty ones left out."""
    if value is None:  # no text: the item is skipped with a warning, as one with only blank text
        return []
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list | tuple) or not all(isinstance(text, str) for text in texts):
        raise InputError(
            f"--text-column {text_column}: item {index} holds {type(value).__name__}, not text (a string or a list "
            "of strings)"
        )
    return [text.strip() for text in texts if text.strip()]


def audio_bytes(audio: dict[str, Any] | None) -> bytes | None:
    """An item's audio file: its bytes, else the file at its local path; None when it has neither."""
    if not audio:
        return None
    if audio.get("bytes"):
        return audio["bytes"]
    path = audio.get("path")
    return Path(path).read_bytes() if path and os.path.isfile(path) else None


def source_name(audio: dict[str, Any] | None) -> str:
    """The file name of an item's source path (``clips/a.flac`` -> ``a.flac``; of a chained URL such as
    ``a.flac::https://...`` the first part's), empty when it has none."""
    path = (audio or {}).get("path") or ""
    return PurePosixPath(path.split("::")[0]).name


def clip_name(name: str, index: int, suffix: str, taken: set[str], folder: Path) -> str:
    """``name`` if it is a plain file name not ``taken``, else the item's index with ``suffix``."""
    try:
        dataset_member(folder, name)
    except DatasetError:  # empty, a folder in it, or too long for a file system
        name = ""
    fallback, k = f"{index:08d}{suffix}", 0
    while fallback in taken:  # a source file named like an index
        k += 1
        fallback = f"{index:08d}_{k}{suffix}"
    return name if name and name not in taken else fallback


def write_clip(data: bytes, folder: Path, index: int, name: str, taken: set[str], wav: bool) -> str:
    """Write one item's audio into ``folder``; returns its file name. An ``AudioError`` (naming the item) when the
    project's reader refuses it: not a format libsndfile reads, no samples, cut short."""
    scratch = folder / f".item_{index:08d}.partial"
    try:
        scratch.write_bytes(data)
        try:
            with open_audio(scratch) as f:  # the header: readable, has samples, not cut short
                rate, kind = f.samplerate, f.format.lower()
            wave = load_audio(scratch, rate) if wav else None  # (samples,) mono float32, at its own rate
        except AudioError as err:
            raise AudioError(str(err).replace(str(scratch), f"item {index} ({name or 'no file name'})")) from None
        suffix = ".wav" if wav else f".{kind}"
        if name and (wav or not PurePosixPath(name).suffix):  # a.mp3 -> a.wav; 12345 -> 12345.flac
            name = PurePosixPath(name).stem + suffix
        clip = clip_name(name, index, suffix, taken, folder)
        if wav:
            with atomic_path(folder / clip) as partial:
                sf.write(partial, wave, rate, subtype="PCM_16", format="WAV")
        else:
            os.replace(scratch, folder / clip)
    finally:
        scratch.unlink(missing_ok=True)
    return clip


def import_dataset(args: argparse.Namespace) -> pd.DataFrame:
    """Write the clips and ``{split}_captions.csv``; returns the captions (``fname, raw_text``)."""
    dataset, total = open_source(args.source, args.hf_split, args.hf_config, args.streaming)
    dataset = select_columns(dataset, args.source, args.audio_column, args.text_column)
    if args.max_items is not None:
        total = args.max_items if total is None else min(total, args.max_items)
    folder = args.output_dir / args.split
    folder.mkdir(parents=True, exist_ok=True)
    rows, taken, problems = [], set(), []
    items = itertools.islice(dataset, args.max_items)  # a streamed corpus is read no further than this
    for index, item in enumerate(tqdm(items, total=total, desc=f"{args.split} clips", unit="clip")):
        for option, column in (("--audio-column", args.audio_column), ("--text-column", args.text_column)):
            if column not in item:  # a streamed dataset that did not give its features
                raise InputError(f"{option} {column}: item {index} has no such column; it has {', '.join(item)}")
        captions = captions_of(item[args.text_column], args.text_column, index)
        audio = item[args.audio_column]
        audio = {"bytes": None, "path": audio} if isinstance(audio, str) else audio
        data, name = audio_bytes(audio), source_name(audio)
        if not captions or data is None:
            problems.append(f"item {index} ({name or 'no file name'}): no {'text' if data else 'audio'}; skipped")
            continue
        try:
            clip = write_clip(data, folder, index, name, taken, args.wav)
        except AudioError as err:
            problems.append(f"{err}; skipped")
            continue
        taken.add(clip)
        rows += [(clip, caption) for caption in captions]
    table = write_caption_rows(rows, problems, args.source, "item", args.output_dir, args.split)
    log.info("%s: %d clips, %d captions, %d item(s) skipped", args.split, len(taken), len(table), len(problems))
    return table


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.max_items is not None and args.max_items < 1:
        parser.error("--max-items must be at least 1")
    setup_logging()
    with exit_on_input_error():
        import_dataset(args)


if __name__ == "__main__":
    main()
