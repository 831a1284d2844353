"""Embedding a whole split with a trained model: every clip and caption once, then their scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.dual_encoder import DualEncoderModel
from utils.data import pad_logmels
from utils.stores import (
    AUDIO_COLUMNS,
    TEXT_COLUMNS,
    LogmelStore,
    audio_table,
    logmel_file,
    read_table,
    read_text_embeds,
    text_embeds_file,
    text_table,
)

TEXT_BATCH = 1024  # captions per text-tower call: a linear projection, cheap at any width


@dataclass
class SplitEmbeddings:
    """Every clip and caption of a split in the shared space.

    Row i of ``text`` describes clip ``audio[caption_audio[i]]``.
    """

    fnames: list[str]  # (n_audio,)
    audio: torch.Tensor  # (n_audio, E)
    captions: list[str]  # (n_captions,)
    text: torch.Tensor  # (n_captions, E)
    caption_audio: torch.Tensor  # (n_captions,) long

    def scores(self) -> torch.Tensor:
        """Cosine similarity ``(n_audio, n_captions)`` (embeddings are unit length)."""
        return self.audio @ self.text.T


@torch.no_grad()
def encode_split(
    model: DualEncoderModel, dataset_dir: Path, split: str, device: torch.device, batch_size: int = 32
) -> SplitEmbeddings:
    """Encode each clip and each caption of ``split`` exactly once, in batches, in inference mode."""
    model.eval()  # dropout off, BatchNorm running statistics
    logmels = LogmelStore(logmel_file(dataset_dir, split))
    audio_rows = read_table(audio_table(dataset_dir, split), AUDIO_COLUMNS)
    audio_rows = audio_rows[audio_rows["fid"].isin(logmels.row_of)]
    fids = audio_rows["fid"].to_numpy(np.int64)
    audio = []
    for start in range(0, len(fids), batch_size):
        batch, lengths = pad_logmels([logmels[f] for f in fids[start : start + batch_size]])
        audio.append(model.encode_audio(batch.to(device), lengths.to(device)).cpu())

    cids, embeds, _ = read_text_embeds(text_embeds_file(dataset_dir, split))
    row_of_cid = {int(c): i for i, c in enumerate(cids)}
    text_rows = read_table(text_table(dataset_dir, split), TEXT_COLUMNS)
    row_of_fid = {int(f): i for i, f in enumerate(fids)}
    text_rows = text_rows[text_rows["fid"].isin(row_of_fid) & text_rows["cid"].isin(row_of_cid)]
    caption_embeds = torch.from_numpy(embeds[[row_of_cid[int(c)] for c in text_rows["cid"]]])
    text = [
        model.encode_text(caption_embeds[s : s + TEXT_BATCH].to(device)).cpu()
        for s in range(0, len(caption_embeds), TEXT_BATCH)
    ]
    return SplitEmbeddings(
        fnames=audio_rows["fname"].tolist(),
        audio=torch.cat(audio),
        captions=text_rows["raw_text"].tolist(),
        text=torch.cat(text),
        caption_audio=torch.tensor([row_of_fid[int(f)] for f in text_rows["fid"]], dtype=torch.long),
    )
