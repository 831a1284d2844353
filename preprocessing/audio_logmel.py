"""Extract log-mel energies ``(frames, n_mels)`` of every clip into one HDF5 file per split.

Analysis parameters come from the ``features`` section of the config (sample rate, window,
hop, mel bands). Clips are processed on all cores with a progress bar; a file that cannot
be decoded, is shorter than one window or yields NaN/inf is reported and skipped. The
output is written under a temporary name and renamed when complete, so a crash never
leaves a half-written ``{split}_logmel.h5`` behind.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any folder

from utils.audio import AudioError, file_logmel  # noqa: E402
from utils.config import ConfigError, FeatureConfig, load_raw, validate  # noqa: E402
from utils.data import atomic_h5, audio_table, logmel_file, read_table  # noqa: E402
from utils.runtime import setup_logging  # noqa: E402

log = logging.getLogger("audio_logmel")


def _extract(path: Path, features: FeatureConfig) -> np.ndarray | str:
    """Features of one file, or the error message when it is unusable (returned, not raised, across processes)."""
    try:
        return file_logmel(path, features)
    except AudioError as err:
        return str(err)


def extract_split(dataset_dir: Path, split: str, features: FeatureConfig, workers: int) -> list[str]:
    """Write ``{split}_logmel.h5`` for every clip of ``{split}_audio.csv``; returns the skipped files' messages."""
    audio = read_table(audio_table(dataset_dir, split))
    paths = [dataset_dir / split / f for f in audio["fname"]]
    target = logmel_file(dataset_dir, split)
    kept_fids, chunks, skipped = [], [], []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(partial(_extract, features=features), paths, chunksize=8)
        for fid, result in tqdm(zip(audio["fid"], results), total=len(paths), desc=f"log-mel {split}", unit="clip"):
            if isinstance(result, str):
                skipped.append(result)
            else:
                kept_fids.append(int(fid))
                chunks.append(result)
    if not chunks:
        raise RuntimeError(f"{split}: no usable audio file; nothing written")
    offsets = np.cumsum([0] + [c.shape[0] for c in chunks])
    with atomic_h5(target) as f:
        f.create_dataset("logmel", data=np.concatenate(chunks), chunks=(min(512, int(offsets[-1])), features.n_mels))
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("fid", data=np.asarray(kept_fids, dtype=np.int64))
        for key, value in features.model_dump().items():
            f.attrs[key] = "none" if value is None else value
    log.info("%s: %d clips, %d frames -> %s", split, len(kept_fids), offsets[-1], target)
    return skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, required=True, help="dataset folder indexed by clotho_dataset.py")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "conf.yaml", help="config with the features section (default: conf.yaml)")
    parser.add_argument("--splits", nargs="+", default=["development", "validation", "evaluation"], help="splits to process")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. features.n_mels=128")
    args = parser.parse_args()
    setup_logging()
    try:
        features = validate(load_raw(args.config, args.overrides)).features
    except ConfigError as err:
        sys.exit(f"error: {err}")
    for split in args.splits:
        for message in extract_split(args.dataset_dir, split, features, args.workers):
            log.warning("skipped %s", message)


if __name__ == "__main__":
    main()
