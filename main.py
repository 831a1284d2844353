"""Launch a Ray Tune search over dual-encoder training runs.

Reads conf.yaml (or --config), applies dotted overrides such as ``param_conf.batch_size=64``,
runs one trial per point of ``ray_conf.search_space`` (times ``num_samples``), selects on the
validation metric and writes ``best.json`` into the experiment folder. Only this file talks
to Ray; the training loop itself lives in ``utils/training.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from utils.config import Config, ConfigError, load_config, validate, with_overrides
from utils.data import logmel_file, text_embeds_file
from utils.experiments import BEST_FILE
from utils.runtime import setup_logging
from utils.training import CHECKPOINT_FILE, train

log = logging.getLogger("main")

# ray_conf.search_space kinds -> Ray Tune domain constructors
TUNE_DOMAINS = {
    "choice": tune.choice,
    "grid": tune.grid_search,
    "uniform": tune.uniform,
    "loguniform": tune.loguniform,
    "randint": tune.randint,
    "quniform": tune.quniform,
}


def search_space_to_tune(search_space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """``{"optimizer.lr": {"loguniform": [1e-4, 1e-2]}}`` -> Ray Tune domains under the same flat keys."""
    space = {}
    for path, spec in search_space.items():
        (kind, args), = spec.items()
        # choice and grid take the list of values; the others take their bounds as arguments
        space[path] = TUNE_DOMAINS[kind](args) if kind in ("choice", "grid") else TUNE_DOMAINS[kind](*args)
    return space


def train_trial(trial_params: dict[str, Any], base_config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one training run with the trial's sampled values applied."""
    config = validate(with_overrides(base_config, trial_params))
    torch.set_num_threads(max(1, int(config.ray_conf.cpus_per_trial)))
    checkpoint = tune.get_checkpoint()
    resume_from = None
    if checkpoint is not None:
        resume_from = Path(checkpoint.to_directory()) / CHECKPOINT_FILE

    def report(metrics: dict[str, float], folder: Path) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    train(config, report, resume_from=resume_from)


def check_data(config: Config) -> None:
    """Fail before Ray starts when the preprocessed training or validation files are missing."""
    data = config.data
    for split in (data.train_split, data.val_split):
        for path in (logmel_file(data.dataset_dir, split), text_embeds_file(data.dataset_dir, split)):
            if not path.is_file():
                raise ConfigError(f"data.dataset_dir: {path} not found; run the preprocessing scripts first (see README)")


def run_experiment(config: Config, raw: dict[str, Any], address: str | None = None) -> Path:
    """Run the Tuner and write ``best.json``; returns the experiment folder."""
    rc = config.ray_conf
    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            context = ray.init(address=address)
        else:
            context = ray.init(include_dashboard=rc.include_dashboard, dashboard_host=rc.dashboard_host)
        if context.dashboard_url:
            log.info("Ray dashboard: http://%s", context.dashboard_url)

    name = f"{config.experiment}_{time.strftime('%Y%m%d-%H%M%S')}"
    trainable = tune.with_resources(tune.with_parameters(train_trial, base_config=raw), {"cpu": rc.cpus_per_trial, "gpu": rc.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space=search_space_to_tune(rc.search_space),
        tune_config=tune.TuneConfig(metric=rc.metric, mode=rc.mode, num_samples=rc.num_samples, max_concurrent_trials=rc.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=name,
            storage_path=rc.storage_path,
            verbose=rc.verbose,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=rc.num_to_keep, checkpoint_score_attribute=rc.metric, checkpoint_score_order=rc.mode),
        ),
    )
    results = tuner.fit()
    for result in results:
        if result.error is not None:
            log.error("trial %s failed: %s", result.path, str(result.error).strip().splitlines()[-1])
    best = results.get_best_result(rc.metric, rc.mode, scope="all")
    if not best.best_checkpoints:
        raise RuntimeError("no trial reported a checkpoint; see the errors above")
    pick = max if rc.mode == "max" else min
    checkpoint, metrics = pick(best.best_checkpoints, key=lambda kept: kept[1][rc.metric])
    experiment = Path(results.experiment_path)
    summary = {
        "trial_id": metrics["trial_id"],
        "checkpoint": str(Path(checkpoint.path) / CHECKPOINT_FILE),
        "metric": rc.metric,
        "mode": rc.mode,
        "value": float(metrics[rc.metric]),
        "epoch": int(metrics["epoch"]),
        "trial_params": dict(best.config),
        "config": validate(with_overrides(raw, best.config)).model_dump(mode="json"),
    }
    (experiment / BEST_FILE).write_text(json.dumps(summary, indent=2))
    log.info("best trial %s: %s = %.4f with %s", summary["trial_id"], rc.metric, summary["value"], summary["trial_params"])
    log.info("wrote %s", experiment / BEST_FILE)
    return experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "conf.yaml", help="experiment config (default: conf.yaml)")
    parser.add_argument("--address", default=None, help="join a running Ray cluster, e.g. 'auto' (default: start a local Ray, or use RAY_ADDRESS)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. param_conf.batch_size=64 optimizer.lr=0.0005")
    args = parser.parse_args()
    setup_logging()
    # Ray's TensorBoard logger renames every '@' metric ("R@1" -> "R_1") with one INFO line per key and epoch.
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    try:
        config, raw = load_config(args.config, args.overrides)
        check_data(config)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    run_experiment(config, raw, args.address)


if __name__ == "__main__":
    main()
