"""Cross-modal retrieval metrics with the DCASE Task 6B definitions, vectorised."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
MAP_K = 10
DCASE2025_MAP_K = 16  # the DCASE 2025 protocol ranks systems on mAP@16, with several relevant clips per caption
NDCG_KS = (5, 10)


def first_relevant_rank(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """The 1-based rank of each query's best-ranked relevant item, ``(n_query,)``, from ``scores`` and boolean
    ``relevant`` ``(n_query, n_item)``: 1 + the items scored higher than it + those tied with it that come first
    in item order (a stable descending sort), counted without sorting the rows. No relevant item: ``n_item + 1``."""
    best = scores.masked_fill(~relevant, float("-inf"))
    value, index = best.max(dim=1)  # (n_query,): the first of the best if several tie
    return _rank_of(scores, value, index, relevant.any(dim=1))


def _rank_of(scores: torch.Tensor, value: torch.Tensor, index: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """The 1-based stable rank of item ``index[q]`` scored ``value[q]`` in row q of ``scores`` ``(n_query, n_item)``;
    ``n_item + 1`` where ``found[q]`` is false."""
    # counted in float32 (exact below 2**24 items), several times faster than summing booleans into int64
    ahead = (scores > value[:, None]).float().sum(dim=1)
    tied = (scores == value[:, None]).float().sum(dim=1) > 1  # float ties are rare: resolve them in those rows only
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        before = torch.arange(scores.size(1), device=scores.device)[None, :] < index[rows, None]
        ahead[rows] += ((scores[rows] == value[rows, None]) & before).float().sum(dim=1)
    return torch.where(found, 1 + ahead.long(), scores.size(1) + 1)


@dataclass
class Judgements:
    """The relevant (query, item) pairs of one retrieval direction, sorted by query then item: ``query``,
    ``item`` ``(nnz,)`` long and ``grade`` ``(nnz,)`` float (the NDCG gain); ``relevant`` ``(nnz,)`` bool marks the
    pairs whose grade reaches the threshold (the others count for NDCG only)."""

    query: torch.Tensor
    item: torch.Tensor
    grade: torch.Tensor
    relevant: torch.Tensor

    @staticmethod
    def of(
        query: torch.Tensor,
        item: torch.Tensor,
        grade: torch.Tensor,
        own: torch.Tensor,
        n_item: int,
        threshold: float | None,
    ) -> Judgements:
        """From ``(nnz,)`` query and item indices, grades and pairing flags ``own`` of distinct pairs, in any order:
        a pair of the pairing is relevant, another when its grade reaches ``threshold`` (None: above 0)."""
        keep = (grade > 0) | own
        query, item, grade, own = query[keep], item[keep], grade[keep].float(), own[keep]
        order = torch.argsort(query * n_item + item)
        query, item, grade, own = query[order], item[order], grade[order], own[order]
        return Judgements(query, item, grade, own | (grade > 0 if threshold is None else grade >= threshold))

    def lookup(self, n_item: int, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grade and relevance of each query's ranked items ``top`` ``(n_query, k)``: two ``(n_query, k)``
        tensors, 0 and False for pairs not judged. The pairs are keyed by ``query * n_item + item`` (ascending, as
        ``of`` sorts them) and found by binary search, so no dense ``(n_query, n_item)`` mask is built."""
        keys = self.query * n_item + self.item  # (nnz,) ascending; never empty: every caption has its clip
        wanted = torch.arange(top.size(0), device=top.device)[:, None] * n_item + top  # (n_query, k)
        at = torch.searchsorted(keys, wanted).clamp(max=len(keys) - 1)
        judged = keys[at] == wanted
        return torch.where(judged, self.grade[at], 0.0), judged & self.relevant[at]


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices ``(n_query, k)`` of each row's k best items, best first, equal scores in item order (what a
    stable descending sort gives; ``torch.topk`` leaves the order of ties open). Rows where a tie straddles the
    cut-off are sorted whole; the others only within their top k."""
    value, top = scores.topk(min(k + 1, scores.size(1)), dim=1)  # one more: does a tie straddle the cut-off?
    straddle = value[:, k - 1] == value[:, k] if value.size(1) > k else torch.zeros(len(top), dtype=torch.bool)
    value, top = value[:, :k], top[:, :k]
    order = torch.sort(top, dim=1).indices  # by index, then stably by falling score
    top = top.gather(1, order)
    top = top.gather(1, torch.sort(value.gather(1, order), dim=1, descending=True, stable=True).indices)
    if straddle.any():
        rows = straddle.nonzero().squeeze(1)
        top[rows] = torch.sort(scores[rows], dim=1, descending=True, stable=True).indices[:, :k]
    return top


def _ranked_metrics(scores: torch.Tensor, judged: Judgements, ks: MetricKs) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics for queries in rows of ``scores`` ``(n_query, n_item)`` judged by ``judged``, and the
    ``(n_query, k)`` 0/1 relevance of each query's top k."""
    n_query, n_item = scores.shape
    k = min(max(*ks.map, *ks.recall, *ks.ndcg), n_item)
    top = stable_topk(scores, k)  # (n_query, k), best first
    gain, relevant = judged.lookup(n_item, top)
    hits = relevant.float()  # (n_query, k): 1 where the ranked item is relevant
    counts = torch.zeros(n_query, dtype=torch.long).index_add_(0, judged.query, judged.relevant.long())
    n_relevant = counts.clamp(min=1)  # (n_query,)
    out = {}
    ranks = torch.arange(1, k + 1, device=scores.device, dtype=torch.float)
    precision_at = hits.cumsum(dim=1) / ranks  # (n_query, k): precision at each cut-off
    for m in ks.map:
        cut = min(m, k)
        ap = (precision_at[:, :cut] * hits[:, :cut]).sum(dim=1) / n_relevant
        out[f"mAP@{m}"] = ap.mean().item()
    for r in ks.recall:
        out[f"R@{r}"] = (hits[:, :r].sum(dim=1) / n_relevant).mean().item()
    # NDCG: DCG = sum of gain / log2(p + 1) over the items at positions p <= k, over the DCG of an ideal ranking
    # (the query's judged items by falling grade)
    gains = 1 / torch.log2(ranks + 1)  # (k,)
    for n in ks.ndcg:
        cut = min(n, k)
        dcg = (gain[:, :cut] * gains[:cut]).sum(dim=1)
        ideal = _ideal_dcg(judged, n_query, gains[:cut])
        out[f"NDCG@{n}"] = torch.where(ideal > 0, dcg / ideal, 0.0).mean().item()  # 0 for a query with none
    best = torch.full((n_query,), float("-inf")).scatter_reduce_(
        0, judged.query[judged.relevant], scores[judged.query, judged.item][judged.relevant], "amax"
    )
    # the first relevant item in item order among those scored best (ties rank by index)
    at_best = judged.relevant & (scores[judged.query, judged.item] == best[judged.query])
    index = torch.full((n_query,), n_item).scatter_reduce_(0, judged.query[at_best], judged.item[at_best], "amin")
    first = _rank_of(scores, best, index, counts > 0).float()
    out["mean_rank"] = first.mean().item()
    out["median_rank"] = first.quantile(0.5).item()  # the middle one, or the mean of the two middle ones
    return out, hits


