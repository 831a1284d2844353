"""Preprocessing throughput: log-mel extraction in 1 and 2 processes, and caption embedding batched vs one by one.

A split of demo scenes (``preprocessing/demo_dataset.py``) is written and each clip tiled to 15-30 s, Clotho's
lengths (1-3 s in quick), at the demo's 16 kHz; ``preprocessing/clotho_dataset.py`` indexes it. Timed, in one
process on the same files:
- ``extract_split`` of the split with ``workers`` 1 (this process) and 2 (a pool), ``overwrite`` each time: the
  whole of ``audio_logmel.py``'s work on a split (worker start and warm-up, decoding, log-mels, the part files and
  the merged store), in clips per second; the two stores are checked to hold the same frames.
- the split's first 64 captions (10 in quick) through all-MiniLM-L6-v2 (``load_sentence_model``, the packaged
  copy): one ``encode`` call in batches of ``text_embeddings.batch_size`` as ``sbert_embeddings.py`` does, and one
  call per caption, in captions per second; the two are checked to give the same vectors.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(REPO_ROOT))

import h5py
import numpy as np
import soundfile as sf

from bench.common import Row, measure, seconds
from preprocessing.audio_logmel import extract_split
from preprocessing.clotho_dataset import index_splits
from preprocessing.demo_dataset import write_demo_dataset
from utils.config import load_raw, validate
from utils.runtime import resolve_device
from utils.stores import TEXT_COLUMNS, logmel_file, read_table, text_table
from utils.text import load_sentence_model

SPLIT = "development"


def write_long_clips(dataset_dir: Path, clips: int, low_s: float, high_s: float) -> float:
    """A demo split of ``clips`` scenes, each repeated end to end to a length drawn from ``[low_s, high_s]``, indexed;
    returns the audio's total seconds."""
    write_demo_dataset(dataset_dir, {SPLIT: clips}, seed=3)
    rng = np.random.default_rng(3)
    total = 0.0
    for path in sorted((dataset_dir / SPLIT).glob("*.wav")):
        wave, rate = sf.read(path, dtype="float32")  # (samples,)
        samples = int(rng.uniform(low_s, high_s) * rate)
        sf.write(path, np.resize(wave, samples), rate, subtype="PCM_16")  # np.resize repeats the scene to fill
        total += samples / rate
    index_splits(dataset_dir, [SPLIT])
    return total


def run(quick: bool) -> list[Row]:
    """Log-mel clips per second with 1 and 2 processes, captions per second batched and one by one."""
    clips, low_s, high_s, repeats = (4, 1.0, 3.0, 1) if quick else (24, 15.0, 30.0, 3)
    caption_count = 10 if quick else 64  # one by one costs about 5-10 ms per caption on an idle 2-core machine
    with tempfile.TemporaryDirectory(prefix="bench_preprocessing_") as tmp:
        dataset_dir = Path(tmp)
        audio_s = write_long_clips(dataset_dir, clips, low_s, high_s)
        config = validate(load_raw(REPO_ROOT / "conf.yaml", ["device=cpu", f"data.dataset_dir={tmp}"]))
        timings, frames = {}, {}
        for workers in (1, 2):
            timings[workers] = measure(
                lambda workers=workers: extract_split(dataset_dir, SPLIT, config.features, workers, overwrite=True),
                repeats=repeats,
            )
            with h5py.File(logmel_file(dataset_dir, SPLIT), "r") as f:
                frames[workers] = f["logmel"][:]  # (sum T_i, n_mels)
        if not np.array_equal(frames[1], frames[2]):
            raise AssertionError("extract_split gives other log-mels with 2 workers than with 1")
        captions = read_table(text_table(dataset_dir, SPLIT), TEXT_COLUMNS)["raw_text"].astype(str).tolist()
        captions = captions[:caption_count]

    model = load_sentence_model(config.text_embeddings.model_name, resolve_device("cpu"))
    batch_size = config.text_embeddings.batch_size
    batched = lambda: model.encode(captions, batch_size=batch_size, convert_to_numpy=True)  # (n, 384)
    single = lambda: np.concatenate([model.encode([c], convert_to_numpy=True) for c in captions])  # (n, 384)
    if not np.allclose(batched(), single(), atol=1e-5):  # padding to the batch's longest caption changes nothing
        raise AssertionError("captions embedded in batches differ from the same captions one by one")
    # the check above was both ways' warm-up
    batch_time = measure(batched, repeats=max(repeats - 1, 1), warmup=0)
    single_time = measure(single, repeats=max(repeats - 1, 1), warmup=0)

    rate = {workers: clips / timing.min_s for workers, timing in timings.items()}
    features = config.features
    size = f"{clips} clips of {low_s:.0f}-{high_s:.0f} s ({audio_s / 60:.1f} min of audio, {features.sample_rate} Hz)"
    return [
        Row(
            f"log-mel extraction ({features.n_mels} mels), {size}, 2 processes",
            f"{rate[2]:.3g} clips/s ({timings[2]})",
            against=f"1 process: {rate[1]:.3g} clips/s ({timings[1]})",
            ratio=f"{rate[2] / rate[1]:.2f}x the 1-process rate",
            target="scaling reported",
            note=(
                "extract_split, overwrite: workers' start and warm-up, decoding, log-mels, part files, merged store; "
                f"{audio_s / timings[2].min_s:.0f}x real time with 2 processes"
            ),
        ),
        Row(
            f"caption embedding, all-MiniLM-L6-v2, {len(captions)} captions, batches of {batch_size}",
            f"{len(captions) / batch_time.min_s:.3g} captions/s ({batch_time})",
            against=f"one by one: {len(captions) / single_time.min_s:.3g} captions/s ({single_time})",
            ratio=f"{single_time.min_s / batch_time.min_s:.2g}x faster batched",
            target="scaling reported",
            note=f"one encode call per caption costs {seconds(single_time.min_s / len(captions))} each",
        ),
    ]


if __name__ == "__main__":
    for row in run("--quick" in sys.argv):
        print(row)
