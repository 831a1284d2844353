"""Embedding a whole split with a trained model: every clip and caption once, then their scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.dual_encoder import DualEncoderModel
from utils.audio import clip_views, load_audio, logmel
from utils.config import Config
from utils.data import audio_source, pad_logmels, text_source, to_device, usable_captions
from utils.extractors import CaptionTokens, make_extractor
from utils.stores import AUDIO_COLUMNS, audio_table, read_table
from utils.text import load_sentence_model
from utils.tower_stores import is_pretrained

TEXT_BATCH = 1024  # captions per text-tower call for precomputed vectors: a projection, cheap at any width


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
    model: DualEncoderModel, config: Config, split: str, device: torch.device, batch_size: int = 32
) -> SplitEmbeddings:
    """Encode each clip and each caption of ``split`` exactly once, in batches, in inference mode. A clip
    seen through several views (sliding windows, stored crops) is the normalised mean of their embeddings."""
    model.eval()  # dropout off, BatchNorm running statistics
    dataset_dir = config.data.dataset_dir
    audio_rows = read_table(audio_table(dataset_dir, split), AUDIO_COLUMNS)
    source = audio_source(config, split)
    audio_rows = audio_rows[audio_rows["fid"].isin(source.fids)]
    fids = audio_rows["fid"].to_numpy(np.int64)
    views = [(row, view) for row, fid in enumerate(fids) for view in source.views(int(fid))]
    embeds = []
    for start in range(0, len(views), batch_size):
        batch = source.collate([view for _, view in views[start : start + batch_size]])
        embeds.append(model.encode_audio(**to_device(batch, device)).cpu())
    audio = torch.cat(embeds)  # (n_views, E)
    if len(views) > len(fids):  # average each clip's views: (n_views, E) -> (n_audio, E)
        clip = torch.tensor([row for row, _ in views])
        audio = F.normalize(torch.zeros(len(fids), audio.size(1)).index_add_(0, clip, audio), dim=-1)

    text = text_source(config, split)
    row_of_fid = {int(f): i for i, f in enumerate(fids)}
    text_rows = usable_captions(config, split, source, text)
    captions = text_rows[config.text_embeddings.caption_column].astype(str).tolist()
    items = [text.get(int(c), caption) for c, caption in zip(text_rows["cid"], captions)]
    step = TEXT_BATCH if text.cids is not None else batch_size  # vectors, or a text transformer per batch
    text_embeds = [
        model.encode_text(**to_device(text.collate(items[s : s + step]), device)).cpu()
        for s in range(0, len(items), step)
    ]
    return SplitEmbeddings(
        fnames=audio_rows["fname"].tolist(),
        audio=audio,
        captions=text_rows["raw_text"].tolist(),
        text=torch.cat(text_embeds),
        caption_audio=torch.tensor([row_of_fid[int(f)] for f in text_rows["fid"]], dtype=torch.long),
    )


@torch.no_grad()
def encode_audio_files(
    model: DualEncoderModel, config: Config, paths: list[Path], device: torch.device
) -> torch.Tensor:
    """New audio files -> ``(n_files, E)``: each file decoded and seen as the config's evaluation views (log-mels
    for a CNN, the tower's own extractor for a ``transformers`` tower, whose backbone the model must hold),
    the views' embeddings averaged."""
    model.eval()
    tower = config.model.audio_enc
    extractor = make_extractor(tower) if is_pretrained(tower) else None
    rate = extractor.sample_rate if extractor else config.features.sample_rate
    embeds = []
    for path in paths:
        wave = load_audio(path, rate, config.features.max_seconds)
        if extractor is None:
            frames = logmel(wave, config.features, name=str(path))
            views = clip_views(frames, 1000 / config.features.hop_ms, config.crops, False, np.random.default_rng(0))
            logmels, lengths = pad_logmels(views)
            batch = {"logmels": logmels, "lengths": lengths}
        else:
            views = clip_views(wave, rate, config.crops, False, np.random.default_rng(0))
            batch = extractor.collate([extractor.extract(view, seed=k, train=False) for k, view in enumerate(views)])
        embeds.append(F.normalize(model.encode_audio(**to_device(batch, device)).mean(0), dim=-1))
    return torch.stack(embeds)


@torch.no_grad()
def encode_captions(model: DualEncoderModel, config: Config, captions: list[str], device: torch.device) -> torch.Tensor:
    """New captions (written as people write them) -> ``(n, E)``, in the form the model was trained on: the
    config's caption column, then Sentence-BERT or the text tower's own tokenizer (and backbone)."""
    model.eval()
    embedded = [config.text_embeddings.caption(c) for c in captions]
    tower = config.model.text_enc
    if is_pretrained(tower):
        return model.encode_text(**to_device(CaptionTokens(tower)(embedded), device))
    sentence_model = load_sentence_model(config.text_embeddings.model_name, device)
    return model.encode_text(torch.from_numpy(sentence_model.encode(embedded, convert_to_numpy=True)).to(device))
