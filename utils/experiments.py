"""Finding finished experiments: the ``best.json`` that ``main.py`` writes into each experiment folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.config import load_raw, validate
from utils.stores import read_json

BEST_FILE = "best.json"


def latest_experiment_file(storage_path: str | Path, name: str) -> Path | None:
    """The most recently written ``<storage_path>/<experiment>/<name>``, or None when there is none."""
    candidates = sorted(Path(storage_path).glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def latest_best_file(storage_path: str | Path) -> Path:
    """The most recently written ``<storage_path>/<experiment>/best.json``."""
    best_file = latest_experiment_file(storage_path, BEST_FILE)
    if best_file is None:
        raise FileNotFoundError(f"no {BEST_FILE} under {storage_path}: run main.py first, or pass --best/--checkpoint")
    return best_file


def read_best(path: str | Path) -> dict[str, Any]:
    """The summary of an experiment's best trial (trial id, model export, checkpoint, metric, value, config)."""
    return read_json(path)


def find_model(checkpoint: Path | None, best_file: Path | None, config_path: Path) -> tuple[Path, Path]:
    """``(checkpoint or model export folder, the folder it belongs to)`` for the scripts that use a trained model:
    ``checkpoint`` as given, else the model that ``best_file`` names, else that of the latest experiment under the
    ``ray_conf.storage_path`` of ``config_path``. Outputs about the model go to the folder it belongs to."""
    if checkpoint is not None:
        return checkpoint, checkpoint if checkpoint.is_dir() else checkpoint.parent
    best_file = best_file or latest_best_file(validate(load_raw(config_path)).ray_conf.storage_path)
    return Path(read_best(best_file)["model"]), Path(best_file).parent
