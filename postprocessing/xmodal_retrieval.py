"""Cross-modal retrieval metrics of a trained model, plus the DCASE submission file.

Computes mAP@10, R@1/5/10, NDCG@5/10 and the mean and median rank for text-to-audio and
audio-to-text retrieval (``a2t``: the DCASE protocol, recall over all of a clip's captions;
``a2t_any``: a hit when any of them is in the top k, as CLAP-style papers count) from the score
matrix of ``xmodal_scores.py`` (computed first when missing), prints a table and writes
``retrieval_metrics.json`` and ``{split}.t2a_retrieval.csv`` (caption, then the top-10 file
names) into the experiment folder; ``--per-query`` also writes ``{split}.t2a_ranks.csv``, each
caption's rank of its clip; ``--report`` also writes ``{split}.report.html``, one self-contained page
(metrics, the search's results, recall@k and rank figures, the best- and worst-ranked captions with their
top clips, playable). ``--relevance FILE`` adds the DCASE 2025 protocol: several relevant clips per caption
from a relevance table (``utils.relevance``; ``--relevance`` alone reads the dataset's
``{split}_relevance.csv``), mAP@16 beside mAP@10, and a top-16 submission file. With no arguments it evaluates
the best model of the newest finished run of the config's experiment on the evaluation split. Also runs as
``python -m postprocessing.xmodal_retrieval``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_scoring_arguments, exit_on_input_error, make_parser, setup_logging

REPORT_EXAMPLES = 5  # best- and worst-ranked captions the report shows by default
DATASET_TABLE = "dataset"  # --relevance without a file: the dataset's own table


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    add_scoring_arguments(parser)
    parser.add_argument("--rescore", action="store_true", help="recompute the scores even if the scores file exists")
    parser.add_argument(
        "--per-query", action="store_true", help="also write {split}.t2a_ranks.csv: each caption's rank of its clip"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="also write {split}.report.html: metrics, search results, recall@k and rank figures, and the best- "
        "and worst-ranked captions with their top clips, playable (figures also in {split}.report/)",
    )
    parser.add_argument(
        "--report-examples",
        type=int,
        default=REPORT_EXAMPLES,
        metavar="N",
        help=f"best- and worst-ranked captions the report shows (default: {REPORT_EXAMPLES})",
    )
    parser.add_argument(
        "--relevance",
        nargs="?",
        const=DATASET_TABLE,
        metavar="FILE",
        help="a relevance table (CSV: caption or cid, fname, relevance; or DCASE 2025's query, audio_filenames): "
        "also report the metrics with every clip it lists as relevant (DCASE 2025: mAP@16), and write the top "
        "16 clips per caption; alone: the dataset's {split}_relevance.csv",
    )
    parser.add_argument(
        "--relevance-threshold",
        type=float,
        metavar="T",
        help="graded tables: grades >= T are relevant (default: the model config's data.relevance_threshold, or any "
        "grade above 0); NDCG uses the grades as gains",
    )
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import numpy as np
import pandas as pd
import torch

from postprocessing.report import experiment_folder, write_report
from postprocessing.xmodal_scores import load_scores, scores_file, write_scores
from utils.checkpoints import read_model_config
from utils.config import Config
from utils.experiments import find_model
from utils.metrics import (
    DCASE2025_KS,
    DCASE2025_MAP_K,
    caption_ranks,
    relevant_per_caption,
    retrieval_metrics,
    stable_topk,
)
from utils.relevance import read_relevance, relevance_matrix
from utils.storage import publish_new_files
from utils.stores import relevance_csv, write_csv, write_json

log = logging.getLogger("xmodal_retrieval")

TOP_K = 10  # clips per caption in the submission file (DCASE 2022-2024)


def format_table(metrics: dict[str, dict[str, float]], title: str) -> str:
    """A fixed-width table: one row per direction, one column per metric (``-`` where a protocol has none)."""
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    widths = [max(9, len(n) + 2) for n in names]
    lines = [title, f"{'direction':<10}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for direction, values in metrics.items():
        cells = (f"{values[n]:>{w}.4f}" if n in values else f"{'-':>{w}}" for n, w in zip(names, widths))
        lines.append(f"{direction:<10}" + "".join(cells))
    return "\n".join(lines)


def submission(
    scores: np.ndarray | torch.Tensor, fnames: list[str], captions: list[str], top_k: int = TOP_K
) -> pd.DataFrame:
    """DCASE t2a submission: for each caption, the file names of its top ``top_k`` clips, best first (10; 16 for
    the DCASE 2025 protocol), equal scores in file order."""
    top = stable_topk(torch.as_tensor(scores).T, min(top_k, scores.shape[0])).numpy()  # (n_captions, top_k)
    table = pd.DataFrame(
        [[fnames[i] for i in row] for row in top], columns=[f"fname_{k + 1}" for k in range(top.shape[1])]
    )
    table.insert(0, "caption", captions)
    return table


def evaluate(
    model_path: Path,
    out_dir: Path,
    split: str | None = None,
    untrained: bool = False,
    rescore: bool = False,
    device: str | None = None,
    per_query: bool = False,
    *,
    report: bool = False,
    report_examples: int = REPORT_EXAMPLES,
    relevance: str | Path | None = None,
    relevance_threshold: float | None = None,
) -> dict[str, dict[str, float]]:
    """Score ``split`` (default: the model config's eval split) unless its scores file is there already,
    print the metrics table, and write ``retrieval_metrics[_untrained].json`` and the submission CSV
    (with ``per_query``, each caption's rank of its clip too; with ``report``, the HTML report showing
    ``report_examples`` best and worst captions) into ``out_dir``; returns the metrics. ``relevance``: a relevance
    table (or ``"dataset"``: the dataset's own) whose metrics are added under ``"relevance"``, mAP@16 included,
    and a submission of the top 16 clips per caption."""
    config = read_model_config(model_path) if split is None or report or relevance else None
    split = split or config.data.eval_split
    path = scores_file(out_dir, split, untrained)
    if rescore or not path.is_file():
        path = write_scores(model_path, split, out_dir, untrained, device)
    scores, fnames, captions, caption_audio = load_scores(path)
    metrics = retrieval_metrics(scores, caption_audio)
    suffix = "_untrained" if untrained else ""
    title = f"{split}: {len(fnames)} clips, {len(captions)} captions ({'untrained model' if untrained else model_path})"
    print(format_table(metrics, title))
    metrics_file, submission_file = (
        out_dir / f"retrieval_metrics{suffix}.json",
        out_dir / f"{split}.t2a_retrieval{suffix}.csv",
    )
    summary = {"split": split, "checkpoint": str(model_path), "untrained": untrained, **metrics}
    top_k = TOP_K
    if relevance is not None:
        summary["relevance"] = relevance_metrics(
            scores, fnames, captions, caption_audio, relevance, relevance_threshold, config, split
        )
        top_k = DCASE2025_MAP_K
    write_json(summary, metrics_file)
    write_csv(submission(scores, fnames, captions, top_k), submission_file)
    log.info("wrote %s and %s", metrics_file, submission_file)
    if per_query:
        ranks_file = out_dir / f"{split}.t2a_ranks{suffix}.csv"
        ranks = pd.DataFrame(
            {
                "caption": captions,
                "fname": [fnames[i] for i in caption_audio],
                "rank": caption_ranks(scores, caption_audio).numpy(),
            }
        )
        write_csv(ranks, ranks_file)
        log.info("wrote %s", ranks_file)
    if report:
        experiment = experiment_folder(model_path)
        write_report(
            out_dir,
            split,
            untrained,
            scores,
            fnames,
            captions,
            caption_audio,
            metrics,
            config.data.dataset_dir / split,  # the clips, as the dataset's {split}/ folder holds them
            str(model_path),
            experiment,
            report_examples,
        )
    return metrics


def relevance_metrics(
    scores: np.ndarray,
    fnames: list[str],
    captions: list[str],
    caption_audio: np.ndarray,
    table_file: str | Path,
    threshold: float | None,
    config: Config,
    split: str,
) -> dict[str, object]:
    """The metrics of the DCASE 2025 protocol, every clip the relevance table lists counted relevant (mAP@10 and
    mAP@16), printed as a second table; with the table's file, threshold and relevant clips per caption."""
    dataset_dir = config.data.dataset_dir
    threshold = config.data.relevance_threshold if threshold is None else threshold
    path = relevance_csv(dataset_dir, split) if table_file == DATASET_TABLE else Path(table_file)
    matrix = relevance_matrix(read_relevance(path, dataset_dir, split), fnames, captions, str(path))
    metrics = retrieval_metrics(scores, caption_audio, matrix, threshold=threshold, ks=DCASE2025_KS)
    per_caption = relevant_per_caption(caption_audio, len(fnames), matrix, threshold)
    print(
        format_table(
            metrics, f"DCASE 2025 protocol, relevance from {path}: {per_caption:.2f} relevant clips per caption"
        )
    )
    return {"file": str(path), "threshold": threshold, "relevant_per_caption": per_caption, **metrics}


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.report_examples < 1:
        parser.error("--report-examples must be at least 1")
    setup_logging()
    torch.set_grad_enabled(False)
    with exit_on_input_error():
        model_path, folder = find_model(args.checkpoint, args.best, args.config, args.overrides, args.experiment)
        out_dir = args.out_dir or folder
        with publish_new_files(out_dir):  # a cloud experiment's mirror: what this writes goes up beside it
            evaluate(
                model_path,
                out_dir,
                args.split,
                args.untrained,
                args.rescore,
                args.device,
                args.per_query,
                report=args.report,
                report_examples=args.report_examples,
                relevance=args.relevance,
                relevance_threshold=args.relevance_threshold,
            )


if __name__ == "__main__":
    main()
