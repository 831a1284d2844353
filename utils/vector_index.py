"""Collection indexes: audio files embedded by one trained model in one HDF5 file, and exact top-k search over them.

An index of n files under one folder (``example/index.py`` writes it, ``example/search.py`` reads it) holds::

    vectors   (n, E) float16        one unit vector per file (a text-aware head's: its normalised mean frame)
    fnames    (n,) utf-8            the files' paths relative to the indexed folder, with ``/``
    frames    (sum T_i, E) float16  text-aware heads only: file i's projected frames are
    offsets   (n + 1,) int64          frames[offsets[i]:offsets[i + 1]], read only for the files a query shortlists
    attrs     format, config_hash, model, root, embed_dim, text_aware, count

Rows are appended in batches; a batch is written and flushed before ``count`` takes it in, so the rows past
``count`` of an interrupted write are not part of the index (``IndexWriter`` drops them when it reopens the file).
Only arrays and strings: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from utils.errors import DatasetError, InputError

if TYPE_CHECKING:  # a type only: the index format does not need the config schema
    from utils.config import Config

FORMAT = "audio-collection-index/1"
CHUNK_ROWS = 65_536  # indexed vectors per float32 matmul: a 128 MB chunk at E = 512
# vectors up to this size (500,000 at E = 512) are held as float32 once, so a query is one matmul, not a conversion
# of every vector and a matmul (about 10x faster on this project's 2-core machine)
FLOAT32_CACHE_MB = 1024
BACKENDS = ("auto", "torch", "faiss", "usearch")
PACKAGES = {"faiss": "faiss-cpu", "usearch": "usearch"}  # what pip installs each optional backend from


def config_hash(config: Config) -> str:
    """sha256 of a model's resolved config as canonical JSON (sorted keys, no spaces): an index is only ever searched
    with a model whose config hashes the same."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class IndexInfo:
    """An index file's attributes: the model that embedded it (its config's hash and where it was), the folder its
    file names are relative to, the vectors' width, whether it holds frames for a text-aware head, and its rows."""

    config_hash: str
    model: str
    root: str
    embed_dim: int
    text_aware: bool
    count: int = 0


def open_index(path: Path, mode: str = "r") -> h5py.File:
    """An index file, opened; a missing file or one that ``create_index`` did not write is a one-line error."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such index; make one with example/index.py")
    try:
        f = h5py.File(path, mode)
    except OSError as err:
        raise DatasetError(f"{path}: not a readable HDF5 index ({err})") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise DatasetError(f"{path}: not an index written by example/index.py (no format attribute {FORMAT!r})")
    return f


def create_index(path: Path, info: IndexInfo) -> None:
    """Write an empty index with ``info``'s attributes: resizable datasets that ``IndexWriter`` appends to."""
    width = info.embed_dim
    with h5py.File(path, "w") as f:
        f.create_dataset("vectors", (0, width), np.float16, maxshape=(None, width), chunks=(1024, width))
        f.create_dataset("fnames", (0,), h5py.string_dtype("utf-8"), maxshape=(None,), chunks=(1024,))
        if info.text_aware:
            # small chunks: a shortlist reads a few hundred frames of a file, not a whole chunk each
            f.create_dataset("frames", (0, width), np.float16, maxshape=(None, width), chunks=(256, width))
            f.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(1024,))
        f.attrs.update({**asdict(info), "count": 0, "format": FORMAT})


def read_info(path: Path) -> IndexInfo:
    """The attributes of the index at ``path``."""
    with open_index(path) as f:
        attrs = f.attrs
        return IndexInfo(
            config_hash=str(attrs["config_hash"]),
            model=str(attrs["model"]),
            root=str(attrs["root"]),
            embed_dim=int(attrs["embed_dim"]),
            text_aware=bool(attrs["text_aware"]),
            count=int(attrs["count"]),
        )


def read_fnames(path: Path) -> list[str]:
    """The indexed file names, in row order."""
    with open_index(path) as f:
        return f["fnames"].asstr()[: int(f.attrs["count"])].tolist()


def read_vectors(path: Path) -> torch.Tensor:
    """The indexed vectors ``(n, E)`` float16, in row order."""
    with open_index(path) as f:
        return torch.from_numpy(f["vectors"][: int(f.attrs["count"])])


def read_frames(path: Path, rows: list[int]) -> list[torch.Tensor]:
    """The stored frames ``(T_i, E)`` float16 of the files at ``rows`` (a text-aware index), read row by row: only
    those files' frames leave the disk."""
    with open_index(path) as f:
        offsets, frames = f["offsets"][: int(f.attrs["count"]) + 1], f["frames"]
        return [torch.from_numpy(frames[offsets[row] : offsets[row + 1]]) for row in rows]


