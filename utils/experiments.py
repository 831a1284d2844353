"""Finding finished experiments: the ``best.json`` that ``main.py`` writes into each experiment folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEST_FILE = "best.json"


def latest_best_file(storage_path: str | Path) -> Path:
    """The most recently written ``<storage_path>/<experiment>/best.json``."""
    candidates = sorted(Path(storage_path).glob(f"*/{BEST_FILE}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no {BEST_FILE} under {storage_path}: run main.py first, or pass --best/--checkpoint")
    return candidates[-1]


def read_best(path: str | Path) -> dict[str, Any]:
    """The summary of an experiment's best trial (trial id, checkpoint file, metric, value, config)."""
    with Path(path).open() as f:
        return json.load(f)
