"""Embed every clip and caption of a split once and save the ``(n_audio, n_captions)`` score matrix.

With no arguments it scores the evaluation split with the model exported to ``best/`` by
the latest experiment and writes ``{split}_scores.h5`` into that experiment's folder. ``--untrained`` scores
a freshly initialised model of the same config instead: the chance-level reference.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any folder

from utils.errors import exit_on_input_error  # noqa: E402
from utils.data import atomic_h5, check_split  # noqa: E402
from utils.experiments import best_model  # noqa: E402
from utils.runtime import resolve_device, seed_everything, setup_logging  # noqa: E402
from utils.training import SplitEmbeddings, build_model, embed_split, load_trained_model, read_model_config  # noqa: E402

log = logging.getLogger("xmodal_scores")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf.yaml"


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments naming which model to score, shared with ``xmodal_retrieval.py``."""
    parser.add_argument("--best", type=Path, help="best.json of an experiment (default: the latest under ray_conf.storage_path)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint.pt or exported model folder to score instead of best.json's")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config whose ray_conf.storage_path holds the experiments (default: conf.yaml)")
    parser.add_argument("--split", help="split to score (default: the config's data.eval_split)")
    parser.add_argument("--untrained", action="store_true", help="score a randomly initialised model with the same config (chance reference)")
    parser.add_argument("--out-dir", type=Path, help="output folder (default: the experiment folder, or the checkpoint's folder)")


def resolve_source(args: argparse.Namespace) -> tuple[Path, Path]:
    """``(checkpoint or model folder, output folder)`` from ``--checkpoint``, ``--best`` or the latest experiment."""
    if args.checkpoint:
        return args.checkpoint, args.out_dir or (args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent)
    model, experiment = best_model(args.best, args.config)
    return model, args.out_dir or experiment


def scores_file(out_dir: Path, split: str, untrained: bool) -> Path:
    return out_dir / f"{split}_scores{'_untrained' if untrained else ''}.h5"


def compute_embeddings(checkpoint: Path, split: str | None, untrained: bool) -> tuple[SplitEmbeddings, str]:
    """Embeddings of ``split`` (default: the config's eval split) under the checkpoint's model; returns the split too."""
    device = resolve_device("auto")
    if untrained:
        config = read_model_config(checkpoint)
        seed_everything(config.seed)
        model = build_model(config, device).train(False)
    else:
        model, config = load_trained_model(checkpoint, device)
    split = split or config.data.eval_split
    check_split(config.data.dataset_dir, split, config.features)  # scored with the features the model was trained on
    log.info("embedding %s split of %s with the %s model", split, config.data.dataset_dir, "untrained" if untrained else "trained")
    return embed_split(model, config.data.dataset_dir, split, device, config.param_conf.batch_size), split


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
        return (f["scores"][:], [s.decode() for s in f["fname"][:]], [s.decode() for s in f["caption"][:]], f["caption_audio"][:])


def write_scores(args: argparse.Namespace) -> Path:
    """Score the requested split and return the scores file."""
    checkpoint, out_dir = resolve_source(args)
    embeds, split = compute_embeddings(checkpoint, args.split, args.untrained)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = scores_file(out_dir, split, args.untrained)
    save_scores(path, embeds)
    log.info("%s: %d clips x %d captions -> %s", split, len(embeds.fnames), len(embeds.captions), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    args = parser.parse_args()
    setup_logging()
    torch.set_grad_enabled(False)
    with exit_on_input_error():
        write_scores(args)


if __name__ == "__main__":
    main()
