"""What every command-line script shares: console logging and one-line errors for bad input."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from utils.errors import InputError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf.yaml"
SPLITS = ("development", "validation", "evaluation")  # Clotho's split names, the scripts' default


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which trained model a script uses (``utils.experiments.find_model``) and where it runs; without
    ``--device`` the model's own config decides."""
    parser.add_argument("--best", type=Path, help="best.json of an experiment (default: the latest experiment's)")
    parser.add_argument(
        "--checkpoint", type=Path, help="a checkpoint.pt or exported model folder instead of best.json's"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="config whose ray_conf.storage_path holds the experiments (default: conf.yaml)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="where to run the model (default: the model config's device)"
    )


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging for the command-line scripts."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def add_preprocessing_arguments(parser: argparse.ArgumentParser, section: str, override_example: str) -> None:
    """The arguments every feature script takes: dataset folder, config (whose ``section`` it reads),
    splits, ``--overwrite`` and dotted config overrides."""
    parser.add_argument("--dataset-dir", type=Path, required=True, help="dataset folder indexed by clotho_dataset.py")
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"config with the {section} section (default: conf.yaml)"
    )
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), help="splits to process")
    parser.add_argument("--overwrite", action="store_true", help="recompute splits (and parts) that are already done")
    parser.add_argument("overrides", nargs="*", help=f"config overrides, e.g. {override_example}")


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
