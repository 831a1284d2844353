"""Index a folder of sounds for search: every audio file in it and below it embedded by a trained model into one
HDF5 index file (float16 unit vectors, the files' relative names, the model's config hash; with a text-aware
pooling head also each file's projected frames, which example/search.py re-ranks its shortlist with).

    python example/index.py --folder sounds/ --index sounds.h5
    python example/index.py --folder sounds/ --index sounds.h5 --checkpoint runs/<experiment>/best

Files are embedded and written in batches, so a rerun after a crash or Ctrl-C continues where it stopped, and a
rerun after files were added embeds only the new ones; the index file itself is replaced only when a run is
complete. Unreadable files are reported and skipped. An index belongs to one model and one folder: a rerun with
another is refused unless given --rebuild.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_model_arguments, exit_on_input_error, make_parser, positive_int, setup_logging

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")  # what libsndfile decodes
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument("--folder", type=Path, required=True, help="folder of audio files to index (recursively)")
    parser.add_argument("--index", type=Path, required=True, help="index file to write or extend (HDF5)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        help="files embedded between two writes to the index (default: 64)",
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="start the index afresh (another model or folder, or to drop files)"
    )
    add_model_arguments(parser)
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import torch
from tqdm import tqdm

from models.dual_encoder import DualEncoderModel
from models.pooling import valid_frames
from utils.errors import AudioError, InputError
from utils.experiments import find_model
from utils.inference import AudioEmbeddings, audio_file_encoder, load_for_inference
from utils.vector_index import IndexInfo, IndexWriter, config_hash, create_index, read_fnames, read_info


def main() -> None:
    args = build_parser().parse_args()
    setup_logging()
    with exit_on_input_error():
        model_path, _ = find_model(args.checkpoint, args.best, args.config, args.overrides, args.experiment)
        build_index(model_path, args.folder, args.index, args.batch_size, args.rebuild, args.device)


def audio_files(folder: Path) -> list[str]:
    """Every audio file (by suffix, any case) in ``folder`` and below it: sorted paths relative to it, with ``/``."""
    found = (p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    return sorted(p.relative_to(folder).as_posix() for p in found)


def check_same_source(path: Path, info: IndexInfo) -> None:
    """Refuse to extend the index at ``path`` with another model's vectors or another folder's files."""
    stored = read_info(path)
    if stored.config_hash != info.config_hash:
        raise InputError(
            f"{path}: made by another model (config hash {stored.config_hash[:12]}, this one's "
            f"{info.config_hash[:12]}; it was made by {stored.model}): index with that model, or give --rebuild"
        )
    if stored.root != info.root:
        raise InputError(f"{path}: indexes {stored.root}, not {info.root}: give that --folder, or --rebuild")


@torch.no_grad()
def build_index(
    model_path: Path,
    folder: Path,
    index: Path,
    batch_size: int = 64,
    rebuild: bool = False,
    device: str | None = None,
) -> IndexInfo:
    """Embed every audio file under ``folder`` that ``index`` lacks (all of them with ``rebuild``) with the model at
    ``model_path``, ``batch_size`` files per write, and return the finished index's attributes. The work goes into
    ``<index>.partial`` (``start_partial``), renamed to ``index`` when every file is done; a run that stopped is
    continued from there. Unreadable files are skipped, and tried again by the next run."""
    folder, index = Path(folder).resolve(), Path(index)
    if not folder.is_dir():
        raise InputError(f"--folder: {folder} is not a folder")
    names = audio_files(folder)
    if not names:
        raise InputError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in it or below it")
    model, config, target = load_for_inference(model_path, device)
    if model.sequence:
        raise InputError(
            f"{model_path}: a sequence head ({config.model.pooling.name}) gives prompt sequences, not "
            "clip vectors to search; index with a retrieval model"
        )
    info = IndexInfo(
        config_hash(config), str(Path(model_path).resolve()), str(folder), config.model.embed_dim, model.text_aware
    )
    partial = index.with_name(index.name + ".partial")
    if rebuild:
        partial.unlink(missing_ok=True)
    existing = None if rebuild else next((p for p in (partial, index) if p.is_file()), None)
    done = set()
    if existing is not None:
        check_same_source(existing, info)
        done = set(read_fnames(existing))
        if gone := sorted(done - set(names)):
            log.warning(
                "%d indexed file(s) are no longer under %s (e.g. %s); --rebuild drops them", len(gone), folder, gone[0]
            )
    todo = [name for name in names if name not in done]
    log.info("%d of %d files under %s to add to %s (%d there)", len(todo), len(names), folder, index, len(done))
    encode, skipped, writer = audio_file_encoder(model, config, target), 0, None
    with contextlib.ExitStack() as stack, tqdm(total=len(todo), desc="index", unit="file") as progress:
        try:
            for start in range(0, len(todo), batch_size):
                views = {}  # file name -> its views' frames (T_v, E)
                for name in todo[start : start + batch_size]:
                    try:
                        views[name] = encode(folder / name)
                    except AudioError as err:  # one bad file never stops the run
                        log.warning("skipped %s", err)
                        skipped += 1
                    progress.update()
                if views and writer is None:  # the first file to add: only now is a partial index needed
                    start_partial(existing, index, partial, info)
                    writer = stack.enter_context(IndexWriter(partial))
                if views:
                    write_batch(writer, model, views)
        except KeyboardInterrupt:
            log.warning("stopped after %d of %d files; rerun the same command to continue", progress.n, len(todo))
            raise
    unreadable = f", {skipped} unreadable file(s) skipped" if skipped else ""
    if writer is None and existing != partial:  # nothing added: an index stays as it was
        if existing is None:
            raise InputError(f"no usable audio file: all {len(names)} under {folder} were skipped; nothing written")
        log.info("%s is up to date: %d files%s", index, len(done), unreadable)
        return read_info(index)
    partial.replace(index)  # a rename: readers see the old index or the whole new one
    info = read_info(index)
    log.info("%s: %d files indexed%s", index, info.count, unreadable)
    return info


def start_partial(existing: Path | None, index: Path, partial: Path, info: IndexInfo) -> None:
    """Make ``partial`` the file this run appends to: a new index, a copy of the finished ``index`` (which stays
    whole until this run is), or (``existing`` is ``partial``) what a run that stopped left there."""
    if existing is None or existing == index:
        # made whole under another name first: a run killed while copying leaves no partial index to resume
        staging = partial.with_name(partial.name + ".tmp")
        if existing is None:
            create_index(staging, info)
        else:
            shutil.copyfile(index, staging)
        staging.replace(partial)


def write_batch(writer: IndexWriter, model: DualEncoderModel, views: dict[str, list[torch.Tensor]]) -> None:
    """Append files with their views' frames to the index: each file's unit vector (a text-aware head's normalised
    mean frame) and, for a text-aware head, its valid frames."""
    each_view = [frames for file_views in views.values() for frames in file_views]
    clip = [row for row, file_views in enumerate(views.values()) for _ in file_views]
    audio = AudioEmbeddings.of_views(model, each_view, clip, len(views))  # frames (b, T, E), lengths (b,)
    frames = lengths = None
    if model.text_aware:
        valid = valid_frames(audio.lengths, audio.frames.size(1))  # (b, T); row-major: each file's frames in order
        frames, lengths = audio.frames[valid], audio.lengths  # (sum T_i, E), (b,)
    writer.append(list(views), audio.pooled(), frames, lengths)


if __name__ == "__main__":
    main()
