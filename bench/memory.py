"""Peak resident memory of one trial at 1x and 8x the demo dataset's size: bounded by the batch, not the dataset.

The stores are written directly, with random data in the demo's shapes (``write_random_dataset``: its clip
counts, clip lengths, 64 mel bands, 384-d caption vectors, five captions per clip), by the project's writers, not
preprocessed from audio. Each trial (``utils.training.train``: one training epoch, then validation as a trial
does it: the validation loss, every clip and caption embedded, the retrieval metrics, a checkpoint) runs in a
fresh process, and its peak resident set (``ru_maxrss`` from ``os.wait4`` of that process alone) is read when
it ends. The two trials run at the same time: time does not enter the figure.

    python bench/memory.py            # prints the rows
    python bench/memory.py --trial DATASET_DIR   # one trial on a dataset (what each process runs)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

REPO_ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
import pandas as pd

from bench.common import Row
from bench.many_trials import TINY_CNN
from preprocessing.audio_logmel import frame_chunks, write_index
from preprocessing.demo_dataset import DEMO_CLIPS
from utils.stores import atomic_h5, audio_table, logmel_file, text_embeds_file, text_table, write_csv

if TYPE_CHECKING:  # types only: these load torch and the audio libraries
    from utils.audio import FeatureConfig
    from utils.config import Config
    from utils.text import TextEmbeddingConfig

DEMO_SECONDS = (1.0, 4.8)  # uniform clip lengths: the demo's mean (2.9 s) and spread (1.1 s)
CAPTIONS_PER_CLIP = 5
TEXT_DIM = 384  # all-MiniLM-L6-v2's width
SCALES = (1, 8)
MB = 2**20
# one epoch of a tiny CNN (the trial-overhead benchmark's) at the demo's batch size, data read in the trial process
TRIAL_OVERRIDES = [*TINY_CNN, "param_conf.num_workers=0", "ray_conf.search_space={}"]


def write_caption_vectors(
    dataset_dir: Path, split: str, cids: np.ndarray, text: TextEmbeddingConfig, seed: int
) -> None:
    """``{split}_text_embeds.h5`` as ``sbert_embeddings.py`` writes it, with random unit vectors ``(n, 384)``."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(cids), TEXT_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with atomic_h5(text_embeds_file(dataset_dir, split)) as f:
        f.create_dataset("cid", data=cids)
        f.create_dataset("embedding", data=vectors)
        f.attrs["model_name"] = text.model_name
        f.attrs["caption_column"] = text.caption_column


def caption_table(split: str, fids: np.ndarray, fnames: list[str]) -> pd.DataFrame:
    """``{split}_text.csv``'s rows: five captions per clip, caption ids ``fid * 5 + k``."""
    fid = np.repeat(fids, CAPTIONS_PER_CLIP)
    cid = fid * CAPTIONS_PER_CLIP + np.tile(np.arange(CAPTIONS_PER_CLIP), len(fids))
    raw = [f"Caption {c} of {split} clip {f}." for c, f in zip(cid, fid)]
    return pd.DataFrame(
        {
            "cid": cid,
            "fid": fid,
            "fname": np.repeat(fnames, CAPTIONS_PER_CLIP),
            "raw_text": raw,
            "text": [r.lower().rstrip(".") for r in raw],
        }
    )


