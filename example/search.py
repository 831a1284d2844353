"""Search an indexed collection of sounds (example/index.py) with text or audio: the best-matching files, with scores.

    python example/search.py --index sounds.h5 --text "a dog barks" "rain on a metal roof" --top 10
    python example/search.py --index sounds.h5 --audio query.wav --json

Text queries go through the model's text tower, audio queries through its audio tower; a query file that is in
the index is left out of its own results. The search is exact: every indexed vector is scored, in chunks (by
FAISS or usearch when one is installed). With a text-aware pooling head the files are shortlisted by their
mean-pooled vectors, and the shortlist re-ranked by the model's own pair score. The model is the one that made
the index, unless given --checkpoint, --best or --experiment; a model of another config is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_index_search_arguments, exit_on_input_error, make_parser, positive_int, setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument("--text", nargs="+", default=[], help="text queries")
    parser.add_argument("--audio", type=Path, nargs="+", default=[], help="audio files to find similar files to")
    parser.add_argument("--top", type=positive_int, default=10, help="results per query (default: 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    add_index_search_arguments(parser)
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import torch
from torch.nn.utils.rnn import pad_sequence

from utils.cli import DEFAULT_CONFIG
from utils.errors import InputError
from utils.experiments import find_model
from utils.inference import AudioEmbeddings, encode_audio_files, encode_captions, load_for_inference, score_pairs
from utils.vector_index import ExactSearch, config_hash, read_fnames, read_frames, read_info, read_vectors

Hits = list[tuple[str, float]]  # one query's results: (file name relative to the indexed folder, score), best first


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if not args.text and not args.audio:
        parser.error("give --text, --audio or both")
    setup_logging()
    with exit_on_input_error():
        search = open_search(args)
        results = [("text", q, hits) for q, hits in zip(args.text, search.text(args.text, args.top, args.shortlist))]
        results += [("audio", str(p), hits) for p, hits in zip(args.audio, search.audio(args.audio, args.top))]
        if args.json:
            records = [{"kind": kind, "query": query, "results": as_records(hits)} for kind, query, hits in results]
            print(json.dumps(records, indent=2, ensure_ascii=False))
            return
        for kind, query, hits in results:
            print(f"\nFiles for {query!r}:" if kind == "text" else f"\nFiles like {query}:")
            for rank, (name, score) in enumerate(hits, 1):
                print(f"  {rank:3d}  {score:+.3f}  {name}")


def open_search(args: argparse.Namespace) -> CollectionSearch:
    """The ``CollectionSearch`` that ``add_index_search_arguments``' options name."""
    model_path = None
    if args.checkpoint or args.best or args.experiment or args.config or args.overrides:
        config = args.config or DEFAULT_CONFIG
        model_path, _ = find_model(args.checkpoint, args.best, config, args.overrides, args.experiment)
    return CollectionSearch(args.index, model_path, args.device, args.backend)


def as_records(hits: Hits) -> list[dict[str, object]]:
    """One query's results as JSON records."""
    return [{"file": name, "score": round(score, 6)} for name, score in hits]


class CollectionSearch:
    """An index loaded with the model that made it (or ``model_path``, of the same config), answering text and audio
    queries by exact search over every indexed file."""

    def __init__(
        self, index: Path, model_path: Path | None = None, device: str | None = None, backend: str = "auto"
    ) -> None:
        self.index, self.info = Path(index), read_info(index)
        if model_path is None and not Path(self.info.model).exists():
            raise InputError(f"{index}: its model {self.info.model} is gone; give --checkpoint, --best or --experiment")
        model_path = Path(self.info.model) if model_path is None else Path(model_path)
        self.model, self.config, self.device = load_for_inference(model_path, device)
        if config_hash(self.config) != self.info.config_hash:
            raise InputError(
                f"{index}: made by another model (config hash {self.info.config_hash[:12]}, {model_path}'s "
                f"{config_hash(self.config)[:12]}): search with {self.info.model}, or rebuild the index with "
                f"example/index.py --rebuild"
            )
        if model_path.resolve() != Path(self.info.model):
            log.warning("%s was made by %s; searching with %s, of the same config", index, self.info.model, model_path)
        self.root = Path(self.info.root)
        self.fnames = read_fnames(index)
        self.rows = {name: row for row, name in enumerate(self.fnames)}
        self.vectors = ExactSearch(read_vectors(index), backend)
        log.info("%s: %d files under %s, searched by %s", index, len(self.fnames), self.root, self.vectors.backend)

    def text(self, queries: list[str], top: int = 10, shortlist: int = 100) -> list[Hits]:
        """The ``top`` files for each caption-like query. A text-aware head's clip depends on the caption: each query
        shortlists ``max(top, shortlist)`` files by their mean-pooled vectors, and those files' stored frames are
        pooled for it and scored by the model's own ``score_pairs``."""
        if not queries:
            return []
        text = encode_captions(self.model, self.config, queries, self.device).float().cpu()  # (m, E)
        if not self.model.text_aware:
            return self.hits(*self.vectors.search(text, top))
        _, rows = self.vectors.search(text, max(top, shortlist))  # (m, S)
        clips = rows.unique()  # (u,) sorted: each shortlisted file once, whichever queries shortlisted it
        stored = read_frames(self.index, clips.tolist())  # u x (T_i, E)
        audio = AudioEmbeddings(pad_sequence(stored, batch_first=True).float(), torch.tensor([len(f) for f in stored]))
        scores = score_pairs(self.model, self.device, audio, text).T  # (m, u): every query with every such file
        pair = scores.gather(1, torch.searchsorted(clips, rows))  # (m, S): each query's own shortlist
        values, pick = pair.topk(min(top, pair.size(1)), dim=1)
        return self.hits(values, rows.gather(1, pick))

    def audio(self, paths: list[Path], top: int = 10) -> list[Hits]:
        """The ``top`` files most like each audio file (by the files' vectors; for a text-aware head their mean-pooled
        ones), a query file that is in the index left out of its own results."""
        if not paths:
            return []
        vectors = encode_audio_files(self.model, self.config, paths, self.device).pooled()  # (m, E)
        exclude = torch.tensor([self.rows.get(self.member(path), -1) for path in paths])  # (m,), -1: not indexed
        return self.hits(*self.vectors.search(vectors, top, exclude))

    def member(self, path: Path) -> str | None:
        """``path``'s name in the index (relative to the indexed folder) if it is an indexed file, else None."""
        # as written first: a linked clip (keywords_to_captions.py links them) is indexed under the link's name
        for candidate in (Path(os.path.abspath(path)), Path(path).resolve()):
            name = candidate.relative_to(self.root).as_posix() if candidate.is_relative_to(self.root) else None
            if name in self.rows:
                return name
        return None

    def hits(self, values: torch.Tensor, rows: torch.Tensor) -> list[Hits]:
        """Scores and rows ``(m, k)`` -> each query's (file name, score) list; rows left out (``-inf``) dropped."""
        return [
            [(self.fnames[row], score) for row, score in zip(query_rows, query_values) if score != float("-inf")]
            for query_rows, query_values in zip(rows.tolist(), values.tolist())
        ]


if __name__ == "__main__":
    main()
