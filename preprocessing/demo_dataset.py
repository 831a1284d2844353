"""Write the embedded demo dataset: synthetic sound scenes in Clotho's layout.

Each clip is a sequence of 1-3 sound events (beeps of three pitches, noise bursts, rising
and falling chirps, click trains, a low hum) with varying counts, order, loudness and
length over faint background noise. Five paraphrased captions per clip say what is heard
and in which order, so retrieval needs both the event types and their order.

Two variants (``--variant``): ``distinct`` (the default) gives every clip its own captions
(counts and loudness included), so each caption fits one clip. ``shared`` draws the clips of
a split from a pool of 2.5 times fewer scenes (event kinds in order, beep pitch) and varies
only what captions do not say (counts, loudness, gaps, lengths, background), so a caption
fits every clip of its scene (one caption in five also gives the counts, and fits only the
clips with those counts): 2.8 relevant clips per caption on average, listed in
``{split}_relevance.csv`` (``caption,fname,relevance``).

Deterministic: the same ``--seed`` and ``--variant`` write byte-identical files.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

from utils.cli import make_parser, setup_logging
from utils.stores import captions_csv, relevance_csv, write_csv

if TYPE_CHECKING:
    from utils.config import Config

log = logging.getLogger("demo_dataset")

SPLITS = ("development", "validation", "evaluation")  # Clotho's split names
DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"  # conf.yaml's data.dataset_dir
# the shared variant's folder (example/recipes/demo_two_stage.yaml): main.py makes each demo where it is missing
DEMO_DIRS = {DEMO_DIR: "distinct", DEMO_DIR.with_name("demo-shared"): "shared"}
DEMO_CLIPS = {"development": 300, "validation": 100, "evaluation": 100}
VARIANTS = ("distinct", "shared")  # write_demo_dataset's variants: one clip per caption, or several

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
# The shared variant's phrases for beeps and clicks whose count is not said: true of any count.
COUNT_FREE_PHRASES = {
    "beeps": [
        "{p} beeping",
        "a {p}-pitched beeping",
        "a {p} tone beeping",
        "a {p} beeping sound",
        "beeping at a {p} pitch",
    ],
    "clicks": [
        "sharp clicks",
        "a rapid series of clicks",
        "ticking sounds",
        "some clicking",
        "quick taps",
    ],
}
# The shared variant's openings: none says anything about the sound, so loudness stays unsaid.
SHARED_FRAMES = ["{}", "you can hear {}", "first {}", "a recording of {}", "in this clip, {}", "we hear {}"]


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


def _join(phrases: list[str], variant: int) -> str:
    """The events' phrases in order, joined by caption ``variant``'s connector ("before" reads only between two)."""
    connector = CONNECTORS[variant]
    if connector == "before" and len(phrases) > 1:
        return f" {connector} ".join(phrases)
    connector = "then" if connector == "before" else connector
    return f", {connector} ".join(phrases)


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
        text = _join(phrases, variant)
        adjective = LOUDNESS[loud][variant % 3]
        text = (
            f"{'you can hear ' if variant == 3 else ''}{text}, all {adjective}"
            if variant % 2
            else f"{adjective} sounds: {text}"
        )
        captions.append(text[0].upper() + text[1:] + ".")
    return np.clip(scene, -1.0, 1.0).astype(np.float32), captions


class Event(NamedTuple):
    """One sound event of a shared-variant scene; in what a caption says, ``None`` = not said."""

    kind: str  # a key of EVENT_PHRASES
    pitch: str | None = None  # beeps: a key of PITCH_HZ
    count: int | None = None  # beeps (1-4) and clicks (3-8)


Scene = tuple[Event, ...]  # a clip's events in order, or what one caption says of them
CLIPS_PER_CONTENT = 2.5  # a shared-variant split has about n_clips / this different contents
# Every possible content of a scene: 1-3 events, each of 8 kinds-with-pitch (beeps of three pitches, five others).
N_CONTENTS = sum((len(EVENT_PHRASES) - 1 + len(PITCH_HZ)) ** n for n in (1, 2, 3))


def fits(said: Scene, heard: Scene) -> bool:
    """Whether a caption that says ``said`` fits a clip of scene ``heard``: the same events in the same order,
    and every pitch and count the caption gives is the clip's."""
    return len(said) == len(heard) and all(
        s.kind == h.kind and s.pitch in (None, h.pitch) and s.count in (None, h.count) for s, h in zip(said, heard)
    )


