"""Turn audio files into the ``prompt_embeds`` a Stable Diffusion pipeline takes, with a trained audio2img model.

The model (``example/recipes/audio2img.yaml``) maps a clip to a sequence shaped like the CLIP text encoder's
hidden states, ``(77, width)``; each file's is written as ``<out>/<file stem>.safetensors`` holding
``prompt_embeds`` ``(1, 77, width)``, ready for ``StableDiffusionPipeline(prompt_embeds=...)``:

    python example/audio_to_prompt_embeds.py --best runs/audio2img_<time>/best.json --audio rain.wav
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_model_arguments, exit_on_input_error, make_parser, setup_logging

HERE = Path(__file__).resolve().parent
log = logging.getLogger("audio_to_prompt_embeds")


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument(
        "--audio", type=Path, nargs="+", default=[HERE / "example.wav"], help="audio files (default: example.wav)"
    )
    parser.add_argument("--out", type=Path, default=Path("prompt_embeds"), help="output folder (default: %(default)s)")
    add_model_arguments(parser)
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import torch
from safetensors.torch import save_file

from utils.errors import ConfigError
from utils.experiments import find_model
from utils.inference import encode_audio_files, load_for_inference
from utils.stores import atomic_path


@torch.no_grad()
def prompt_embeds(model_path: Path, audio_files: list[Path], out: Path, device: str | None = None) -> list[Path]:
    """Write each file's ``(1, L, W)`` ``prompt_embeds`` (safetensors) into ``out``; returns the files written."""
    model, config, target = load_for_inference(model_path, device)  # the whole audio tower
    if not model.sequence:
        raise ConfigError(f"{model_path}: model.pooling is not a sequence head: train an audio2img recipe model")
    sequences = encode_audio_files(model, config, audio_files, target).frames  # (n, L, W)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, sequence in zip(audio_files, sequences):
        file = out / f"{path.stem}.safetensors"
        with atomic_path(file) as partial:
            save_file({"prompt_embeds": sequence[None].contiguous()}, str(partial))
        log.info("%s -> %s %s", path, file, tuple(sequence[None].shape))
        written.append(file)
    return written


def main() -> None:
    args = build_parser().parse_args()
    setup_logging()
    with exit_on_input_error():
        model_path, _ = find_model(args.checkpoint, args.best, args.config, args.overrides, args.experiment)
        prompt_embeds(model_path, args.audio, args.out, args.device)


if __name__ == "__main__":
    main()