def write_random_dataset(
    dataset_dir: Path, clips: dict[str, int], features: FeatureConfig, text: TextEmbeddingConfig, seed: int = 0
) -> int:
    """Every table and store training reads for ``clips`` (clips per split), random data in the demo's shapes:
    ``{split}_audio.csv``, ``{split}_text.csv``, ``{split}_logmel.h5`` ``(frames, n_mels)`` float32 per clip and
    ``{split}_text_embeds.h5``. Returns the bytes of log-mels written."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = 0
    for k, (split, n) in enumerate(clips.items()):
        fids = np.arange(n, dtype=np.int64)
        fnames = [f"{split[:3]}_scene_{i:05d}.wav" for i in range(n)]
        durations = rng.uniform(*DEMO_SECONDS, n).round(3)
        frames = (durations * 1000 / features.hop_ms).astype(np.int64) + 1
        offsets = np.concatenate([[0], np.cumsum(frames)])
        write_csv(pd.DataFrame({"fid": fids, "fname": fnames, "duration": durations}), audio_table(dataset_dir, split))
        captions = caption_table(split, fids, fnames)
        write_csv(captions, text_table(dataset_dir, split))
        logmels = rng.standard_normal((int(offsets[-1]), features.n_mels), dtype=np.float32)  # (all frames, n_mels)
        with atomic_h5(logmel_file(dataset_dir, split)) as f:
            f.create_dataset("logmel", data=logmels, chunks=frame_chunks(len(logmels), features.n_mels))
            stamps = np.full((n, 2), -1, dtype=np.int64)  # no audio files: nothing to compare a rerun against
            write_index(f, features, fids.tolist(), fnames, stamps, fids.tolist(), offsets, [])
        write_caption_vectors(dataset_dir, split, captions["cid"].to_numpy(), text, seed + k)
        written += logmels.nbytes
    return written


def trial_config(dataset_dir: Path) -> Config:
    """conf.yaml's trial on ``dataset_dir`` with the tiny CNN, one epoch."""
    from utils.config import load_config

    overrides = [*TRIAL_OVERRIDES, f"data.dataset_dir={dataset_dir}", f"ray_conf.storage_path={dataset_dir}/runs"]
    return load_config(REPO_ROOT / "conf.yaml", overrides)[0]


def run_trial(dataset_dir: Path) -> None:
    """One trial as Ray runs it, without Ray: ``train`` with a report that keeps nothing."""
    from utils.training import train

    train(trial_config(dataset_dir), lambda metrics, folder: None)


def peak_rss(dataset_dirs: list[Path]) -> list[int]:
    """Peak resident bytes of one trial per dataset, each in a fresh process, the processes run at once (each
    one's log goes to ``trial.log`` in its dataset folder)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = []
    for folder in dataset_dirs:
        with open(folder / "trial.log", "wb") as log:
            command = [sys.executable, "-m", "bench.memory", "--trial", str(folder)]
            procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    peaks = []
    for folder, proc in zip(dataset_dirs, procs):
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the maximum over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            output = (folder / "trial.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the trial on {folder} failed (exit {proc.returncode}):\n{output}")
        peaks.append(usage.ru_maxrss * 1024)  # Linux counts kilobytes
    return peaks


def run(quick: bool) -> list[Row]:
    """Peak RSS of a trial at 1x and 8x the demo's clips (``--quick``: 1/10 of the demo, so both are tiny)."""
    base = {split: DEMO_CLIPS[split] // (10 if quick else 1) for split in ("development", "validation")}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as root:
        dirs, logmel_bytes = [], []
        for scale in SCALES:
            folder = Path(root) / f"x{scale}"
            config = trial_config(folder)  # the features and caption settings the stores must have
            features, text = config.features, config.text_embeddings
            logmel_bytes.append(write_random_dataset(folder, {s: n * scale for s, n in base.items()}, features, text))
            dirs.append(folder)
        peaks = peak_rss(dirs)
    ratio = peaks[1] / peaks[0]
    clips = ", ".join(f"{n} {split}" for split, n in base.items())
    note = (
        f"1x: {clips} clips (5 captions each), log-mels {logmel_bytes[0] / MB:.0f} MB; 8x: "
        f"{logmel_bytes[1] / MB:.0f} MB. Random stores in the demo's shapes; a trial = one epoch of the tiny CNN "
        "(batch 32) + validation + checkpoint, each in a fresh process (ru_maxrss)"
    )
    if ratio > 1.2:
        note += f"; missed by {(ratio - 1.2) / 1.2:.0%} ({(peaks[1] - peaks[0]) / MB:.0f} MB more at 8x)"
    return [
        Row(
            what=f"peak resident memory of one trial, {SCALES[0]}x / {SCALES[1]}x the demo dataset"
            + (" (quick: 1/10 of it)" if quick else ""),
            figure=f"{peaks[0] / MB:.0f} MB / {peaks[1] / MB:.0f} MB",
            ratio=f"{ratio:.2f}x at 8x",
            target="8x <= 1.2x the 1x figure",
            met=ratio <= 1.2,
            note=note,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trial", type=Path, help="run one trial on this dataset folder (what each process runs)")
    parser.add_argument("--quick", action="store_true", help="1/10 of the demo's size")
    args = parser.parse_args()
    if args.trial is not None:
        run_trial(args.trial)
        return
    for row in run(args.quick):
        print(row)


if __name__ == "__main__":
    main()
