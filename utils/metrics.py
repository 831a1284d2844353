"""Cross-modal retrieval metrics with the DCASE Task 6B definitions, vectorised."""

from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
MAP_K = 10
NDCG_KS = (5, 10)


def first_relevant_rank(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """The 1-based rank of each query's best-ranked relevant item, ``(n_query,)``, from ``scores`` and boolean
    ``relevant`` ``(n_query, n_item)``: 1 + the items scored higher than it + those tied with it that come first
    in item order (a stable descending sort), counted without sorting the rows. No relevant item: ``n_item + 1``."""
    best = scores.masked_fill(~relevant, float("-inf"))
    value, index = best.max(dim=1, keepdim=True)  # (n_query, 1): the first of the best if several tie
    before = torch.arange(scores.size(1), device=scores.device)[None, :] < index
    ahead = (scores > value) | ((scores == value) & before)
    return torch.where(relevant.any(dim=1), 1 + ahead.sum(dim=1), scores.size(1) + 1)


def _ranked_metrics(scores: torch.Tensor, relevant: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics for queries in rows of ``scores`` ``(n_query, n_item)`` with boolean ``relevant`` of the same shape,
    and the ``(n_query, k)`` 0/1 relevance of each query's top k."""
    k = min(max(MAP_K, *RECALL_KS, *NDCG_KS), scores.size(1))
    top = scores.topk(k, dim=1).indices  # (n_query, k), best first
    hits = relevant.gather(1, top).float()  # (n_query, k): 1 where the ranked item is relevant
    n_relevant = relevant.sum(dim=1).clamp(min=1)  # (n_query,)
    out = {}
    ranks = torch.arange(1, k + 1, device=scores.device, dtype=torch.float)
    precision_at = hits.cumsum(dim=1) / ranks  # (n_query, k): precision at each cut-off
    map_k = min(MAP_K, k)
    ap = (precision_at[:, :map_k] * hits[:, :map_k]).sum(dim=1) / n_relevant
    out[f"mAP@{MAP_K}"] = ap.mean().item()
    for r in RECALL_KS:
        out[f"R@{r}"] = (hits[:, :r].sum(dim=1) / n_relevant).mean().item()
    # binary NDCG: DCG = sum of 1 / log2(p + 1) over relevant items at positions p <= k, over the DCG of an ideal
    # ranking (the query's relevant items first); ideal[i] is the DCG of i + 1 relevant items at the top
    gains = 1 / torch.log2(ranks + 1)  # (k,)
    ideal = gains.cumsum(dim=0)
    for n in NDCG_KS:
        cut = min(n, k)
        dcg = (hits[:, :cut] * gains[:cut]).sum(dim=1)
        out[f"NDCG@{n}"] = (dcg / ideal[n_relevant.clamp(max=cut) - 1]).mean().item()
    first = first_relevant_rank(scores, relevant).float()
    out["mean_rank"] = first.mean().item()
    out["median_rank"] = first.quantile(0.5).item()  # the middle one, or the mean of the two middle ones
    return out, hits


def retrieval_metrics(
    scores: np.ndarray | torch.Tensor, caption_audio: np.ndarray | torch.Tensor
) -> dict[str, dict[str, float]]:
    """Text-to-audio and audio-to-text retrieval metrics, both audio-to-text protocols labelled.

    ``scores``: ``(n_audio, n_captions)`` similarity, higher is better.
    ``caption_audio``: ``(n_captions,)`` row of ``scores`` holding each caption's clip.
    ``t2a`` and ``a2t`` (the DCASE protocol): R@k = relevant items in the top k / all relevant items of the query;
    mAP@10 = sum of precision at each relevant hit within the top 10 / number of relevant items; NDCG@5 and
    NDCG@10 with binary relevance; ``mean_rank`` and ``median_rank`` of the first relevant item (1-based).
    ``a2t_any`` (the CLAP-style protocol): R@k = 1 when any of the clip's captions is in its top k.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    caption_audio = torch.as_tensor(caption_audio, dtype=torch.long)
    n_audio, n_captions = scores.shape
    if caption_audio.shape != (n_captions,):
        raise ValueError(f"caption_audio has shape {tuple(caption_audio.shape)}, expected ({n_captions},)")
    # relevant[a, c]: caption c describes clip a, shape (n_audio, n_captions)
    relevant = caption_audio[None, :] == torch.arange(n_audio)[:, None]
    t2a, _ = _ranked_metrics(scores.T, relevant.T)
    a2t, hits = _ranked_metrics(scores, relevant)
    a2t_any = {f"R@{r}": (hits[:, :r].sum(dim=1) > 0).float().mean().item() for r in RECALL_KS}
    return {"t2a": t2a, "a2t": a2t, "a2t_any": a2t_any}


def caption_ranks(scores: np.ndarray | torch.Tensor, caption_audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Each caption's 1-based rank of its clip among all clips, ``(n_captions,)`` (ties as ``first_relevant_rank``)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    caption_audio = torch.as_tensor(caption_audio, dtype=torch.long)
    relevant = caption_audio[:, None] == torch.arange(scores.size(0))[None, :]  # (n_captions, n_audio)
    return first_relevant_rank(scores.T, relevant)


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