class IndexWriter:
    """Appends batches of rows to an index file, each batch written and flushed before ``count`` takes it in; opening
    a file drops the rows an interrupted write left past ``count``."""

    def __init__(self, path: Path) -> None:
        self.file = open_index(path, "r+")
        count = int(self.file.attrs["count"])
        for name in ("vectors", "fnames"):
            self.file[name].resize(count, axis=0)
        if "offsets" in self.file:
            self.file["offsets"].resize(count + 1, axis=0)
            self.file["frames"].resize(int(self.file["offsets"][count]), axis=0)

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def append(
        self,
        fnames: list[str],
        vectors: torch.Tensor,
        frames: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> None:
        """Add ``fnames`` with their ``(b, E)`` unit vectors and, for a text-aware index, their valid frames
        ``(sum T_i, E)`` concatenated in row order with their counts ``lengths`` ``(b,)``."""
        f, count, added = self.file, int(self.file.attrs["count"]), len(fnames)
        for name, rows in (("vectors", vectors.half().numpy()), ("fnames", np.array(fnames, dtype=object))):
            f[name].resize(count + added, axis=0)
            f[name][count:] = rows
        if frames is not None:
            start = int(f["offsets"][count])
            f["frames"].resize(start + len(frames), axis=0)
            f["frames"][start:] = frames.half().numpy()
            f["offsets"].resize(count + added + 1, axis=0)
            f["offsets"][count + 1 :] = start + np.cumsum(lengths.numpy())
        f.flush()  # the rows reach the file before the count that makes them part of the index
        f.attrs["count"] = count + added
        f.flush()


def top_k(
    queries: torch.Tensor,
    vectors: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product search: ``queries`` ``(m, E)`` against ``vectors`` ``(n, E)`` (any float dtype), one float32
    matmul per chunk of ``chunk_rows`` vectors and a running top-k merge. Returns the best ``min(k, n)`` scores
    ``(m, k)`` (best first) and their rows ``(m, k)``; row ``exclude[q]`` (``-1``: none) is left out for query q by
    scoring it ``-inf``."""
    queries = queries.float()
    k = min(k, len(vectors))
    values, rows = queries.new_empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long)
    for start in range(0, len(vectors), chunk_rows):
        scores = queries @ vectors[start : start + chunk_rows].float().T  # (m, c)
        if exclude is not None:
            inside = (exclude >= start) & (exclude < start + scores.size(1))
            scores[inside.nonzero()[:, 0], exclude[inside] - start] = float("-inf")
        chunk_values, chunk_rows_found = scores.topk(min(k, scores.size(1)), dim=1)
        values = torch.cat([values, chunk_values], dim=1)
        values, pick = values.topk(min(k, values.size(1)), dim=1)
        rows = torch.cat([rows, chunk_rows_found + start], dim=1).gather(1, pick)
    return values, rows


def installed_backend() -> str:
    """The exact-search library to use: ``faiss`` or ``usearch`` when installed (both optional), else ``torch``."""
    return next((name for name in ("faiss", "usearch") if importlib.util.find_spec(name) is not None), "torch")


class ExactSearch:
    """Exact inner-product top-k over fixed vectors ``(n, E)``: ``top_k``'s chunked torch matmul, or FAISS's flat
    inner-product index or usearch's exact search (``backend``; ``auto``: one of those when installed). Either
    library gets a float32 copy of the vectors, torch one when it takes at most ``float32_mb``."""

    def __init__(
        self,
        vectors: torch.Tensor,
        backend: str = "auto",
        chunk_rows: int = CHUNK_ROWS,
        float32_mb: float = FLOAT32_CACHE_MB,
    ) -> None:
        self.backend = installed_backend() if backend == "auto" else backend
        if self.backend not in BACKENDS[1:]:
            raise InputError(f"search backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.backend != "torch" and importlib.util.find_spec(self.backend) is None:
            raise InputError(f"search backend {backend!r} is not installed (pip install {PACKAGES[backend]})")
        self.vectors, self.chunk_rows = vectors, chunk_rows
        if self.backend == "torch":
            if vectors.numel() * 4 <= float32_mb * 2**20:
                self.vectors = vectors.float()
            return
        rows = np.ascontiguousarray(vectors.float().numpy())  # (n, E) float32, what both libraries take
        if self.backend == "faiss":
            import faiss

            self.library = faiss.IndexFlatIP(vectors.size(1))  # exact: every vector scored, no training
            self.library.add(rows)
        else:
            self.library = rows

    def __len__(self) -> int:
        return len(self.vectors)

    def search(
        self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``top_k``'s answer (scores and rows ``(m, min(k, n))``, best first, ``exclude`` left out) from this
        backend."""
        if self.backend == "torch":
            return top_k(queries, self.vectors, k, exclude, self.chunk_rows)
        k = min(k, len(self))
        wanted = min(k + (exclude is not None), len(self))  # one more: the excluded row may be among the best
        found = np.ascontiguousarray(queries.float().numpy())
        if self.backend == "faiss":
            values, rows = (torch.from_numpy(a) for a in self.library.search(found, wanted))
        else:
            from usearch.index import MetricKind, search

            matches = search(self.library, found, wanted, MetricKind.IP, exact=True)
            # usearch's inner-product distance is 1 - a.b; a single query gets 1-d arrays
            rows = torch.from_numpy(matches.keys.astype(np.int64).reshape(len(found), -1))
            values = 1 - torch.from_numpy(matches.distances.astype(np.float32).reshape(len(found), -1))
        if exclude is not None:
            values = values.masked_fill(rows == exclude[:, None], float("-inf"))
        values, pick = values.topk(k, dim=1)
        return values, rows.gather(1, pick)
