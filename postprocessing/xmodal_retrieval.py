"""Cross-modal retrieval metrics of a trained model, plus the DCASE submission file.

Computes mAP@10, R@1/5/10, NDCG@5/10 and the mean and median rank for text-to-audio and
audio-to-text retrieval (``a2t``: the DCASE protocol, recall over all of a clip's captions;
``a2t_any``: a hit when any of them is in the top k, as CLAP-style papers count) from the score
matrix of ``xmodal_scores.py`` (computed first when missing), prints a table and writes
``retrieval_metrics.json`` and ``{split}.t2a_retrieval.csv`` (caption, then the top-10 file
names) into the experiment folder; ``--per-query`` also writes ``{split}.t2a_ranks.csv``, each
caption's rank of its clip; ``--report`` also writes ``{split}.report.html``, one self-contained page
(metrics, the search's results, recall@k and rank figures, the best- and worst-ranked captions with their
top clips, playable). With no arguments it evaluates the best model of the newest
finished run of the config's experiment on the evaluation split. Also runs as
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
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import numpy as np
import pandas as pd
import torch

from postprocessing.report import experiment_folder, write_report
from postprocessing.xmodal_scores import load_scores, scores_file, write_scores
from utils.checkpoints import read_model_config
from utils.experiments import find_model
from utils.metrics import caption_ranks, retrieval_metrics
from utils.storage import publish_new_files
from utils.stores import write_csv, write_json

log = logging.getLogger("xmodal_retrieval")

TOP_K = 10


def format_table(metrics: dict[str, dict[str, float]], title: str) -> str:
    """A fixed-width table: one row per direction, one column per metric (``-`` where a protocol has none)."""
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    widths = [max(9, len(n) + 2) for n in names]
    lines = [title, f"{'direction':<10}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for direction, values in metrics.items():
        cells = (f"{values[n]:>{w}.4f}" if n in values else f"{'-':>{w}}" for n, w in zip(names, widths))
        lines.append(f"{direction:<10}" + "".join(cells))
    return "\n".join(lines)


def submission(scores: np.ndarray | torch.Tensor, fnames: list[str], captions: list[str]) -> pd.DataFrame:
    """DCASE t2a submission: for each caption, the file names of its top-10 clips, best first."""
    top = torch.as_tensor(scores).T.topk(min(TOP_K, scores.shape[0]), dim=1).indices.numpy()  # (n_captions, 10)
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
) -> dict[str, dict[str, float]]:
    """Score ``split`` (default: the model config's eval split) unless its scores file is there already,
    print the metrics table, and write ``retrieval_metrics[_untrained].json`` and the submission CSV
    (with ``per_query``, each caption's rank of its clip too; with ``report``, the HTML report showing
    ``report_examples`` best and worst captions) into ``out_dir``; returns the metrics."""
    config = read_model_config(model_path) if split is None or report else None
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
    write_json(summary, metrics_file)
    write_csv(submission(scores, fnames, captions), submission_file)
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
            )


if __name__ == "__main__":
    main()