def _content(rng: np.random.Generator) -> Scene:
    """What shared-variant captions always say of a scene: its event kinds in order, with the beeps' pitch."""
    kinds = rng.choice(list(EVENT_PHRASES), size=int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25])))
    return tuple(Event(str(k), str(rng.choice(list(PITCH_HZ))) if k == "beeps" else None) for k in kinds)


def _count(rng: np.random.Generator, kind: str) -> int | None:
    if kind == "beeps":
        return int(rng.integers(1, 5))
    return int(rng.integers(3, 9)) if kind == "clicks" else None


def _shared_phrase(rng: np.random.Generator, event: Event, template: int) -> str:
    if event.count is None and event.kind in COUNT_FREE_PHRASES:
        return COUNT_FREE_PHRASES[event.kind][template].format(p=event.pitch)
    return _phrase(rng, {key: value for key, value in event._asdict().items() if value is not None}, template)


def shared_captions(rng: np.random.Generator, scene: Scene) -> list[tuple[str, Scene]]:
    """Five captions of a shared-variant clip, each with what it says: the events and pitches, and for one of
    them, drawn at random, the counts too; never loudness, lengths or gaps."""
    # (5,) connector per caption, (events, 5) phrase template per event and caption: the five always differ
    connectors, templates = rng.permutation(5), [rng.permutation(5) for _ in scene]
    counted, frames = rng.integers(5), rng.integers(len(SHARED_FRAMES), size=5)
    captions = []
    for i in range(5):
        said = scene if i == counted else tuple(event._replace(count=None) for event in scene)
        phrases = [_shared_phrase(rng, event, int(template[i])) for event, template in zip(said, templates)]
        text = SHARED_FRAMES[frames[i]].format(_join(phrases, int(connectors[i])))
        captions.append((text[0].upper() + text[1:] + ".", said))
    return captions


def shared_scenes(rng: np.random.Generator, n_clips: int) -> list[tuple[Scene, list[tuple[str, Scene]]]]:
    """A shared-variant split: each clip's scene and its five captions with what they say (``shared_captions``).
    The scenes' contents come from a pool of ``n_clips / CLIPS_PER_CONTENT`` different ones, each used at least
    once and the other clips spread over them at random (groups of 1 to about 8 clips); each clip then gets its
    own counts. A count-free caption fits its group: about 3.1 clips for the average clip, 2.8 with the counted
    captions (DCASE 2025's evaluation split: 2.8)."""
    pool: list[Scene] = []
    while len(pool) < min(max(1, round(n_clips / CLIPS_PER_CONTENT)), N_CONTENTS):
        content = _content(rng)
        if content not in pool:  # different contents: a caption fits one group (and, with counts, part of it)
            pool.append(content)
    extra = rng.integers(len(pool), size=max(0, n_clips - len(pool)))
    picks = rng.permutation(np.concatenate([np.arange(len(pool)), extra]))[:n_clips]
    scenes = [tuple(event._replace(count=_count(rng, event.kind)) for event in pool[pick]) for pick in picks]
    return [(scene, shared_captions(rng, scene)) for scene in scenes]


def render_scene(rng: np.random.Generator, scene: Scene) -> np.ndarray:
    """A shared-variant clip ``(samples,)``: the scene's events at their counts, with what captions do not say
    drawn here (loudness, lengths, gaps, chirp ranges, hum pitch, background level)."""
    gain = rng.uniform(0.08, 0.9)
    pieces = [np.zeros(int(rng.uniform(0.2, 0.8) * SAMPLE_RATE))]
    for event in scene:
        if event.kind == "beeps":
            wave = _beeps(rng, event.pitch, event.count)
        elif event.kind == "clicks":
            wave = _clicks(rng, event.count)
        elif event.kind in ("rising", "falling"):
            wave = _chirp(rng, event.kind == "rising")
        else:
            wave = _noise(rng) if event.kind == "noise" else _hum(rng)
        pieces += [wave * gain, np.zeros(int(rng.uniform(0.2, 0.7) * SAMPLE_RATE))]
    scene_wave = np.concatenate(pieces)
    scene_wave = scene_wave + rng.standard_normal(scene_wave.size) * rng.uniform(0.001, 0.01)
    return np.clip(scene_wave, -1.0, 1.0).astype(np.float32)


