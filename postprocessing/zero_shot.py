"""Zero-shot classification of a folder of audio with a trained model: class names become prompts, no training.

    python postprocessing/zero_shot.py --audio-dir sounds --labels sounds/labels.csv --template "the sound of {label}"

``--labels`` is a CSV with the columns ``fname,label``: ``fname`` relative to ``--audio-dir`` (nested folders
allowed), ``label`` one class or several separated by ``;`` (rows naming the same file add up). Audio files in
the folder that the CSV does not list are ignored (their count is logged). The model is the newest finished
run's best (or ``--best``, ``--checkpoint``); its files are read and featurised as in training (the model's
sample rate, features and evaluation crops). Writes ``zero_shot.json`` and ``zero_shot_confusion.png`` into
``--output-dir`` (default: the model's experiment folder). Also runs as ``python -m postprocessing.zero_shot``.

Definitions:

- prompt: a template with ``{label}`` replaced by the class name, underscores read as spaces (``Dog_bark`` ->
  "the sound of Dog bark"); outputs name the class as written in the CSV.
- class embedding (CLIP's prompt ensembling): each template's prompt embedded by the text tower, L2-normalised,
  averaged over the templates and normalised again (per position for a sequence tower).
- scores ``(n_files, n_classes)``: the model's pair scores of each file and each class embedding (through a
  text-aware pooling head where the model has one); a file's classes ranked by score, ties to the first class.
- ``accuracy``: the share of files whose top class is one of their labels; ``top5_accuracy``: whose top 5
  hold one; ``per_class_recall[c]``: the share of the files labelled c whose top class is c.
- ``mAP`` (only when some file has several labels): the mean over classes of the average precision of the
  files ranked by that class's score (ties in file order): the sum of the precision at each rank that holds a
  file labelled c, over their number (sklearn's ``average_precision_score`` where no scores tie).
- confusion matrix: true classes (rows) x top classes (columns); a file counts once per label it carries.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import add_model_arguments, exit_on_input_error, make_parser, setup_logging

DEFAULT_TEMPLATE = "the sound of {label}"


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument("--audio-dir", type=Path, required=True, help="folder of the audio files to classify")
    parser.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="CSV of fname,label (fname relative to --audio-dir, labels ;-separated)",
    )
    parser.add_argument(
        "--template",
        nargs="+",
        default=[DEFAULT_TEMPLATE],
        help=f"prompt templates holding {{label}}; several are averaged (default: {DEFAULT_TEMPLATE!r})",
    )
    parser.add_argument("--output-dir", type=Path, help="where the outputs go (default: the model's experiment folder)")
    add_model_arguments(parser)
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.dual_encoder import DualEncoderModel
from utils.config import Config
from utils.errors import DatasetError, InputError
from utils.experiments import find_model
from utils.inference import AudioEmbeddings, encode_audio_files, encode_captions, load_for_inference, score_pairs
from utils.storage import publish_new_files
from utils.stores import atomic_path, read_csv

log = logging.getLogger("zero_shot")

LABEL_COLUMNS = ("fname", "label")
RESULTS_FILE, CONFUSION_FILE = "zero_shot.json", "zero_shot_confusion.png"
FILE_CHUNK = 128  # files per encode_audio_files call: one progress-bar step
TOP_K = 5
NAMED_CLASSES, NAME_CHARS = 60, 40  # the most classes, and the longest name, that the plot's axes spell out
COUNTED_CLASSES = 20  # the most classes whose matrix cells also print their counts


def read_labels(labels_csv: Path, audio_dir: Path) -> tuple[list[Path], list[str], torch.Tensor]:
    """The labelled files (in the CSV's order), the classes (sorted) and their ``(n_files, n_classes)`` bool
    label matrix; a listed file missing from ``audio_dir`` is a ``DatasetError`` naming the first few."""
    if not audio_dir.is_dir():
        raise InputError(f"--audio-dir: {audio_dir} is not a folder")
    table = read_csv(labels_csv, LABEL_COLUMNS, dtype=str)
    labels: dict[str, set[str]] = {}  # file name (as a POSIX path under audio_dir) -> its classes
    for line, (fname, cell) in enumerate(zip(table["fname"], table["label"]), start=2):  # line 1: the header
        name = Path(fname)
        if not fname or name.is_absolute() or ".." in name.parts:
            raise DatasetError(f"{labels_csv} line {line}: {fname!r} must be a file name relative to {audio_dir}")
        classes = {label.strip() for label in cell.split(";")} - {""}
        if not classes:
            raise DatasetError(f"{labels_csv} line {line}: no label for {fname!r}")
        labels.setdefault(name.as_posix(), set()).update(classes)
    if not labels:
        raise DatasetError(f"{labels_csv}: no labelled file")
    missing = [name for name in labels if not (audio_dir / name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(f"{labels_csv}: {len(missing)} listed file(s) not in {audio_dir}: {shown}")
    formats = sf.available_formats()  # the audio soundfile reads, by extension
    audio = {
        p.relative_to(audio_dir).as_posix()
        for p in audio_dir.rglob("*")
        if p.suffix[1:].upper() in formats and p.is_file()
    }
    if unlabelled := len(audio - labels.keys()):
        log.info("%d audio file(s) in %s have no label in %s: ignored", unlabelled, audio_dir, labels_csv)
    classes = sorted(set().union(*labels.values()))
    column = {c: j for j, c in enumerate(classes)}
    rows, cols = zip(*[(i, column[c]) for i, names in enumerate(labels.values()) for c in names])
    targets = torch.zeros(len(labels), len(classes), dtype=torch.bool)
    targets[list(rows), list(cols)] = True
    return [audio_dir / name for name in labels], classes, targets


def class_prompts(classes: list[str], templates: list[str]) -> list[str]:
    """Every class's prompt from every template, class by class: ``len(classes) * len(templates)`` prompts."""
    for template in templates:
        if "{label}" not in template:
            raise InputError(f"--template {template!r} has no {{label}} to put the class name in")
    return [template.replace("{label}", c.replace("_", " ")) for c in classes for template in templates]


def ensemble_prompts(prompt_embeds: torch.Tensor, n_templates: int) -> torch.Tensor:
    """``class_prompts``' embeddings ``(n_classes * n_templates, [L,] E)`` -> class embeddings ``(n_classes, [L,] E)``:
    each prompt normalised, the mean over a class's templates normalised again."""
    per_class = prompt_embeds.reshape(-1, n_templates, *prompt_embeds.shape[1:])  # (n_classes, n_templates, [L,] E)
    return F.normalize(F.normalize(per_class, dim=-1).mean(1), dim=-1)


@torch.no_grad()
def zero_shot_scores(
    model: DualEncoderModel, config: Config, paths: list[Path], class_embeds: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Pair scores ``(n_files, n_classes)`` of the audio files (featurised as in training) and the class
    embeddings ``(n_classes, [L,] E)``."""
    audio = []
    with tqdm(total=len(paths), desc="embedding audio", unit="file", disable=len(paths) <= FILE_CHUNK) as bar:
        for start in range(0, len(paths), FILE_CHUNK):
            audio.append(encode_audio_files(model, config, paths[start : start + FILE_CHUNK], device))
            bar.update(len(audio[-1]))
    return score_pairs(model, device, AudioEmbeddings.cat(audio), class_embeds)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Each file's classes by descending score, ties to the lower index: ``(n_files, n_classes)`` indices."""
    return scores.argsort(dim=1, descending=True, stable=True)


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per class ``(n_classes,)``: the average precision of the files ranked by that class's score ``(n_files,
    n_classes)`` (ties in file order) against the bool ``targets``; every class labels at least one file."""
    order = scores.argsort(dim=0, descending=True, stable=True)  # (n_files, n_classes): files, best first
    relevant = targets.gather(0, order).float()  # (n_files, n_classes): rank r of class c holds a file labelled c
    precision = relevant.cumsum(0) / torch.arange(1, len(scores) + 1)[:, None]  # precision at each rank
    return (precision * relevant).sum(0) / relevant.sum(0)


def confusion_matrix(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Counts ``(n_classes, n_classes)``: true class (row, once per label of a file) x its file's top class."""
    top = F.one_hot(ranking(scores)[:, 0], scores.shape[1])  # (n_files, n_classes)
    return targets.T.long() @ top


def zero_shot_metrics(scores: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """``accuracy``, ``top5_accuracy``, ``per_class_recall`` (by class name), ``n_files``, ``n_classes`` and,
    when some file has several labels, ``mAP``, of ``scores`` ``(n_files, n_classes)`` against the bool label
    matrix ``targets`` of the same shape (see the module docstring)."""
    order = ranking(scores)
    top1 = order[:, :1]  # (n_files, 1)
    is_top1 = top1 == torch.arange(len(classes))  # (n_files, n_classes)
    recall = (targets & is_top1).sum(0) / targets.sum(0)
    metrics = {
        "accuracy": targets.gather(1, top1).float().mean().item(),
        "top5_accuracy": targets.gather(1, order[:, :TOP_K]).any(1).float().mean().item(),
        "per_class_recall": dict(zip(classes, recall.tolist())),
        "n_files": len(scores),
        "n_classes": len(classes),
    }
    if (targets.sum(1) > 1).any():
        metrics["mAP"] = average_precision(scores, targets).mean().item()
    return metrics


def plot_confusion(matrix: torch.Tensor, classes: list[str], title: str, path: Path) -> Path:
    """PNG of the confusion ``matrix``, class names on the axes when they fit (else indices), written under a
    temporary name and renamed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt

    n = len(classes)
    side = min(20.0, 4.0 + 0.25 * n)  # inches: a quarter inch a class, up to 20
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="files")
    if n <= NAMED_CLASSES and max(map(len, classes)) <= NAME_CHARS:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    if n <= COUNTED_CLASSES:
        half = matrix.max().item() / 2
        for (row, col), count in zip(matrix.nonzero().tolist(), matrix[matrix > 0].tolist()):
            ax.text(col, row, count, ha="center", va="center", fontsize=7, color="white" if count > half else "black")
    ax.set_xlabel("predicted (top class)")
    ax.set_ylabel("true label")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as partial_file:
        fig.savefig(partial_file, format="png")
    plt.close(fig)
    return path


def format_summary(metrics: dict[str, Any], title: str) -> str:
    """The printed table: accuracy, top-5 accuracy, mAP (``-`` for single labels), file and class counts."""
    rows = [(name, f"{metrics[name]:.4f}") for name in ("accuracy", "top5_accuracy")]
    rows += [("mAP", f"{metrics['mAP']:.4f}" if "mAP" in metrics else "-")]
    rows += [(name, str(metrics[name])) for name in ("n_files", "n_classes")]
    return "\n".join([title] + [f"  {name:<14}{value:>8}" for name, value in rows])


@torch.no_grad()
def classify(
    model_path: Path,
    audio_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    templates: list[str] | None = None,
    device: str | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Classify the labelled files of ``audio_dir`` by prompts from ``templates`` (default: ``DEFAULT_TEMPLATE``)
    with the model at ``model_path`` on ``device`` (default: its config's), print the summary and write
    ``zero_shot.json`` and the confusion PNG into ``out_dir``; returns the summary and the scores
    ``(n_files, n_classes)``."""
    templates = templates or [DEFAULT_TEMPLATE]
    paths, classes, targets = read_labels(labels_csv, audio_dir)
    prompts = class_prompts(classes, templates)  # bad templates fail before the model loads
    model, config, target = load_for_inference(model_path, device)  # with its frozen backbones
    class_embeds = ensemble_prompts(encode_captions(model, config, prompts, target), len(templates))
    scores = zero_shot_scores(model, config, paths, class_embeds, target)
    metrics = zero_shot_metrics(scores, targets, classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, figure = out_dir / RESULTS_FILE, out_dir / CONFUSION_FILE
    title = f"zero-shot: {len(paths)} files of {audio_dir}, {len(classes)} classes ({model_path})"
    plot_confusion(
        confusion_matrix(scores, targets), classes, f"{len(paths)} files, accuracy {metrics['accuracy']:.3f}", figure
    )
    summary = {**metrics, "checkpoint": str(model_path), "templates": templates, "confusion_matrix": figure.name}
    with atomic_path(results) as partial_file:
        partial_file.write_text(json.dumps(summary, indent=2))
    print(format_summary(metrics, title))
    print(f"wrote {results}")
    return summary, scores


def main() -> None:
    args = build_parser().parse_args()
    setup_logging()
    with exit_on_input_error():
        model_path, folder = find_model(args.checkpoint, args.best, args.config, args.overrides, args.experiment)
        out_dir = args.output_dir or folder
        with publish_new_files(out_dir):  # a cloud experiment's mirror: what this writes goes up beside it
            classify(model_path, args.audio_dir, args.labels, out_dir, args.template, args.device)


if __name__ == "__main__":
    main()
