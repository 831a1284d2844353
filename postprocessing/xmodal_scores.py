"""Embed every clip and caption of a split once and save the ``(n_audio, n_captions)`` score matrix.

With no arguments it scores the evaluation split with the model exported to ``best/`` by
the newest finished run of the config's experiment and writes ``{split}_scores.h5`` into that experiment's folder.
``--untrained`` scores a freshly initialised model of the same config instead: the
chance-level reference. Also runs as ``python -m postprocessing.xmodal_scores``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_scoring_arguments, exit_on_input_error, make_parser, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    add_scoring_arguments(parser)
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import h5py
import numpy as np
import torch

from utils.checkpoints import build_model, load_trained_model, read_model_config
from utils.experiments import find_model
from utils.inference import SplitEmbeddings, encode_split
from utils.runtime import resolve_device, seed_everything
from utils.storage import publish_new_files
from utils.stores import atomic_h5
from utils.tower_stores import check_inputs

log = logging.getLogger("xmodal_scores")


def scores_file(out_dir: Path, split: str, untrained: bool) -> Path:
    """Where the scores of ``split`` go: ``{split}_scores.h5``, or ``{split}_scores_untrained.h5``."""
    return out_dir / f"{split}_scores{'_untrained' if untrained else ''}.h5"


def embed_with_model(model_path: Path, split: str, untrained: bool, device: str | None) -> SplitEmbeddings:
    """``split`` embedded by the model at ``model_path`` (or, ``untrained``, by a fresh model of its config)
    on ``device`` (default: the model config's ``device``)."""
    if untrained:
        config = read_model_config(model_path)
        seed_everything(config.seed)
        model = build_model(config, torch.device("cpu")).eval()
    else:
        model, config = load_trained_model(model_path, torch.device("cpu"))
    target = resolve_device(device or config.device)  # the device is the model config's unless given
    model.to(target)
    # scored with the features and caption embeddings the model was trained on
    check_inputs(config, split)
    log.info(
        "embedding %s split of %s with the %s model on %s",
        split,
        config.data.dataset_dir,
        "untrained" if untrained else "trained",
        target,
    )
    return encode_split(model, config, split, target, config.param_conf.batch_size)


def save_scores(path: Path, embeds: SplitEmbeddings) -> None:
    """Write scores, file names, captions and caption->clip rows to HDF5 (atomically)."""
    text = h5py.string_dtype()
    with atomic_h5(path) as f:
        f.create_dataset("scores", data=embeds.scores().numpy())
        f.create_dataset("fname", data=np.array(embeds.fnames, dtype=object), dtype=text)
        f.create_dataset("caption", data=np.array(embeds.captions, dtype=object), dtype=text)
        f.create_dataset("caption_audio", data=embeds.caption_audio.numpy())


def load_scores(path: Path) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    """``(scores (n_audio, n_captions), fnames, captions, caption_audio (n_captions,))`` from ``save_scores``."""
    with h5py.File(path, "r") as f:
        fnames, captions = f["fname"].asstr()[:].tolist(), f["caption"].asstr()[:].tolist()
        return f["scores"][:], fnames, captions, f["caption_audio"][:]


def write_scores(
    model_path: Path, split: str, out_dir: Path, untrained: bool = False, device: str | None = None
) -> Path:
    """Score ``split`` with the model at ``model_path`` and save the matrix in ``out_dir``; returns the file."""
    embeds = embed_with_model(model_path, split, untrained, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = scores_file(out_dir, split, untrained)
    save_scores(path, embeds)
    log.info("%s: %d clips x %d captions -> %s", split, len(embeds.fnames), len(embeds.captions), path)
    return path


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    setup_logging()
    torch.set_grad_enabled(False)
    with exit_on_input_error():
        model_path, folder = find_model(args.checkpoint, args.best, args.config, args.overrides, args.experiment)
        split = args.split or read_model_config(model_path).data.eval_split
        out_dir = args.out_dir or folder
        with publish_new_files(out_dir):  # a cloud experiment's mirror: what this writes goes up beside it
            write_scores(model_path, split, out_dir, args.untrained, args.device)


if __name__ == "__main__":
    main()