def relevance_table(fnames: list[str], scenes: list[tuple[Scene, list[tuple[str, Scene]]]]) -> pd.DataFrame:
    """Every (caption, clip) pair of a shared-variant split in which the caption ``fits`` the clip, its own clip
    included: ``caption,fname,relevance`` (1.0), one row per caption text and clip, captions in order."""
    # A caption's text settles what it says (each phrase names its kind, pitch and any count): the first is kept.
    said_by_text: dict[str, Scene] = {}
    for _, captions in scenes:
        for text, said in captions:
            said_by_text.setdefault(text, said)
    fitting = {
        said: [fname for fname, (heard, _) in zip(fnames, scenes) if fits(said, heard)]
        for said in dict.fromkeys(said_by_text.values())
    }
    rows = [(text, fname, 1.0) for text, said in said_by_text.items() for fname in fitting[said]]
    return pd.DataFrame(rows, columns=["caption", "fname", "relevance"])


def write_demo_dataset(
    out_dir: Path, clips_per_split: dict[str, int], seed: int = 0, variant: str = "distinct"
) -> None:
    """Write ``{split}/*.wav`` and ``{split}_captions.csv`` (``fname,raw_text,text``) under ``out_dir``; the
    ``shared`` variant (``VARIANTS``) also writes ``{split}_relevance.csv`` (``relevance_table``) for each split."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    rng = np.random.default_rng(seed)
    for split, n_clips in clips_per_split.items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        fnames = [f"{split[:3]}_scene_{i:04d}.wav" for i in range(n_clips)]
        if variant == "distinct":  # drawn clip by clip, as the published demo was
            clips = (make_clip(rng) for _ in fnames)
        else:  # every scene and caption first, then each clip's sound
            scenes = shared_scenes(rng, n_clips)
            clips = ((render_scene(rng, scene), [text for text, _ in captions]) for scene, captions in scenes)
        rows = []
        for fname, (wave, captions) in tqdm(
            zip(fnames, clips), total=n_clips, desc=f"demo {split}", unit="clip", leave=False
        ):
            sf.write(out_dir / split / fname, wave, SAMPLE_RATE, subtype="PCM_16")
            rows += [{"fname": fname, "raw_text": c, "text": c.lower().rstrip(".").replace(",", "")} for c in captions]
        write_csv(pd.DataFrame(rows), captions_csv(out_dir, split))
        table_file = relevance_csv(out_dir, split)
        if variant == "distinct":
            table_file.unlink(missing_ok=True)  # a shared variant's table left here would not fit these clips
            log.info("%s: %d clips, %d captions", split, n_clips, len(rows))
            continue
        relevance = relevance_table(fnames, scenes)
        write_csv(relevance, table_file)
        per_caption = relevance.groupby("caption").size()[[row["raw_text"] for row in rows]].mean()
        log.info("%s: %d clips, %d captions, %.2f relevant clips per caption", split, n_clips, len(rows), per_caption)


def prepare_demo(
    config: Config, clips: dict[str, int] = DEMO_CLIPS, workers: int | None = None, variant: str = "distinct"
) -> None:
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
        write_demo_dataset(dataset_dir, clips, variant=variant)
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
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="distinct",
        help="distinct: each caption fits one clip (default); shared: clips drawn from 2.5 times fewer scenes, "
        "a caption fits 2.8 clips on average, listed in {split}_relevance.csv",
    )
    args = parser.parse_args()
    setup_logging()
    write_demo_dataset(args.dataset_dir, dict(zip(SPLITS, args.clips)), args.seed, args.variant)


if __name__ == "__main__":
    main()
