"""Extract log-mel energies ``(frames, n_mels)`` of every clip into one HDF5 file per split.

Analysis parameters come from the ``features`` section of the config (sample rate, window,
hop, mel bands). Clips are processed on all cores with a progress bar; a file that cannot
be decoded, is truncated, shorter than one window or longer than ``features.max_seconds``,
or yields NaN/inf is reported and skipped, and the rest is processed.

Work is saved in parts of ``--part-size`` clips (``{split}_logmel.parts/``), so a rerun after
a crash or Ctrl-C continues where it stopped, and a split whose ``{split}_logmel.h5`` already
matches the clip table, the files' sizes and times and the features config is not redone
(``--overwrite`` forces it).
Every file is written under a temporary name and renamed when complete: a crash never
leaves a half-written file behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_config_arguments, exit_on_input_error, make_parser, raw_config, setup_logging

PART_SIZE = 256  # clips per part file: the work a rerun after a crash may have to repeat


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    add_config_arguments(parser, "features", "features.n_mels=128")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count(),
        help="worker processes (default: all cores; 1 runs in this process)",
    )
    parser.add_argument(
        "--part-size",
        type=int,
        default=PART_SIZE,
        help=f"clips per saved part, the most a rerun repeats (default: {PART_SIZE})",
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute splits and parts that are already done")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import h5py
import numpy as np
from tqdm import tqdm

from utils.audio import FeatureConfig, file_logmel, logmel
from utils.config import validate
from utils.errors import AudioError, DatasetError
from utils.stores import AUDIO_COLUMNS, atomic_h5, audio_table, dataset_member, logmel_file, read_table, split_lock

log = logging.getLogger("audio_logmel")

TEXT = h5py.string_dtype()  # variable-length UTF-8 strings: file names and skip reasons, no pickle


def _extract(path: Path, features: FeatureConfig) -> np.ndarray | str:
    """Features of one file, or the error message when it is unusable (returned, not raised, across processes)."""
    try:
        return file_logmel(path, features)
    except (AudioError, FileNotFoundError) as err:
        return str(err)
    except MemoryError:  # e.g. a small compressed file that decodes to many channels at a high rate
        return f"{path}: out of memory while decoding"


def _warm_up(features: FeatureConfig) -> None:
    """Analyse one second of silence: what a worker's first clip would otherwise pay for (imports, JIT)."""
    logmel(np.zeros(int(features.sample_rate), np.float32), features)


def frame_chunks(frames: int, n_mels: int) -> tuple[int, int] | None:
    """HDF5 chunking of a ``(frames, n_mels)`` dataset: blocks of up to 512 frames (none when empty)."""
    return (min(512, frames), n_mels) if frames else None


def _strings(values: list[str]) -> np.ndarray:
    return np.asarray(values, dtype=object).astype(TEXT) if values else np.zeros(0, dtype=TEXT)


def file_stamps(split_dir: Path, fnames: list[str]) -> np.ndarray:
    """``(n, 2)`` size and modification time (ns) of each clip, ``-1`` where there is no usable file:
    a store made before a file was replaced is out of date even if the names did not change."""
    stamps = np.full((len(fnames), 2), -1, dtype=np.int64)
    for i, fname in enumerate(fnames):
        try:
            info = dataset_member(split_dir, fname).stat()
        except (DatasetError, OSError):
            continue
        stamps[i] = info.st_size, info.st_mtime_ns
    return stamps


