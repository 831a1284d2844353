"""Compute once what the transformers towers of a config read, into one HDF5 store per split and tower.

- A frozen audio tower (trainable: false): its backbone's outputs at the configured layer for every view
  of every clip: one mean frame per view when the head commutes with mean pooling (no adapter or a
  linear one), else all frames in float16.
- A trainable audio tower: its feature extractor's output for every view (the model inputs).
- A frozen text tower: one vector per caption.
Views: the whole clip, or with crops.seconds set, crops.train_views random crops per training clip
(drawn once, seeded by the clip) and the centred crop or sliding windows of the other splits.

The store records the model id, revision, layer, extractor and view settings and the clip list; a split
whose store matches is not redone (--overwrite forces it). Audio work is saved in parts of --part-size
clips ({split}_{store}.parts/), so a rerun after a crash or Ctrl-C continues where it stopped; every file
is written under a temporary name and renamed when complete. main.py runs this itself (as Ray tasks,
where the trials' GPUs are) when a store is missing. Log-mel and Sentence-BERT towers need nothing here.
Without --splits and --dataset-dir the training split of each data.extra_train source is done too.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_config_arguments, exit_on_input_error, make_parser, raw_config, setup_logging

PART_SIZE = 256  # clips per part file: the work a rerun after a crash may have to repeat


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    add_config_arguments(parser, "model", "model.audio_enc.layer=-2")
    parser.add_argument("--batch-size", type=int, default=16, help="views or captions per model call (default: 16)")
    parser.add_argument("--part-size", type=int, default=PART_SIZE, help=f"clips per saved part (default: {PART_SIZE})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the config's device")
    parser.add_argument("--overwrite", action="store_true", help="recompute stores and parts that are up to date")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import json
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from models.audio_encoders import AUDIO_ENCODERS
from models.pooling import masked_mean
from models.text_encoders import TEXT_ENCODERS
from utils.audio import clip_views, load_audio
from utils.config import Config, validate
from utils.errors import AudioError, DatasetError
from utils.extractors import CaptionTokens, make_extractor
from utils.runtime import resolve_device
from utils.stores import TEXT_COLUMNS, atomic_h5, dataset_member, read_table, split_lock, text_table
from utils.tower_stores import audio_store, extra_sources, source_ids, store_problem, text_store

log = logging.getLogger("tower_stores")

TEXT = h5py.string_dtype()


def _strings(values: list[str]) -> np.ndarray:
    return np.asarray(values, dtype=object).astype(TEXT) if values else np.zeros(0, dtype=TEXT)


def write_store(
    f: h5py.File,
    settings: dict[str, Any],
    ids: list[int],
    names: list[str],
    item_ids: list[int],
    arrays: list[np.ndarray],
    extras: dict[str, list[Any]],
    dtype: Any,
) -> None:
    """Fill an open store: items ``item_ids`` with their ``arrays`` and scalar ``extras``, made from the
    sources ``ids``/``names`` with ``settings``."""
    width = arrays[0].shape[1] if arrays else 0
    rows = np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0, width), dtype)
    f.create_dataset("rows", data=rows, chunks=(min(512, len(rows)), width) if len(rows) else None)
    offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
    write_index(f, settings, ids, names, offsets, item_ids, {name: np.asarray(v) for name, v in extras.items()})


def write_index(
    f: h5py.File,
    settings: dict[str, Any],
    ids: list[int],
    names: list[str],
    offsets: np.ndarray,
    item_ids: Any,
    extras: dict[str, np.ndarray],
) -> None:
    """Everything of a store but its ``rows``: each item's ``offsets`` (n+1,), id and scalars, and what it was
    made from (``source_id``/``source_name``, the ``settings`` attribute)."""
    f.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64))
    f.create_dataset("item_id", data=np.asarray(item_ids, dtype=np.int64))
    for name, values in extras.items():
        f.create_dataset(f"extra/{name}", data=values)
    f.create_dataset("source_id", data=np.asarray(ids, dtype=np.int64))
    f.create_dataset("source_name", data=_strings(names))
    f.attrs["settings"] = json.dumps(settings)


@torch.inference_mode()
def tower_outputs(tower: torch.nn.Module, inputs: dict[str, torch.Tensor], pooled: bool) -> list[np.ndarray]:
    """A frozen backbone on a batch of model inputs -> per view ``(1, D)`` mean frame or ``(T', D)`` frames."""
    device = next(tower.parameters()).device
    frames, lengths = tower.frames(**{k: v.to(device) for k, v in inputs.items()})
    if pooled:
        return [row[None] for row in masked_mean(frames.float(), lengths).cpu().numpy()]
    return [f[:n].cpu().numpy() for f, n in zip(frames.float(), lengths.tolist())]


@dataclass
class AudioStorePlan:
    """An audio store and the parts (``part_size`` clips each) it is written in, so that they can be computed
    apart (``main.py`` runs one Ray task per part) and merged once all are done."""

    path: Path
    settings: dict[str, Any]
    fids: list[int]
    fnames: list[str]
    slices: list[slice]
    parts: list[Path]

    def todo(self) -> list[int]:
        """The parts not yet written (or written with other settings or clips)."""
        return [
            i
            for i, s in enumerate(self.slices)
            if store_problem(self.parts[i], self.settings, self.fids[s], self.fnames[s]) is not None
        ]


def plan_audio_store(config: Config, split: str, part_size: int = PART_SIZE) -> AudioStorePlan | None:
    """The audio store of ``split`` and its parts (None: the tower reads log-mels); makes the parts folder."""
    store = audio_store(config, split)
    if store is None:
        return None
    path, settings = store
    fids, fnames = source_ids(config.data.dataset_dir, split, text=False)
    parts_dir = path.with_name(f"{path.stem}.parts")
    parts_dir.mkdir(exist_ok=True)
    slices = [slice(start, start + part_size) for start in range(0, len(fids), part_size)]
    parts = [parts_dir / f"part_{i:05d}.h5" for i in range(len(slices))]
    return AudioStorePlan(path, settings, fids, fnames, slices, parts)


def store_lock(path: Path, split: str) -> AbstractContextManager[None]:
    """The ``split_lock`` of the tower store ``path`` of ``split`` (its kind: the file name after the split's)."""
    return split_lock(path.parent, split, path.stem.removeprefix(f"{split}_"))


def write_audio_parts(
    config: Config,
    split: str,
    device: torch.device,
    indices: list[int],
    batch_size: int = 16,
    part_size: int = PART_SIZE,
) -> None:
    """Compute and write the parts ``indices`` of the audio store of ``split`` (those not yet done)."""
    plan = plan_audio_store(config, split, part_size)
    todo = [i for i in plan.todo() if i in indices]
    if not todo:
        return
    tower_config, settings, dataset_dir = config.model.audio_enc, plan.settings, config.data.dataset_dir
    extractor = make_extractor(tower_config)
    outputs = settings["kind"] == "outputs"
    tower = None
    if outputs:
        tower = AUDIO_ENCODERS.get(tower_config.name)(tower_config, load_backbone=True).to(device).eval()
    train = split == config.data.train_split
    what = f"{tower_config.name} {'outputs' if outputs else 'inputs'} {split}"
    with tqdm(total=sum(len(plan.fids[plan.slices[i]]) for i in todo), desc=what, unit="clip") as progress:
        for i in todo:
            s = plan.slices[i]
            items, item_fids = [], []
            for fid, fname in zip(plan.fids[s], plan.fnames[s]):
                try:
                    wave = load_audio(
                        dataset_member(dataset_dir / split, fname), extractor.sample_rate, config.features.max_seconds
                    )
                except (AudioError, DatasetError, FileNotFoundError) as err:
                    log.warning("skipped %s", err)
                    progress.update()
                    continue
                # views and the extractor's own random draws (CLAP fusion) are seeded by the clip: reproducible
                views = clip_views(wave, extractor.sample_rate, config.crops, train, np.random.default_rng(fid))
                if train and config.crops.seconds is None and extractor.draws_at_random:
                    views *= max(1, config.crops.train_views)  # the extractor's own draws (CLAP fusion) differ
                items += [extractor.extract(view, seed=fid * 1000 + k, train=train) for k, view in enumerate(views)]
                item_fids += [fid] * len(views)
                progress.update()
            if outputs:
                arrays = []
                for start in range(0, len(items), batch_size):
                    batch = extractor.collate(items[start : start + batch_size])
                    arrays += tower_outputs(tower, batch, settings["model"]["pooled"])
                extras: dict[str, list[Any]] = {}
            else:
                arrays = [item["rows"] for item in items]
                extras = {name: [item[name] for item in items] for name in items[0] if name != "rows"} if items else {}
            dtype = np.float16 if outputs and not settings["model"]["pooled"] else np.float32
            with atomic_h5(plan.parts[i]) as f:
                write_store(f, settings, plan.fids[s], plan.fnames[s], item_fids, arrays, extras, dtype)
            if i == todo[0] and arrays:
                per_clip = sum(a.size for a in arrays) * np.dtype(dtype).itemsize / max(1, len(plan.fids[s]))
                log.info("%s: writing about %.1f MB to %s", split, per_clip * len(plan.fids) / 2**20, plan.path)


def finish_audio_store(plan: AudioStorePlan) -> Path:
    """Merge a store's finished parts into it and remove them."""
    merge_parts(plan.parts, plan.path, plan.settings, plan.fids, plan.fnames)
    shutil.rmtree(plan.parts[0].parent)
    log.info("%s", plan.path)
    return plan.path


def write_audio_store(
    config: Config,
    split: str,
    device: torch.device,
    batch_size: int = 16,
    part_size: int = PART_SIZE,
    overwrite: bool = False,
) -> Path | None:
    """Write the audio tower's store of ``split`` (None: the tower reads log-mels); returns its path."""
    store = audio_store(config, split)
    if store is None:
        return None
    path, settings = store
    if not overwrite and store_problem(path, settings, *source_ids(config.data.dataset_dir, split, text=False)) is None:
        log.info("%s: %s is up to date (--overwrite redoes it)", split, path.name)
        return path
    if overwrite:
        shutil.rmtree(path.with_name(f"{path.stem}.parts"), ignore_errors=True)
    plan = plan_audio_store(config, split, part_size)
    write_audio_parts(config, split, device, list(range(len(plan.parts))), batch_size, part_size)
    return finish_audio_store(plan)


def merge_parts(parts: list[Path], path: Path, settings: dict[str, Any], fids: list[int], fnames: list[str]) -> None:
    """Join the parts' items into the split's store, one part in memory at a time."""
    total, width, dtype, extra_names = 0, 0, np.float32, []
    for part in parts:
        with h5py.File(part, "r") as f:
            if f["rows"].shape[0] and not total:  # the layout of the first part that kept a clip
                width, dtype, extra_names = f["rows"].shape[1], f["rows"].dtype, list(f.get("extra", {}))
            total += f["rows"].shape[0]
    if total == 0:
        raise DatasetError(
            f"no usable audio file: every clip was skipped (see the warnings); nothing written to {path}"
        )
    with atomic_h5(path) as out:
        rows = out.create_dataset("rows", shape=(total, width), dtype=dtype, chunks=(min(512, total), width))
        offsets, item_ids, extras, row = [np.zeros(1, np.int64)], [], {n: [] for n in extra_names}, 0
        for part in parts:
            with h5py.File(part, "r") as f:
                n = f["rows"].shape[0]
                if n == 0:  # every clip of the part was skipped
                    continue
                rows[row : row + n] = f["rows"][:]
                offsets.append(f["offsets"][1:] + row)
                item_ids.append(f["item_id"][:])
                for name in extra_names:
                    extras[name].append(f[f"extra/{name}"][:])
                row += n
        extras = {name: np.concatenate(values) for name, values in extras.items()}
        write_index(out, settings, fids, fnames, np.concatenate(offsets), np.concatenate(item_ids), extras)


@torch.inference_mode()
def write_text_store(
    config: Config, split: str, device: torch.device, batch_size: int = 64, overwrite: bool = False
) -> Path | None:
    """Write a frozen text tower's caption vectors for ``split`` (None: the text tower needs no store)."""
    store = text_store(config, split)
    if store is None:
        return None
    path, settings = store
    cids, captions = source_ids(config.data.dataset_dir, split, text=True)
    if not overwrite and store_problem(path, settings, cids, captions) is None:
        log.info("%s: %s is up to date (--overwrite redoes it)", split, path.name)
        return path
    tower_config = config.model.text_enc
    tower = TEXT_ENCODERS.get(tower_config.name)(tower_config, load_backbone=True).to(device).eval()
    tokens = CaptionTokens(tower_config)
    table = read_table(text_table(config.data.dataset_dir, split), TEXT_COLUMNS)
    embedded = [str(c) for c in table[config.text_embeddings.caption_column]]
    size = len(embedded) * tower.width * (2 * tower.config.max_length if tower.sequence else 4) / 2**20
    log.info("%s: writing about %.1f MB (%d captions x %d) to %s", split, size, len(embedded), tower.width, path)
    vectors = []
    for start in tqdm(range(0, len(embedded), batch_size), desc=f"{tower_config.name} {split}", unit="batch"):
        batch = {k: v.to(device) for k, v in tokens(embedded[start : start + batch_size]).items()}
        vectors.append(tower.pool(**batch).float().cpu().numpy())
    vectors = np.concatenate(vectors)  # (n, D), or a sequence tower's (n, L, D)
    if not np.isfinite(vectors).all():
        raise DatasetError(f"{tower_config.model_id} gives NaN/inf vectors for captions of {split}; nothing written")
    # one row per caption, or a sequence's L rows (float16: a 77 x 1024 target is 154 KB, read per caption)
    items, dtype = (list(vectors), np.float16) if vectors.ndim == 3 else (list(vectors[:, None, :]), np.float32)
    with atomic_h5(path) as f:
        write_store(f, settings, cids, captions, cids, items, {}, dtype)
    log.info("%s: %d captions x %s -> %s", split, len(vectors), " x ".join(map(str, vectors.shape[1:])), path)
    return path


def prepare_split(
    config: Config,
    split: str,
    device: str | None = None,
    batch_size: int = 16,
    part_size: int = PART_SIZE,
    overwrite: bool = False,
) -> list[Path]:
    """Write every tower store ``split`` needs, here (``main.py`` spreads the same work over Ray tasks)."""
    target = resolve_device(device or config.device)
    with ExitStack() as locks:
        for store in (audio_store(config, split), text_store(config, split)):
            if store is not None:
                locks.enter_context(store_lock(store[0], split))
        written = [
            write_audio_store(config, split, target, batch_size, part_size, overwrite),
            write_text_store(config, split, target, max(batch_size, 64), overwrite),
        ]
    return [path for path in written if path is not None]


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.batch_size < 1 or args.part_size < 1:
        parser.error("--batch-size and --part-size must be at least 1")
    setup_logging()
    with exit_on_input_error():
        config = validate(raw_config(args))
        for split in args.splits or config.data.splits():
            prepare_split(config, split, args.device, args.batch_size, args.part_size, args.overwrite)
        if not args.splits and args.dataset_dir is None:  # the config's own datasets: its extra training data too
            for source in extra_sources(config):
                split = source.data.train_split
                prepare_split(source, split, args.device, args.batch_size, args.part_size, args.overwrite)


if __name__ == "__main__":
    main()
