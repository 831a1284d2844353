"""Exact search over a stored collection index: one text query against 200,000 vectors, as ``example/search.py``
answers it.

An index of random unit vectors (float16, as ``example/index.py`` stores them) is written with the project's
``IndexWriter`` for an untrained model of ``conf.yaml`` (its checkpoint saved beside the index, so that
``CollectionSearch`` loads the model the index names, exactly as for a trained one). Timed, in one process:
- search alone: ``ExactSearch.search`` of a query vector already embedded (the default float32 copy of the
  vectors, and the float16 vectors converted chunk by chunk, what indexes over ``FLOAT32_CACHE_MB`` get);
- query embedding + search: ``CollectionSearch.text``, the whole of a user's query (Sentence-BERT, the model's
  text tower, the search and the file names).
The answer is checked once against a plain matmul of the query with every stored vector and its top-k.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(REPO_ROOT))

import torch
import torch.nn.functional as F

from bench.common import Row, measure
from example.search import CollectionSearch
from utils.checkpoints import build_model, save_checkpoint
from utils.config import Config, load_raw, validate
from utils.inference import encode_captions
from utils.vector_index import ExactSearch, IndexInfo, IndexWriter, config_hash, create_index, read_vectors

QUERY = "Three high beeps, then a burst of static noise."
EMBED_DIM = 512  # CLAP's width; conf.yaml's demo model uses 128, a quarter of the work
TOP = 10
TEXT_DIM = 384  # all-MiniLM-L6-v2's vectors, what the default text tower reads
TARGET_S = 0.2


def write_collection(folder: Path, config: Config, count: int, batch: int = 50_000) -> Path:
    """An index of ``count`` random unit vectors for an untrained model of ``config`` (its checkpoint saved in
    ``folder``); returns the index's path."""
    inputs = {"n_mels": config.features.n_mels, "text_dim": TEXT_DIM}  # what model_inputs would read from stores
    model = build_model(config, torch.device("cpu"), pretrained=False, inputs=inputs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer)
    checkpoint = save_checkpoint(folder, model, optimizer, scheduler, config, 0, {}, inputs)
    path = folder / "collection.h5"
    create_index(path, IndexInfo(config_hash(config), str(checkpoint.resolve()), str(folder), EMBED_DIM, False))
    generator = torch.Generator().manual_seed(0)
    with IndexWriter(path) as writer:
        for start in range(0, count, batch):
            rows = min(batch, count - start)
            vectors = F.normalize(torch.randn(rows, EMBED_DIM, generator=generator), dim=-1)  # (rows, E)
            writer.append([f"clip_{start + i:07d}.wav" for i in range(rows)], vectors)
    return path


def check_answer(search: CollectionSearch, path: Path) -> None:
    """``CollectionSearch.text`` must give the plain answer: the query's embedding times every stored vector, top k."""
    query = encode_captions(search.model, search.config, [QUERY], search.device).float()  # (1, E)
    values, rows = (query @ read_vectors(path).float().T).topk(TOP, dim=1)  # (1, k)
    (hits,) = search.text([QUERY], TOP)
    if [name for name, _ in hits] != [search.fnames[r] for r in rows[0].tolist()]:
        raise AssertionError("CollectionSearch.text differs from a plain matmul and top-k")
    if not torch.allclose(torch.tensor([score for _, score in hits]), values[0], atol=1e-5):
        raise AssertionError("CollectionSearch.text's scores differ from a plain matmul")


def run(quick: bool) -> list[Row]:
    """Search-alone and query-to-answer times of one text query over 200,000 stored vectors (2,000 in quick)."""
    count, repeats = (2_000, 3) if quick else (200_000, 7)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        folder = Path(tmp)
        config = validate(
            load_raw(REPO_ROOT / "conf.yaml", ["device=cpu", f"model.embed_dim={EMBED_DIM}", f"data.dataset_dir={tmp}"])
        )
        path = write_collection(folder, config, count)
        search = CollectionSearch(path, device="cpu", backend="auto")
        check_answer(search, path)
        query = encode_captions(search.model, search.config, [QUERY], search.device).float()  # (1, E)
        alone = measure(lambda: search.vectors.search(query, TOP), repeats=repeats)
        per_chunk = ExactSearch(read_vectors(path), "torch", float32_mb=0)
        converted = measure(lambda: per_chunk.search(query, TOP), repeats=min(repeats, 5))
        embed = measure(lambda: encode_captions(search.model, search.config, [QUERY], search.device), repeats=repeats)
        whole = measure(lambda: search.text([QUERY], TOP), repeats=repeats)
    size = f"{count:,} x {EMBED_DIM} float16 vectors, top {TOP}"
    target = f"<= {TARGET_S * 1e3:.0f} ms"

    def met(seconds: float) -> bool | None:
        return None if quick else seconds <= TARGET_S  # quick sizes say nothing about the target

    return [
        Row(
            f"exact search, one text query, {size}: search alone ({search.vectors.backend}, float32 copy)",
            str(alone),
            target=target,
            met=met(alone.min_s),
            note="the query already embedded: ExactSearch.search",
        ),
        Row(
            f"exact search, one text query, {size}: query embedding + search",
            str(whole),
            against=f"query embedding alone: {embed}",
            target=target,
            met=met(whole.min_s),
            note="CollectionSearch.text as example/search.py runs it: Sentence-BERT, the text tower, search, names"
            + (
                f"; the query embedding is {embed.min_s / whole.min_s:.0%} of it: one caption's Sentence-BERT forward, "
                "tens of small ops, each as slow as the later of torch's threads when other processes share the cores"
                if not met(whole.min_s) and not quick
                else ""
            ),
        ),
        Row(
            f"exact search, one text query, {size}: search alone, float16 converted per chunk",
            str(converted),
            against=f"float32 copy: {alone.min_s * 1e3:.3g} ms",
            ratio=f"{converted.min_s / alone.min_s:.2g}x the float32 copy's time",
            note="what indexes larger than FLOAT32_CACHE_MB (500,000 x 512) get; no target",
        ),
    ]


if __name__ == "__main__":
    for row in run("--quick" in sys.argv):
        print(row)
