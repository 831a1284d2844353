"""What the command-line scripts share: their parsers' common options, console logging and one-line
errors for bad input. Torch-free: scripts build and check their command line before loading torch."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from utils.config_files import is_uri, load_raw, set_path
from utils.errors import InputError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf.yaml"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which trained model a script uses (``utils.experiments.find_model``) and where it runs; without
    ``--device`` the model's own config decides."""
    parser.add_argument(
        "--best",
        type=location_arg,
        help="best.json of an experiment, a path or a URI (default: that of the newest finished run of --experiment)",
    )
    parser.add_argument(
        "--checkpoint",
        type=location_arg,
        help="a checkpoint.pt or exported model folder (a path or a URI) instead of best.json's",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="config whose ray_conf.storage_path holds the experiments (default: conf.yaml)",
    )
    parser.add_argument(
        "--experiment",
        help="an experiment name (its newest finished run), a folder name under ray_conf.storage_path or an "
        "experiment folder or URI (default: the config's experiment)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="where to run the model (default: the model config's device)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of the config that names the experiment, e.g. ray_conf.storage_path=/data/runs",
    )


def location_arg(text: str) -> str | Path:
    """An argparse type for a file or folder that may live in the cloud: a URI stays a string (``Path`` would
    collapse its ``//``), anything else becomes a ``Path``."""
    return text if is_uri(text) else Path(text)


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging for the command-line scripts."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser, its ``--help`` opening with the script's docstring as plain text (no ``markup``)."""
    return argparse.ArgumentParser(
        description=(doc or "").replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_config_arguments(parser: argparse.ArgumentParser, section: str, override_example: str) -> None:
    """What every dataset script takes: the config (whose ``section`` it reads) with dotted overrides,
    ``--dataset-dir`` (default: the config's ``data.dataset_dir``) and ``--splits`` (default: the config's
    three splits)."""
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"config with the {section} section (default: conf.yaml)"
    )
    parser.add_argument("--dataset-dir", type=Path, help="dataset folder (default: the config's data.dataset_dir)")
    parser.add_argument("--splits", nargs="+", help="splits to process (default: the config's data.*_split)")
    parser.add_argument("overrides", nargs="*", help=f"dotted config overrides, e.g. {override_example}")


def raw_config(args: argparse.Namespace) -> dict[str, Any]:
    """The raw config that ``add_config_arguments``' options name: file, overrides, then ``--dataset-dir``
    (a path from the command line, so relative to the working folder, not to the config file)."""
    raw = load_raw(args.config, args.overrides)
    if args.dataset_dir is not None:
        set_path(raw, "data.dataset_dir", str(args.dataset_dir.resolve()))
    return raw


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The model to score, the split and the output folder; ``xmodal_scores.py`` and ``xmodal_retrieval.py``."""
    add_model_arguments(parser)
    parser.add_argument("--split", help="split to score (default: the model config's data.eval_split)")
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="score a new model of the same config instead: random heads and trainable towers, pretrained "
        "weights where the config names them (the chance reference)",
    )
    parser.add_argument(
        "--out-dir", type=Path, help="output folder (default: the experiment folder, or the checkpoint's folder)"
    )


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


SEARCH_BACKENDS = ("auto", "torch", "faiss", "usearch")  # utils.vector_index.BACKENDS (a test keeps them equal)


def add_index_search_arguments(parser: argparse.ArgumentParser) -> None:
    """What searching a collection index takes (``example/search.py``, ``example/search_app.py``): the index, the
    text-aware shortlist, the vector-search backend and the model, by default the one that made the index."""
    parser.add_argument("--index", type=Path, required=True, help="index file written by example/index.py")
    parser.add_argument(
        "--shortlist",
        type=positive_int,
        default=100,
        help="text-aware heads: files shortlisted by their mean-pooled vectors, then re-ranked (default: 100)",
    )
    parser.add_argument(
        "--backend",
        choices=SEARCH_BACKENDS,
        default="auto",
        help="exact vector search by torch, faiss or usearch (default: auto, faiss or usearch when installed)",
    )
    add_model_arguments(parser)
    parser.set_defaults(config=None)  # no --best, --checkpoint, --experiment or --config: the index's model


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """For command-line scripts: bad input or a file that cannot be read or written ends the process
    with a one-line ``error: ...`` (exit status 1), Ctrl-C with ``interrupted`` (130); real bugs
    keep their traceback."""
    try:
        yield
    except (InputError, OSError) as err:  # OSError: missing, unreadable or unwritable files, full disks
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        logging.getLogger(__name__).warning("interrupted")
        sys.exit(130)
