"""Cross-modal retrieval metrics with the DCASE Task 6B definitions, vectorised."""

from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
MAP_K = 10


def _ranked_metrics(scores: torch.Tensor, relevant: torch.Tensor) -> dict[str, float]:
    """Metrics for queries in rows of ``scores`` ``(n_query, n_item)`` with boolean ``relevant`` of the same shape."""
    k = min(max(MAP_K, *RECALL_KS), scores.size(1))
    top = scores.topk(k, dim=1).indices  # (n_query, k), best first
    hits = relevant.gather(1, top).float()  # (n_query, k): 1 where the ranked item is relevant
    n_relevant = relevant.sum(dim=1).clamp(min=1).float()  # (n_query,)
    out = {}
    ranks = torch.arange(1, k + 1, device=scores.device, dtype=torch.float)
    precision_at = hits.cumsum(dim=1) / ranks  # (n_query, k): precision at each cut-off
    map_k = min(MAP_K, k)
    ap = (precision_at[:, :map_k] * hits[:, :map_k]).sum(dim=1) / n_relevant
    out[f"mAP@{MAP_K}"] = ap.mean().item()
    for r in RECALL_KS:
        out[f"R@{r}"] = (hits[:, :r].sum(dim=1) / n_relevant).mean().item()
    return out


def retrieval_metrics(
    scores: np.ndarray | torch.Tensor, caption_audio: np.ndarray | torch.Tensor
) -> dict[str, dict[str, float]]:
    """mAP@10 and R@1/5/10 for text-to-audio and audio-to-text retrieval.

    ``scores``: ``(n_audio, n_captions)`` similarity, higher is better.
    ``caption_audio``: ``(n_captions,)`` row of ``scores`` holding each caption's clip.
    R@k = relevant items in the top k / all relevant items of the query;
    mAP@10 = sum of precision at each relevant hit within the top 10 / number of relevant items.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    caption_audio = torch.as_tensor(caption_audio, dtype=torch.long)
    n_audio, n_captions = scores.shape
    if caption_audio.shape != (n_captions,):
        raise ValueError(f"caption_audio has shape {tuple(caption_audio.shape)}, expected ({n_captions},)")
    # relevant[a, c]: caption c describes clip a, shape (n_audio, n_captions)
    relevant = caption_audio[None, :] == torch.arange(n_audio)[:, None]
    return {
        "t2a": _ranked_metrics(scores.T, relevant.T),
        "a2t": _ranked_metrics(scores, relevant),
    }


def flatten_metrics(metrics: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """``{"t2a": {"mAP@10": x}}`` -> ``{"<prefix>/t2a_mAP@10": x}`` for logging and Ray Tune."""
    return {
        f"{prefix}/{direction}_{name}": value for direction, values in metrics.items() for name, value in values.items()
    }


def sequence_metrics(audio: torch.Tensor, text: torch.Tensor, caption_audio: torch.Tensor) -> dict[str, float]:
    """How close each caption's target sequence is to its clip's audio sequence (audio2img), averaged over captions:
    ``audio`` ``(n_audio, L, W)``, ``text`` ``(n_captions, L, W)``, ``caption_audio`` ``(n_captions,)`` each caption's
    clip. ``seq_cosine``: the mean over positions of the two vectors' cosine; ``seq_mse``: the mean squared
    difference of all ``L * W`` values; ``seq_euclidean``: the mean over positions of the two vectors' distance."""
    paired = audio[caption_audio].float()  # (n_captions, L, W)
    text = text.float()
    return {
        "seq_cosine": torch.nn.functional.cosine_similarity(paired, text, dim=-1).mean().item(),
        "seq_mse": (paired - text).pow(2).mean().item(),
        "seq_euclidean": (paired - text).norm(dim=-1).mean().item(),
    }
