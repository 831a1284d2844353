"""Write the embedded demo dataset: synthetic sound scenes in Clotho's layout.

Each clip is a sequence of 1-3 sound events (beeps of three pitches, noise bursts, rising
and falling chirps, click trains, a low hum) with varying counts, order, loudness and
length over faint background noise. Five paraphrased captions per clip say what is heard
and in which order, so retrieval needs both the event types and their order.

Deterministic: the same ``--seed`` writes byte-identical files.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

from utils.cli import make_parser, setup_logging
from utils.stores import captions_csv, write_csv

if TYPE_CHECKING:
    from utils.config import Config

log = logging.getLogger("demo_dataset")

SPLITS = ("development", "validation", "evaluation")  # Clotho's split names
DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"  # conf.yaml's data.dataset_dir
DEMO_CLIPS = {"development": 300, "validation": 100, "evaluation": 100}

SAMPLE_RATE = 16000
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
PITCH_HZ = {"low": 330.0, "medium": 880.0, "high": 2400.0}


def _beeps(rng: np.random.Generator, pitch: str, count: int) -> np.ndarray:
    length, gap = rng.uniform(0.12, 0.25), rng.uniform(0.08, 0.2)
    t = np.arange(int(length * SAMPLE_RATE)) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * PITCH_HZ[pitch] * t) * np.hanning(t.size)
    silence = np.zeros(int(gap * SAMPLE_RATE))
    return np.concatenate([np.concatenate([tone, silence]) for _ in range(count)])


def _noise(rng: np.random.Generator) -> np.ndarray:
    n = int(rng.uniform(0.4, 0.9) * SAMPLE_RATE)
    return rng.standard_normal(n) * 0.5 * np.hanning(n) ** 0.3


def _chirp(rng: np.random.Generator, rising: bool) -> np.ndarray:
    n = int(rng.uniform(0.5, 1.0) * SAMPLE_RATE)
    lo, hi = rng.uniform(200, 400), rng.uniform(2500, 4000)
    freq = np.geomspace(lo, hi, n) if rising else np.geomspace(hi, lo, n)
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    return np.sin(phase) * np.hanning(n) ** 0.5


def _clicks(rng: np.random.Generator, count: int) -> np.ndarray:
    period = int(rng.uniform(0.08, 0.15) * SAMPLE_RATE)
    out = np.zeros(period * count)
    click = rng.standard_normal(80) * np.exp(-np.arange(80) / 12)
    for k in range(count):
        out[k * period : k * period + 80] += click
    return out


def _hum(rng: np.random.Generator) -> np.ndarray:
    n = int(rng.uniform(0.8, 1.6) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    base = rng.choice([50.0, 60.0, 100.0])
    wave = sum(np.sin(2 * np.pi * base * h * t) / h for h in (1, 2, 3, 4))
    return 0.6 * wave * np.hanning(n) ** 0.2


# Each event kind: (synthesiser, phrase templates). ``{n}`` = count word, ``{p}`` = pitch word.
EVENT_PHRASES = {
    "beeps": [
        "{n} {p} beeps",
        "{n} {p}-pitched beeps",
        "a {p} tone beeping {n} times",
        "{n} short {p} pitched tones",
        "{p} beeps, {n} of them",
    ],
    "noise": [
        "a burst of static noise",
        "a short hiss of white noise",
        "a noisy static burst",
        "a blast of hissing noise",
        "a rush of static",
    ],
    "rising": [
        "a rising whistle",
        "a tone sweeping upward",
        "an upward chirp",
        "a pitch that rises quickly",
        "a whistle going up",
    ],
    "falling": [
        "a falling whistle",
        "a tone sweeping downward",
        "a downward chirp",
        "a pitch that drops quickly",
        "a whistle going down",
    ],
    "clicks": [
        "{n} sharp clicks",
        "a rapid series of {n} clicks",
        "{n} ticking sounds",
        "clicking {n} times",
        "{n} quick taps",
    ],
    "hum": [
        "a low electrical hum",
        "a deep buzzing drone",
        "a low humming noise",
        "an electric buzz",
        "a steady low drone",
    ],
}
CONNECTORS = ["then", "followed by", "and after that", "before", "and then"]
LOUDNESS = {"quiet": ["quiet", "soft", "faint"], "loud": ["loud", "strong", "intense"]}


def _event(rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    kind = str(rng.choice(list(EVENT_PHRASES)))
    spec = {"kind": kind}
    if kind == "beeps":
        spec.update(pitch=str(rng.choice(list(PITCH_HZ))), count=int(rng.integers(1, 5)))
        wave = _beeps(rng, spec["pitch"], spec["count"])
    elif kind == "clicks":
        spec["count"] = int(rng.integers(3, 9))
        wave = _clicks(rng, spec["count"])
    elif kind in ("rising", "falling"):
        wave = _chirp(rng, kind == "rising")
    else:
        wave = _noise(rng) if kind == "noise" else _hum(rng)
    return spec, wave


def _phrase(rng: np.random.Generator, spec: dict, variant: int) -> str:
    template = EVENT_PHRASES[spec["kind"]][variant]
    count = spec.get("count", 1)
    text = template.format(n=COUNT_WORDS[count], p=spec.get("pitch", ""))
    if count == 1:  # "one high beeps" -> "one high beep"
        text = text.replace("beeps", "beep").replace(" times", " time")
    return text


def make_clip(rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """One scene: ``(wave (samples,), five captions)``."""
    n_events = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    loud = str(rng.choice(list(LOUDNESS)))
    gain = rng.uniform(0.5, 0.9) if loud == "loud" else rng.uniform(0.08, 0.2)
    events = [_event(rng) for _ in range(n_events)]
    pieces = [np.zeros(int(rng.uniform(0.2, 0.8) * SAMPLE_RATE))]
    for _, wave in events:
        pieces += [wave * gain, np.zeros(int(rng.uniform(0.2, 0.7) * SAMPLE_RATE))]
    scene = np.concatenate(pieces)
    scene = scene + rng.standard_normal(scene.size) * 0.003  # faint background so no clip is pure silence

    captions = []
    for variant in rng.permutation(5):
        phrases = [_phrase(rng, spec, int((variant + k) % 5)) for k, (spec, _) in enumerate(events)]
        connector = CONNECTORS[variant]
        if connector == "before" and len(phrases) > 1:
            text = f" {connector} ".join(phrases)
        else:
            connector = "then" if connector == "before" else connector
            text = f", {connector} ".join(phrases)
        adjective = LOUDNESS[loud][variant % 3]
        text = (
            f"{'you can hear ' if variant == 3 else ''}{text}, all {adjective}"
            if variant % 2
            else f"{adjective} sounds: {text}"
        )
        captions.append(text[0].upper() + text[1:] + ".")
    return np.clip(scene, -1.0, 1.0).astype(np.float32), captions


def write_demo_dataset(out_dir: Path, clips_per_split: dict[str, int], seed: int = 0) -> None:
    """Write ``{split}/*.wav`` and ``{split}_captions.csv`` (``fname,raw_text,text``) under ``out_dir``."""
    rng = np.random.default_rng(seed)
    for split, n_clips in clips_per_split.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in tqdm(range(n_clips), desc=f"demo {split}", unit="clip", leave=False):
            wave, captions = make_clip(rng)
            fname = f"{split[:3]}_scene_{i:04d}.wav"
            sf.write(out_dir / split / fname, wave, SAMPLE_RATE, subtype="PCM_16")
            rows += [{"fname": fname, "raw_text": c, "text": c.lower().rstrip(".").replace(",", "")} for c in captions]
        write_csv(pd.DataFrame(rows), captions_csv(out_dir, split))
        log.info("%s: %d clips, %d captions", split, n_clips, len(rows))


def prepare_demo(config: Config, clips: dict[str, int] = DEMO_CLIPS, workers: int | None = None) -> None:
    """Make the demo dataset at ``config.data.dataset_dir`` ready to train on, as ``example/run_demo.sh`` does
    step by step: write the clips when a captions file is missing, then index them, extract the log-mels
    (``workers`` processes, default all cores) and embed the captions; each step keeps what is up to date."""
    # the other steps' modules load librosa, torch and Sentence-BERT: only when the demo is made
    from preprocessing.audio_logmel import extract_split
    from preprocessing.clotho_dataset import index_splits
    from preprocessing.sbert_embeddings import embed_captions
    from utils.runtime import resolve_device
    from utils.text import load_sentence_model

    dataset_dir, splits = config.data.dataset_dir, config.data.splits()
    if not all(captions_csv(dataset_dir, split).is_file() for split in splits):
        write_demo_dataset(dataset_dir, clips)
    index_splits(dataset_dir, splits)
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    for split in splits:
        extract_split(dataset_dir, split, config.features, workers)
    sentence_model = load_sentence_model(config.text_embeddings.model_name, resolve_device(config.device))
    for split in splits:
        embed_captions(dataset_dir, split, sentence_model, config.text_embeddings)


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--dataset-dir", type=Path, default=Path("data/demo"), help="output folder (default: data/demo)"
    )
    parser.add_argument(
        "--clips",
        type=int,
        nargs=3,
        default=(300, 100, 100),
        metavar=("DEV", "VAL", "EVAL"),
        help="clips per split: development validation evaluation (default: 300 100 100)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    setup_logging()
    write_demo_dataset(args.dataset_dir, dict(zip(SPLITS, args.clips)), args.seed)


if __name__ == "__main__":
    main()