def write_index(
    f: h5py.File,
    features: FeatureConfig,
    fids: list[int],
    fnames: list[str],
    stamps: np.ndarray,
    kept_fids: list[int],
    offsets: np.ndarray,
    skipped: list[tuple[int, str]],
) -> None:
    """Write everything of a store but its ``logmel`` frames.

    ``offsets`` (n+1,) marks the rows of each kept clip ``fid`` in ``logmel``;
    ``skipped_fid``/``skipped_reason`` list the unusable clips; ``source_fid``/``source_fname``/
    ``source_stamp`` and the ``features`` attribute record what the file was made from, so that
    a rerun can tell whether it is up to date.
    """
    f.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64))
    f.create_dataset("fid", data=np.asarray(kept_fids, dtype=np.int64))
    f.create_dataset("skipped_fid", data=np.asarray([fid for fid, _ in skipped], dtype=np.int64))
    f.create_dataset("skipped_reason", data=_strings([reason for _, reason in skipped]))
    f.create_dataset("source_fid", data=np.asarray(fids, dtype=np.int64))
    f.create_dataset("source_fname", data=_strings(fnames))
    f.create_dataset("source_stamp", data=stamps)
    f.attrs["features"] = features.model_dump_json()


def store_is_current(
    path: Path, features: FeatureConfig, fids: list[int], fnames: list[str], stamps: np.ndarray
) -> bool:
    """Whether the store at ``path`` is complete for exactly these clips, files and features."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return (
                f.attrs.get("features") == features.model_dump_json()
                and f["source_fid"][:].tolist() == fids
                and f["source_fname"].asstr()[:].tolist() == fnames
                and np.array_equal(f["source_stamp"][:], stamps)
            )
    except (OSError, KeyError):  # an unreadable or foreign file is simply made again
        return False


def skipped_clips(f: h5py.File) -> list[tuple[int, str]]:
    return list(zip(f["skipped_fid"][:].tolist(), f["skipped_reason"].asstr()[:].tolist()))


def extract_part(
    pool,
    features: FeatureConfig,
    split_dir: Path,
    fids: list[int],
    fnames: list[str],
    stamps: np.ndarray,
    progress: tqdm,
    target: Path,
) -> None:
    """Extract the clips of one part with ``pool`` and write them to ``target`` (frames and index)."""
    kept, skipped, paths = [], [], []
    for fid, fname in zip(fids, fnames):
        try:
            paths.append((fid, dataset_member(split_dir, fname)))
        except DatasetError as err:
            skipped.append((fid, str(err)))
            log.warning("skipped %s", err)
            progress.update()
    for (fid, _), result in zip(
        paths, pool.map(partial(_extract, features=features), [p for _, p in paths], chunksize=8)
    ):
        if isinstance(result, str):
            skipped.append((fid, result))
            log.warning("skipped %s", result)
        else:
            kept.append((fid, result))
        progress.update()
    frames = np.concatenate([m for _, m in kept]) if kept else np.zeros((0, features.n_mels), np.float32)
    with atomic_h5(target) as f:
        f.create_dataset("logmel", data=frames, chunks=frame_chunks(len(frames), features.n_mels))
        write_index(
            f,
            features,
            fids,
            fnames,
            stamps,
            [fid for fid, _ in kept],
            np.cumsum([0] + [len(m) for _, m in kept]),
            skipped,
        )


def merge_parts(
    parts: list[Path], target: Path, features: FeatureConfig, fids: list[int], fnames: list[str], stamps: np.ndarray
) -> tuple[int, list[str]]:
    """Copy the parts, one at a time, into the split's store; returns ``(kept clips, skip reasons)``."""
    total, kept, first_reason = 0, 0, None
    for part in parts:
        with h5py.File(part, "r") as f:
            total, kept = total + f["logmel"].shape[0], kept + f["fid"].shape[0]
            first_reason = first_reason or next((reason for _, reason in skipped_clips(f)), None)
    if not kept:
        raise DatasetError(
            f"no usable audio file: all {len(fids)} clips were skipped, e.g. {first_reason}; "
            f"nothing written to {target}"
        )
    kept_fids, offsets, skipped = [], [np.zeros(1, np.int64)], []
    with atomic_h5(target) as out:
        frames = out.create_dataset(
            "logmel", shape=(total, features.n_mels), dtype=np.float32, chunks=frame_chunks(total, features.n_mels)
        )
        row = 0
        for part in parts:
            with h5py.File(part, "r") as f:
                n = f["logmel"].shape[0]
                frames[row : row + n] = f["logmel"][:]
                offsets.append(f["offsets"][1:] + row)
                kept_fids += f["fid"][:].tolist()
                skipped += skipped_clips(f)
                row += n
        write_index(out, features, fids, fnames, stamps, kept_fids, np.concatenate(offsets), skipped)
    return kept, [reason for _, reason in skipped]


