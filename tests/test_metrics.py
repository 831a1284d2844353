import numpy as np
import pytest

from utils.metrics import flatten_metrics, retrieval_metrics


def plain_metrics(ranked_relevance, n_relevant):
    """DCASE definitions for one query, from its ranked 0/1 relevance list."""
    out = {f"R@{k}": sum(ranked_relevance[:k]) / n_relevant for k in (1, 5, 10)}
    hits, precision_sum = 0, 0.0
    for rank, rel in enumerate(ranked_relevance[:10], start=1):
        if rel:
            hits += 1
            precision_sum += hits / rank
    out["mAP@10"] = precision_sum / n_relevant
    return out


def plain_retrieval_metrics(scores, caption_audio):
    n_audio, n_captions = scores.shape
    t2a, a2t = [], []
    for c in range(n_captions):
        order = np.argsort(-scores[:, c], kind="stable")
        t2a.append(plain_metrics([int(a == caption_audio[c]) for a in order], 1))
    for a in range(n_audio):
        order = np.argsort(-scores[a], kind="stable")
        a2t.append(plain_metrics([int(caption_audio[c] == a) for c in order], int((caption_audio == a).sum())))
    mean = lambda rows: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}  # noqa: E731
    return {"t2a": mean(t2a), "a2t": mean(a2t)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_plain_per_query_version(seed):
    rng = np.random.default_rng(seed)
    n_audio = 40
    caption_audio = np.repeat(np.arange(n_audio), 5)  # 5 captions per clip, like Clotho
    rng.shuffle(caption_audio)
    # Informative but noisy scores so hits land at many different ranks.
    scores = rng.normal(size=(n_audio, caption_audio.size)) + 2.0 * (
        caption_audio[None, :] == np.arange(n_audio)[:, None]
    )
    fast = retrieval_metrics(scores, caption_audio)
    plain = plain_retrieval_metrics(scores, caption_audio)
    for direction in ("t2a", "a2t"):
        for name, value in plain[direction].items():
            assert fast[direction][name] == pytest.approx(value, abs=1e-6), (direction, name)


def test_perfect_and_hand_computed_scores():
    caption_audio = np.array([0, 0, 1, 1])
    perfect = np.array([[1.0, 0.9, 0.1, 0.0], [0.0, 0.1, 0.9, 1.0]])
    m = retrieval_metrics(perfect, caption_audio)
    assert m["t2a"] == pytest.approx({"mAP@10": 1.0, "R@1": 1.0, "R@5": 1.0, "R@10": 1.0})
    # A clip has two relevant captions, so a perfect ranking still finds only half of them at rank 1.
    assert m["a2t"] == pytest.approx({"mAP@10": 1.0, "R@1": 0.5, "R@5": 1.0, "R@10": 1.0})
    # Clip 0 ranks its captions 1st and 3rd: AP = (1/1 + 2/3) / 2.
    scores = np.array([[0.9, 0.1, 0.5, 0.0], [0.0, 0.2, 1.0, 1.0]])
    assert retrieval_metrics(scores, caption_audio)["a2t"]["mAP@10"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)


def test_shape_mismatch_and_flattened_keys():
    with pytest.raises(ValueError, match="caption_audio"):
        retrieval_metrics(np.zeros((3, 4)), np.zeros(5, dtype=int))
    flat = flatten_metrics({"t2a": {"mAP@10": 0.5}}, "val")
    assert flat == {"val/t2a_mAP@10": 0.5}