def _ideal_dcg(judged: Judgements, n_query: int, gains: torch.Tensor) -> torch.Tensor:
    """Each query's DCG ``(n_query,)`` when its judged items come first by falling grade, cut to ``len(gains)``
    positions."""
    order = torch.sort(judged.grade, descending=True, stable=True).indices
    order = order[torch.sort(judged.query[order], stable=True).indices]  # by query, grades falling within it
    query, grade = judged.query[order], judged.grade[order]
    start = torch.zeros(n_query + 1, dtype=torch.long)
    start[1:] = torch.bincount(query, minlength=n_query).cumsum(0)
    position = torch.arange(len(query)) - start[query]  # 0-based position of each item in its query's ideal ranking
    keep = position < len(gains)
    return torch.zeros(n_query).index_add_(0, query[keep], grade[keep] * gains[position[keep]])


@dataclass(frozen=True)
class MetricKs:
    """The cut-offs reported: ``mAP@k`` for each of ``map``, ``R@k`` for ``recall``, ``NDCG@k`` for ``ndcg``."""

    map: tuple[int, ...] = (MAP_K,)
    recall: tuple[int, ...] = RECALL_KS
    ndcg: tuple[int, ...] = NDCG_KS


DCASE2025_KS = MetricKs(map=(MAP_K, DCASE2025_MAP_K))  # the cut-offs reported with a relevance table


