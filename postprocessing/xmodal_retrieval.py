"""Cross-modal retrieval metrics of a trained model, plus the DCASE submission file.

Computes mAP@10 and R@1/5/10 for text-to-audio and audio-to-text retrieval from the score
matrix of ``xmodal_scores.py`` (computed first when missing), prints a table and writes
``retrieval_metrics.json`` and ``{split}.t2a_retrieval.csv`` (caption, then the top-10 file
names) into the experiment folder. With no arguments it evaluates the latest experiment's
best model on the evaluation split.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any folder

from postprocessing.xmodal_scores import add_source_arguments, load_scores, resolve_source, scores_file, write_scores  # noqa: E402
from utils.errors import exit_on_input_error  # noqa: E402
from utils.metrics import retrieval_metrics  # noqa: E402
from utils.runtime import setup_logging  # noqa: E402
from utils.training import read_model_config  # noqa: E402

log = logging.getLogger("xmodal_retrieval")

TOP_K = 10


def format_table(metrics: dict[str, dict[str, float]], title: str) -> str:
    """A fixed-width table: one row per direction, one column per metric."""
    names = list(metrics["t2a"])
    lines = [title, f"{'direction':<10}" + "".join(f"{n:>9}" for n in names)]
    for direction, values in metrics.items():
        lines.append(f"{direction:<10}" + "".join(f"{values[n]:>9.4f}" for n in names))
    return "\n".join(lines)


def submission(scores: torch.Tensor, fnames: list[str], captions: list[str]) -> pd.DataFrame:
    """DCASE t2a submission: for each caption, the file names of its top-10 clips, best first."""
    top = torch.as_tensor(scores).T.topk(min(TOP_K, scores.shape[0]), dim=1).indices.numpy()  # (n_captions, 10)
    table = pd.DataFrame([[fnames[i] for i in row] for row in top], columns=[f"fname_{k + 1}" for k in range(top.shape[1])])
    table.insert(0, "caption", captions)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--rescore", action="store_true", help="recompute the scores even if the scores file exists")
    args = parser.parse_args()
    setup_logging()
    torch.set_grad_enabled(False)
    with exit_on_input_error():
        checkpoint, out_dir = resolve_source(args)
        split = args.split or read_model_config(checkpoint).data.eval_split
        path = scores_file(out_dir, split, args.untrained)
        if args.rescore or not path.is_file():
            args.split = split
            path = write_scores(args)
        scores, fnames, captions, caption_audio = load_scores(path)
    metrics = retrieval_metrics(scores, caption_audio)
    suffix = "_untrained" if args.untrained else ""
    title = f"{split}: {len(fnames)} clips, {len(captions)} captions ({'untrained model' if args.untrained else checkpoint})"
    print(format_table(metrics, title))
    (out_dir / f"retrieval_metrics{suffix}.json").write_text(json.dumps({"split": split, "checkpoint": str(checkpoint), "untrained": args.untrained, **metrics}, indent=2))
    submission(scores, fnames, captions).to_csv(out_dir / f"{split}.t2a_retrieval{suffix}.csv", index=False)
    log.info("wrote %s and %s", out_dir / f"retrieval_metrics{suffix}.json", out_dir / f"{split}.t2a_retrieval{suffix}.csv")


if __name__ == "__main__":
    main()
