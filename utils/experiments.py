"""Finding experiments: the folders ``main.py`` writes (``<storage_path>/<experiment>_<time>/``) and
the ``best.json`` each holds once its search has finished."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from utils.config import Config, load_raw, validate
from utils.stores import read_json

log = logging.getLogger(__name__)

BEST_FILE = "best.json"
FOLDER_TIME = "%Y%m%d-%H%M%S"
FOLDER_NAME = re.compile(r"^(?P<experiment>.+)_\d{8}-\d{6}$")  # <experiment>_<FOLDER_TIME>


def new_experiment_name(experiment: str) -> str:
    """The folder name of a new run of ``experiment``: ``<experiment>_<date>-<time>``."""
    return f"{experiment}_{time.strftime(FOLDER_TIME)}"


def latest_experiment_file(storage_path: str | Path, file_name: str, experiment: str) -> Path | None:
    """The most recently written ``<storage_path>/<experiment>_<time>/<file_name>``, or None when there is none."""
    candidates = [
        path
        for path in Path(storage_path).glob(f"*/{file_name}")
        if (m := FOLDER_NAME.match(path.parent.name)) and m["experiment"] == experiment
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def find_best_file(storage_path: str | Path, experiment: str) -> Path:
    """``best.json`` of ``experiment``: an experiment folder, a folder name under ``storage_path``, or an
    experiment name (its newest finished run)."""
    for folder in (Path(experiment), Path(storage_path) / experiment):
        if (folder / BEST_FILE).is_file():
            return folder / BEST_FILE
    best_file = latest_experiment_file(storage_path, BEST_FILE, experiment)
    if best_file is None:
        runs = sorted({m["experiment"] for p in Path(storage_path).glob("*/") if (m := FOLDER_NAME.match(p.name))})
        raise FileNotFoundError(
            f"no finished run of experiment {experiment!r} under {storage_path} (experiments there: "
            f"{', '.join(runs) or 'none'}); run main.py first, or give --experiment, --best or --checkpoint"
        )
    return best_file


def read_best(path: str | Path) -> dict[str, Any]:
    """The summary of an experiment's best trial (trial id, model export, checkpoint, metric, value, config)."""
    return read_json(path)


def find_model(
    checkpoint: Path | None,
    best_file: Path | None,
    config_path: Path,
    overrides: list[str] | None = None,
    experiment: str | None = None,
) -> tuple[Path, Path]:
    """``(checkpoint or model export folder, the folder it belongs to)`` for the scripts that use a trained
    model: ``checkpoint`` as given, else the model that ``best_file`` names, else the best model of
    ``experiment`` (default: the config's ``experiment``, newest run) under the config's
    ``ray_conf.storage_path``. Outputs about the model go to the folder it belongs to; the choice is logged."""
    if checkpoint is not None:
        log.info("using checkpoint %s", checkpoint)
        return checkpoint, checkpoint if checkpoint.is_dir() else checkpoint.parent
    if best_file is None:
        config = validate(load_raw(config_path, overrides, Config))
        best_file = find_best_file(config.ray_conf.storage_path, experiment or config.experiment)
    best = read_best(best_file)
    log.info(
        "using experiment %s: trial %s, %s %.4f at epoch %s, model %s",
        Path(best_file).parent,
        best["trial_id"],
        best["metric"],
        best["value"],
        best["epoch"],
        best["model"],
    )
    return Path(best["model"]), Path(best_file).parent