def extract_split(
    dataset_dir: Path,
    split: str,
    features: FeatureConfig,
    workers: int,
    part_size: int = PART_SIZE,
    overwrite: bool = False,
) -> list[str]:
    """Write ``{split}_logmel.h5`` for every clip of ``{split}_audio.csv``; returns the skipped files' messages."""
    with split_lock(dataset_dir, split, "logmel"):
        audio = read_table(audio_table(dataset_dir, split), AUDIO_COLUMNS)
        fids, fnames = [int(f) for f in audio["fid"]], [str(f) for f in audio["fname"]]
        split_dir = Path(dataset_dir) / split
        stamps = file_stamps(split_dir, fnames)
        target = logmel_file(dataset_dir, split)
        if not overwrite and store_is_current(target, features, fids, fnames, stamps):
            log.info("%s: %s is up to date (--overwrite redoes it)", split, target.name)
            shutil.rmtree(
                target.with_name(f"{target.stem}.parts"), ignore_errors=True
            )  # left by a crash after the last rename
            with h5py.File(target, "r") as f:
                reasons = [reason for _, reason in skipped_clips(f)]
            for reason in reasons:
                log.warning("skipped earlier: %s", reason)
            return reasons

        parts_dir = target.with_name(f"{target.stem}.parts")
        if overwrite:
            shutil.rmtree(parts_dir, ignore_errors=True)
        parts_dir.mkdir(exist_ok=True)
        slices = [slice(start, start + part_size) for start in range(0, len(fids), part_size)]
        parts = [parts_dir / f"part_{i:05d}.h5" for i in range(len(slices))]
        todo = [
            i for i, s in enumerate(slices) if not store_is_current(parts[i], features, fids[s], fnames[s], stamps[s])
        ]
        done_clips = sum(len(fids[s]) for i, s in enumerate(slices) if i not in todo)
        if done_clips:
            log.info(
                "%s: %d of %d parts already done in %s; continuing",
                split,
                len(parts) - len(todo),
                len(parts),
                parts_dir,
            )
        # --workers 1 decodes in this process (one thread), which is easier to debug and to profile
        with ProcessPoolExecutor(max_workers=workers) if workers > 1 else ThreadPoolExecutor(max_workers=1) as pool:
            # Workers start, import the audio libraries and compile their first call (up to tens of seconds)
            # before the bar opens, so that its rate and time estimate are those of the clips.
            log.info("%s: starting %d worker(s) for %d clips", split, workers, len(fids) - done_clips)
            list(pool.map(_warm_up, [features] * workers))
            with tqdm(total=len(fids), initial=done_clips, desc=f"log-mel {split}", unit="clip") as progress:
                for i in todo:
                    s = slices[i]
                    try:
                        extract_part(pool, features, split_dir, fids[s], fnames[s], stamps[s], progress, parts[i])
                    except BrokenProcessPool:
                        raise DatasetError(
                            f"{split}: a worker process died (out of memory?) in the part from {fnames[s][0]!r} "
                            f"to {fnames[s][-1]!r}; "
                            "finished parts are kept: rerun to continue, with fewer --workers if memory is short"
                        ) from None
        kept, reasons = merge_parts(parts, target, features, fids, fnames, stamps)
        shutil.rmtree(parts_dir)
        log.info("%s: %d clips, %d skipped -> %s", split, kept, len(reasons), target)
        return reasons


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.workers < 1 or args.part_size < 1:
        parser.error("--workers and --part-size must be at least 1")
    setup_logging()
    with exit_on_input_error():
        config = validate(raw_config(args))
        for split in args.splits or config.data.splits():
            extract_split(config.data.dataset_dir, split, config.features, args.workers, args.part_size, args.overwrite)


if __name__ == "__main__":
    main()
