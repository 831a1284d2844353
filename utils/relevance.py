"""Relevance tables: which clips fit a caption beyond the one it was written for (DCASE 2025's protocol).

A table is a CSV with one row per relevant (caption, clip) pair, read on top of the pairing of
``{split}_captions.csv`` (a caption's own clip always counts):

- ``caption`` (the caption text, as the captions file's ``raw_text`` has it) or ``cid`` (the caption id of
  ``{split}_text.csv``), ``fname`` (a clip of the split), and optionally ``relevance``: 1 when missing; binary, or
  graded (any scale; ``threshold`` decides which grades count as relevant, NDCG uses the grades as gains);
- or the DCASE 2025 baseline's file: ``query`` (the caption text) and ``audio_filenames``, a Python list of the
  file names relevant to it.

``relevance_matrix`` turns a table into the sparse ``(n_audio, n_captions)`` grades that
``utils.metrics.retrieval_metrics`` takes, for the clips and captions of a score matrix.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from utils.errors import DatasetError
from utils.stores import TEXT_COLUMNS, read_csv, read_table, require_file, text_table

log = logging.getLogger(__name__)


def read_relevance(path: Path, dataset_dir: Path | None = None, split: str | None = None) -> pd.DataFrame:
    """The table at ``path`` as ``caption, fname, relevance`` rows (caption texts, float grades); a table keyed by
    ``cid`` is resolved through ``dataset_dir``'s ``{split}_text.csv``. ``DatasetError`` names what is wrong."""
    table = read_csv(require_file(path, "the relevance table's maker (or give its right path)"), ())
    columns = set(table.columns)
    if {"query", "audio_filenames"} <= columns:  # the DCASE 2025 baseline's layout: one row per query
        try:
            names = table["audio_filenames"].map(ast.literal_eval)
        except (ValueError, SyntaxError):
            raise DatasetError(f"{path}: audio_filenames must hold Python lists of file names") from None
        table = pd.DataFrame({"caption": table["query"], "fname": names}).explode("fname").dropna()
    elif "fname" not in columns or not columns & {"caption", "cid"}:
        raise DatasetError(
            f"{path}: a relevance table needs the columns caption (or cid), fname and optionally relevance, "
            f"or query and audio_filenames; found {', '.join(map(str, table.columns[:8]))}"
        )
    elif "caption" not in columns:
        if dataset_dir is None or split is None:
            raise DatasetError(f"{path}: a table keyed by cid needs the dataset's {{split}}_text.csv")
        texts = read_table(text_table(dataset_dir, split), TEXT_COLUMNS).set_index("cid")["raw_text"]
        cids = pd.to_numeric(table["cid"], errors="coerce")
        unknown = ~cids.isin(texts.index)
        if unknown.any():
            raise DatasetError(f"{path}: cid {table['cid'][unknown].iloc[0]!r} is not a caption id of {split}")
        table = table.assign(caption=texts.loc[cids].to_numpy())
    grades = pd.to_numeric(table["relevance"], errors="coerce") if "relevance" in table else 1.0
    table = pd.DataFrame({"caption": table["caption"].astype(str), "fname": table["fname"].astype(str)}).assign(
        relevance=grades
    )
    if table["relevance"].isna().any() or (table["relevance"] < 0).any():
        raise DatasetError(f"{path}: relevance must be a number >= 0 in every row")
    return table


def relevance_matrix(table: pd.DataFrame, fnames: list[str], captions: list[str], source: str) -> torch.Tensor:
    """The sparse ``(n_audio, n_captions)`` grades of ``table`` (``read_relevance``) for the clips ``fnames`` and
    captions ``captions`` of a score matrix: a caption text written for several clips applies to each of its
    rows; a pair listed twice keeps its highest grade. Rows naming a clip or caption of another split are left out
    with a warning; none matching at all is a ``DatasetError`` naming ``source``."""
    clip_row = pd.Series(np.arange(len(fnames)), index=pd.Index(fnames, name="fname"), name="audio")
    caption_rows = pd.DataFrame({"caption": captions, "text": np.arange(len(captions))})
    pairs = table.join(clip_row, on="fname", how="inner").merge(caption_rows, on="caption", how="inner")
    if pairs.empty:
        raise DatasetError(f"{source}: no row names both a clip and a caption of the scored split")
    missing = len(table) - len(table.merge(pairs[["caption", "fname"]].drop_duplicates(), on=["caption", "fname"]))
    if missing:
        log.warning(
            "%s: %d of %d rows name a clip or caption outside the scored split; left out", source, missing, len(table)
        )
    pairs = pairs.groupby(["audio", "text"], as_index=False)["relevance"].max()
    indices = torch.tensor(np.stack([pairs["audio"].to_numpy(), pairs["text"].to_numpy()]), dtype=torch.long)
    values = torch.tensor(pairs["relevance"].to_numpy(), dtype=torch.float32)
    return torch.sparse_coo_tensor(indices, values, (len(fnames), len(captions)), check_invariants=True).coalesce()
