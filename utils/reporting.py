"""Experiment summaries from per-trial metric histories: a results table and a plot (no Ray here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from utils.config_files import describe
from utils.stores import atomic_path

RESULTS_TABLE = "results.csv"  # an experiment's trials, one row each, best first
SEARCH_PLOT = "search.png"  # its selection metric per epoch, one line per trial


@dataclass
class TrialHistory:
    """What one trial did: its sampled values, final status and one metrics row per epoch."""

    trial_id: str
    params: dict[str, Any]
    status: str  # TERMINATED (every epoch), STOPPED (early, by the scheduler or stopper) or ERROR
    history: pd.DataFrame  # one row per reported epoch, columns = metric names
    error: str | None = None  # a failed trial's error, one line
    checkpoint: str | None = None  # its best kept checkpoint file (a path, or a URI under cloud storage)


def as_epoch(value: float) -> int | float:
    """A reported ``epoch``: a whole number at epoch ends, a fraction for reports within an epoch."""
    value = float(value)
    return int(value) if value.is_integer() else value


def results_table(trials: list[TrialHistory], metric: str, mode: str) -> pd.DataFrame:
    """One row per trial: its parameters, status, best kept checkpoint, epochs run and all metrics at its best
    epoch, best first."""
    rows = []
    for trial in trials:
        row: dict[str, Any] = {
            "trial_id": trial.trial_id,
            "status": trial.status,
            "error": trial.error,
            "checkpoint": trial.checkpoint,
            **{f"param/{k}": describe(v) for k, v in trial.params.items()},
        }
        if metric in trial.history and trial.history[metric].notna().any():
            best = trial.history.loc[
                trial.history[metric].idxmax() if mode == "max" else trial.history[metric].idxmin()
            ]
            row["epochs_run"] = as_epoch(trial.history["epoch"].max())
            row["best_epoch"] = as_epoch(best["epoch"])
            row.update({k: best[k] for k in trial.history.columns if k.startswith(("val/", "train/"))})
        rows.append(row)
    table = pd.DataFrame(rows)
    if metric in table:
        table = table.sort_values(metric, ascending=mode == "min", na_position="last")
    return table.reset_index(drop=True)


def plot_metric(trials: list[TrialHistory], metric: str, path: Path) -> Path:
    """PNG of ``metric`` per epoch, one line per trial labelled with its parameters."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for trial in trials:
        if metric in trial.history:
            label = ", ".join(
                f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={describe(v)}"
                for k, v in trial.params.items()
            )
            ax.plot(
                trial.history["epoch"], trial.history[metric], marker="o", markersize=3, label=label or trial.trial_id
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch, {len(trials)} trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as partial_file:
        fig.savefig(partial_file, format="png")
    plt.close(fig)
    return path
