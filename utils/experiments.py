"""Finding experiments: the folders ``main.py`` writes (``<storage_path>/<experiment>_<time>/``, local or under a
cloud URI) and the ``best.json`` each holds once its search has finished."""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from utils.cli import location_arg
from utils.config import Config, load_raw, validate
from utils.config_files import is_uri
from utils.reporting import RESULTS_TABLE, SEARCH_PLOT
from utils.storage import download, exists, file_time, folder_names, join, mirror, parent, read_json_at

log = logging.getLogger(__name__)

BEST_FILE = "best.json"
FOLDER_TIME = "%Y%m%d-%H%M%S"
FOLDER_NAME = re.compile(r"^(?P<experiment>.+)_\d{8}-\d{6}$")  # <experiment>_<FOLDER_TIME>


def new_experiment_name(experiment: str) -> str:
    """The folder name of a new run of ``experiment``: ``<experiment>_<date>-<time>``."""
    return f"{experiment}_{time.strftime(FOLDER_TIME)}"


def latest_experiment_file(storage_path: str | Path, file_name: str, experiment: str) -> str | Path | None:
    """The most recently written ``<storage_path>/<experiment>_<time>/<file_name>`` (a path, or a URI under a cloud
    ``storage_path``), or None when there is none."""
    candidates = [join(storage_path, name, file_name) for name in run_names(storage_path, experiment)]
    timed = [(when, candidate) for candidate in candidates if (when := file_time(candidate)) is not None]
    return max(timed)[1] if timed else None


def run_names(storage_path: str | Path, experiment: str | None = None) -> list[str]:
    """The experiment folders' names under ``storage_path`` (those of ``experiment`` only, when given)."""
    if is_uri(storage_path):
        names = folder_names(str(storage_path))
    else:
        names = [path.name for path in Path(storage_path).glob("*/")]
    matches = [(name, m["experiment"]) for name in names if (m := FOLDER_NAME.match(name))]
    return sorted(name for name, of in matches if experiment is None or of == experiment)


def find_best_file(storage_path: str | Path, experiment: str) -> str | Path:
    """``best.json`` of ``experiment``: an experiment folder (or its URI), a folder name under ``storage_path``,
    or an experiment name (its newest finished run)."""
    for folder in (location_arg(experiment), join(storage_path, experiment)):
        if exists(join(folder, BEST_FILE)):
            return join(folder, BEST_FILE)
    best_file = latest_experiment_file(storage_path, BEST_FILE, experiment)
    if best_file is None:
        runs = sorted({FOLDER_NAME.match(name)["experiment"] for name in run_names(storage_path)})
        raise FileNotFoundError(
            f"no finished run of experiment {experiment!r} under {storage_path} (experiments there: "
            f"{', '.join(runs) or 'none'}); run main.py first, or give --experiment, --best or --checkpoint"
        )
    return best_file


def read_best(path: str | Path) -> dict[str, Any]:
    """The summary of an experiment's best trial (trial id, model export, checkpoint, metric, value, config)."""
    return read_json_at(path)


def find_model(
    checkpoint: str | Path | None,
    best_file: str | Path | None,
    config_path: Path,
    overrides: list[str] | None = None,
    experiment: str | None = None,
) -> tuple[Path, Path]:
    """``(checkpoint or model export folder, the folder it belongs to)`` for the scripts that use a trained
    model: ``checkpoint`` as given, else the model that ``best_file`` names, else the best model of
    ``experiment`` (default: the config's ``experiment``, newest run) under the config's
    ``ray_conf.storage_path``. Outputs about the model go to the folder it belongs to; the choice is logged.

    A model in the cloud is downloaded into the local mirror of its folder (``utils.storage.mirror``), with the
    experiment's ``best.json``, ``results.csv`` and ``search.png``; both returned paths are then local, and
    ``utils.storage.publish_new_files`` uploads what a script writes beside them."""
    if checkpoint is not None:
        log.info("using checkpoint %s", checkpoint)
        if is_uri(checkpoint):
            local = mirror(parent(checkpoint))
            return fresh_download(str(checkpoint), local / Path(checkpoint).name), local
        return Path(checkpoint), Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    if best_file is None:
        config = validate(load_raw(config_path, overrides, Config))
        best_file = find_best_file(config.ray_conf.storage_path, experiment or config.experiment)
    best = read_best(best_file)
    log.info(
        "using experiment %s: trial %s, %s %.4f at epoch %s, model %s",
        parent(best_file),
        best["trial_id"],
        best["metric"],
        best["value"],
        best["epoch"],
        best["model"],
    )
    if not is_uri(best_file):
        return Path(best["model"]), Path(best_file).parent
    folder = parent(best_file)
    local = mirror(folder)
    for name in (BEST_FILE, RESULTS_TABLE, SEARCH_PLOT):  # what the report shows beside the model
        if exists(join(folder, name)):
            fresh_download(str(join(folder, name)), local / name)
    return fresh_download(best["model"], local / Path(best["model"]).name), local


def fresh_download(uri: str, local: Path) -> Path:
    """``local`` replaced by a copy of ``uri``: no file of an earlier download is left beside the new ones."""
    if local.is_dir():
        shutil.rmtree(local)
    return download(uri, local)