def retrieval_metrics(
    scores: np.ndarray | torch.Tensor,
    caption_audio: np.ndarray | torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    threshold: float | None = None,
    ks: MetricKs = MetricKs(),
) -> dict[str, dict[str, float]]:
    """Text-to-audio and audio-to-text retrieval metrics, both audio-to-text protocols labelled.

    ``scores``: ``(n_audio, n_captions)`` similarity, higher is better.
    ``caption_audio``: ``(n_captions,)`` row of ``scores`` holding each caption's clip.
    ``relevance``: optional sparse ``(n_audio, n_captions)`` grades of further relevant pairs (a relevance table,
    ``utils.relevance``, DCASE 2025; a pair given twice counts at its higher grade): a pair is relevant when its
    grade reaches ``threshold`` (None: any positive grade), and graded NDCG uses the grades as gains. Each
    caption's own clip is relevant at any threshold, with the table's highest grade (at least 1; 1 without a
    table).
    ``t2a`` and ``a2t`` (the DCASE protocol): R@k = relevant items in the top k / all relevant items of the query;
    mAP@k = sum of precision at each relevant hit within the top k / number of relevant items (the DCASE 2025
    baseline's definition; ``ks.map``, 10 by default, 16 for DCASE 2025); NDCG@5 and NDCG@10; ``mean_rank`` and
    ``median_rank`` of the first relevant item (1-based). Ties rank the lower index first.
    ``a2t_any`` (the CLAP-style protocol): R@k = 1 when any relevant caption is in the clip's top k.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32).cpu()  # small index tensors are built on the CPU
    caption_audio = torch.as_tensor(caption_audio, dtype=torch.long).cpu()
    n_audio, n_captions = scores.shape
    if caption_audio.shape != (n_captions,):
        raise ValueError(f"caption_audio has shape {tuple(caption_audio.shape)}, expected ({n_captions},)")
    audio, text, grade, own = _judged_pairs(caption_audio, n_audio, relevance)
    t2a, _ = _ranked_metrics(scores.T, Judgements.of(text, audio, grade, own, n_audio, threshold), ks)
    a2t, hits = _ranked_metrics(scores, Judgements.of(audio, text, grade, own, n_captions, threshold), ks)
    a2t_any = {f"R@{r}": (hits[:, :r].sum(dim=1) > 0).float().mean().item() for r in ks.recall}
    return {"t2a": t2a, "a2t": a2t, "a2t_any": a2t_any}


def _judged_pairs(
    caption_audio: torch.Tensor, n_audio: int, relevance: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The judged (clip, caption) pairs of a split: clip and caption indices, grades and whether each is of the
    pairing, all ``(nnz,)``. Without a table, the pairing at grade 1; with one, the union, each pair once at its
    highest grade (a table may list the pairing itself, or a pair twice), a caption's own clip at the table's
    highest grade (at least 1)."""
    n_captions = len(caption_audio)
    audio, text = caption_audio, torch.arange(n_captions)  # the pairing
    if relevance is None:
        return audio, text, torch.ones(n_captions), torch.ones(n_captions, dtype=torch.bool)
    if tuple(relevance.shape) != (n_audio, n_captions):
        raise ValueError(f"relevance has shape {tuple(relevance.shape)}, expected {(n_audio, n_captions)}")
    relevance = relevance.cpu().to_sparse_coo()
    indices, values = relevance._indices(), relevance._values().float()  # as given: coalescing would add up twins
    top = max(values.max().item(), 1.0) if len(values) else 1.0
    both = torch.cat([indices, torch.stack([audio, text])], dim=1)  # (2, nnz + n_captions)
    unique, inverse = (both[0] * n_captions + both[1]).unique(return_inverse=True)
    grade = torch.zeros(len(unique)).scatter_reduce_(
        0, inverse, torch.cat([values, torch.full((n_captions,), top)]), "amax", include_self=False
    )
    flags = torch.cat([torch.zeros(len(values)), torch.ones(n_captions)])
    own = torch.zeros(len(unique)).scatter_reduce_(0, inverse, flags, "amax", include_self=False).bool()
    return unique // n_captions, unique % n_captions, grade, own


def relevant_per_caption(
    caption_audio: np.ndarray | torch.Tensor, n_audio: int, relevance: torch.Tensor, threshold: float | None = None
) -> float:
    """The mean number of relevant clips per caption that ``retrieval_metrics`` counts with ``relevance`` and
    ``threshold``: the caption's own clip and the table's pairs whose grade reaches the threshold."""
    caption_audio = torch.as_tensor(caption_audio, dtype=torch.long).cpu()
    audio, text, grade, own = _judged_pairs(caption_audio, n_audio, relevance)
    judged = Judgements.of(text, audio, grade, own, n_audio, threshold)
    return judged.relevant.sum().item() / len(caption_audio)


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
