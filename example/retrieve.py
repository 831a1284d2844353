"""Retrieve with a trained checkpoint: best captions for each audio file, best clips for each caption.

Audio files are analysed with the checkpoint's own feature settings and captions embedded
with its Sentence-BERT model, so any wav/flac/ogg file and any sentence can be queried.
Candidates are the given files and captions plus, with ``--gallery``, every clip and caption
of a dataset split.

    python example/retrieve.py --audio example/example.wav --caption "a dog barks" "rain falls"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_model_arguments, exit_on_input_error, make_parser, setup_logging

HERE = Path(__file__).resolve().parent
DEFAULT_CAPTIONS = [
    "Three high beeps, then a burst of static noise.",
    "A low electrical hum followed by a rising whistle.",
    "Birds chirp while cars pass by on a wet road.",
    "Rain falls steadily on a metal roof.",
]


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument(
        "--audio",
        type=Path,
        nargs="+",
        default=[HERE / "example.wav"],
        help="audio files to query with (default: example/example.wav)",
    )
    parser.add_argument("--caption", nargs="+", default=DEFAULT_CAPTIONS, help="captions to query with")
    parser.add_argument(
        "--gallery", metavar="SPLIT", help="also rank every clip and caption of this split of the checkpoint's dataset"
    )
    parser.add_argument("--top", type=int, default=5, help="results per query (default: 5)")
    add_model_arguments(parser)
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import torch

from utils.experiments import find_model
from utils.inference import (
    AudioEmbeddings,
    encode_audio_files,
    encode_captions,
    encode_split,
    load_for_inference,
    score_pairs,
)
from utils.tower_stores import check_inputs


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.top < 1:
        parser.error("--top must be at least 1")
    setup_logging()
    with exit_on_input_error():
        model_path, _ = find_model(args.checkpoint, args.best, args.config, args.overrides, args.experiment)
        retrieve(model_path, args.audio, args.caption, args.gallery, args.top, args.device)


@torch.no_grad()
def retrieve(
    model_path: Path,
    audio_files: list[Path],
    captions: list[str],
    gallery: str | None = None,
    top: int = 5,
    device: str | None = None,
) -> torch.Tensor:
    """Embed the query files and captions (and the ``gallery`` split), print the best matches both ways,
    each marked ``[query]`` or ``[gallery]``, and return the ``(n_audio, n_captions)`` cosine scores:
    queries first, then the gallery items that are not queries themselves."""
    # new audio and captions go through the whole towers: frozen backbones too, from their model ids
    model, config, target = load_for_inference(model_path, device)
    audio = encode_audio_files(model, config, audio_files, target)  # n_files clips
    text = encode_captions(model, config, captions, target)  # (n_captions, E)
    audio_names = [(p.name, "query") for p in audio_files]
    texts = [(c, "query") for c in captions]
    if gallery:
        check_inputs(config, gallery)
        split = encode_split(model, config, gallery, target)
        queried = {p.resolve() for p in audio_files}
        folder = config.data.dataset_dir / gallery
        clips = [i for i, name in enumerate(split.fnames) if (folder / name).resolve() not in queried]
        lines = [j for j, caption in enumerate(split.captions) if caption not in captions]
        audio = AudioEmbeddings.cat([audio, split.audio.rows(clips)])
        text = torch.cat([text, split.text[lines].to(target)])
        audio_names += [(split.fnames[i], "gallery") for i in clips]
        texts += [(split.captions[j], "gallery") for j in lines]
    scores = score_pairs(model, target, audio, text)  # (n_audio, n_captions) cosines, through a text-aware head too

    for i, path in enumerate(audio_files):
        print(f"\nCaptions for {path}:")
        values, order = scores[i].topk(min(top, scores.shape[1]))
        for value, j in zip(values, order):
            print(f"  {value:+.3f}  [{texts[j][1]}]  {texts[j][0]}")
    for j, caption in enumerate(captions):
        print(f"\nClips for {caption!r}:")
        values, order = scores[:, j].topk(min(top, scores.shape[0]))
        for value, i in zip(values, order):
            print(f"  {value:+.3f}  [{audio_names[i][1]}]  {audio_names[i][0]}")
    return scores


if __name__ == "__main__":
    main()
