"""Launch a Ray Tune search over dual-encoder training runs.

Reads conf.yaml (or --config), applies dotted overrides such as ``param_conf.batch_size=64``,
samples ``ray_conf.search_space`` (random/grid or Optuna TPE), schedules the trials (FIFO,
ASHA or PBT, optionally a plateau stopper), retries crashed trials from their checkpoints and
selects on the validation metric. The experiment folder then holds ``best.json``, the
self-contained ``best/`` model, ``results.csv`` and ``search.png``. ``--resume`` continues an
interrupted experiment. Only this file talks to Ray; the training loop is ``utils/training.py``.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import TrialPlateauStopper

from utils.config import Config, RayConfig, load_config, validate, with_overrides
from utils.data import check_split, logmel_file, read_json, text_embeds_file
from utils.errors import ConfigError, exit_on_input_error
from utils.experiments import BEST_FILE, latest_experiment_file
from utils.reporting import TrialHistory, plot_metric, results_table
from utils.runtime import setup_logging
from utils.training import CHECKPOINT_FILE, build_model, export_model, train

log = logging.getLogger("main")

BASE_CONFIG = "base_config.json"  # the raw config of an experiment, for --resume
BEST_MODEL_DIR = "best"  # self-contained export of the best checkpoint
RESULTS_TABLE = "results.csv"
SEARCH_PLOT = "search.png"
# CPU share of a data-parallel trial's own process, which only coordinates its Ray Train workers
# (Ray refuses an empty resource request).
COORDINATOR_CPU = 0.01

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
    if config.ray_conf.workers_per_trial > 1:
        train_data_parallel(config)
        return
    torch.set_num_threads(max(1, int(config.ray_conf.cpus_per_trial)))
    checkpoint = tune.get_checkpoint()
    resume_from = None
    if checkpoint is not None:
        resume_from = Path(checkpoint.to_directory()) / CHECKPOINT_FILE

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    train(config, report, resume_from=resume_from)


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel trial; Ray Train has set up the process group."""
    config = validate(loop_config["config"])
    torch.set_num_threads(max(1, int(config.ray_conf.cpus_per_trial)))
    checkpoint = ray.train.get_checkpoint()
    resume_from = Path(checkpoint.to_directory()) / CHECKPOINT_FILE if checkpoint is not None else None

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        # Every worker must call report each epoch (it is a barrier); only rank 0 has a checkpoint.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None)

    train(config, report, resume_from=resume_from)


def train_data_parallel(config: Config) -> None:
    """Run the trial as a Ray Train ``TorchTrainer`` over ``workers_per_trial`` workers.

    Ray Train keeps this trial's checkpoints (under ``<experiment>/<trial id>_data_parallel``)
    and its callback forwards rank 0's metrics, with the checkpoint path, to Tune. A retried
    trial reuses the same run name, so Ray Train resumes it from its latest checkpoint.
    """
    rc = config.ray_conf
    context = tune.get_context()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json")},
        scaling_config=ray.train.ScalingConfig(num_workers=rc.workers_per_trial, use_gpu=rc.gpus_per_trial > 0,
                                               resources_per_worker={"CPU": rc.cpus_per_trial, "GPU": rc.gpus_per_trial}),
        run_config=ray.train.RunConfig(
            name=f"{context.get_trial_id()}_data_parallel",
            storage_path=f"{rc.storage_path.rstrip('/')}/{context.get_experiment_name()}",
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=rc.num_to_keep, checkpoint_score_attribute=rc.metric,
                                                         checkpoint_score_order=rc.mode),
        ),
    )
    trainer.fit()


def check_before_ray(config: Config, joins_cluster: bool) -> None:
    """Refuse, before Ray starts, a config whose trials could only fail or wait forever: missing or
    out-of-date preprocessed data, a model that cannot be built (e.g. a wrong pretrained weight
    file), ``device: cuda`` without GPUs for the trials, or (on this machine) a trial bigger than
    the machine. A cluster's size is checked once joined (``check_resources``)."""
    data, rc = config.data, config.ray_conf
    for split in (data.train_split, data.val_split):
        for path in (logmel_file(data.dataset_dir, split), text_embeds_file(data.dataset_dir, split)):
            if not path.is_file():
                raise ConfigError(f"data.dataset_dir: {path} not found; run the preprocessing scripts first (see README)")
        check_split(data.dataset_dir, split, config.features)
    build_model(config, torch.device("cpu"))  # a missing or mismatched pretrained weight file fails here, not in every trial
    if config.device == "cuda" and rc.gpus_per_trial == 0:
        raise ConfigError("device: 'cuda' needs ray_conf.gpus_per_trial > 0: Ray hides the GPUs from trials that reserve none "
                          "(a fraction such as 0.5 shares a GPU), or use device: auto")
    if not joins_cluster:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        check_resources(rc, {"CPU": cpus, "GPU": torch.cuda.device_count()}, "this machine")


def make_scheduler(rc: RayConfig, num_epochs: int) -> tune.schedulers.TrialScheduler:
    """FIFO, ASHA or PBT from ``ray_conf.scheduler``; the time unit is the epoch (one report each)."""
    sched = rc.scheduler
    if sched.name == "ASHA":
        return ASHAScheduler(time_attr="training_iteration", max_t=num_epochs, grace_period=sched.grace_period,
                             reduction_factor=sched.reduction_factor, brackets=sched.brackets)
    if sched.name == "PBT":
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=sched.perturbation_interval, burn_in_period=sched.burn_in_period,
            quantile_fraction=sched.quantile_fraction, resample_probability=sched.resample_probability, synch=sched.synch,
            hyperparam_mutations=search_space_to_tune(sched.hyperparam_mutations))
    return FIFOScheduler()


def make_trainable(raw: dict[str, Any], rc: RayConfig) -> Any:
    """The trial function with the base config attached and the per-trial resources.

    A data-parallel trial only coordinates: its Ray Train workers ask for the CPUs and GPUs.
    """
    resources = {"cpu": COORDINATOR_CPU, "gpu": 0} if rc.workers_per_trial > 1 else {"cpu": rc.cpus_per_trial, "gpu": rc.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(train_trial, base_config=raw), resources)


def init_ray(rc: RayConfig, address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray with the dashboard on ``dashboard_host``."""
    if ray.is_initialized():
        return
    if joins_cluster(address):
        context = ray.init(address=address)
    else:
        if rc.include_dashboard and not is_loopback(rc.dashboard_host):
            log.warning("the Ray dashboard and job API listen on %s without authentication: anyone who reaches that "
                        "address can run code here. Prefer 127.0.0.1 and an SSH tunnel (README, 'Running on a cluster')", rc.dashboard_host)
        context = ray.init(include_dashboard=rc.include_dashboard, dashboard_host=rc.dashboard_host)
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (``127.0.0.1``, ``::1``, ``localhost``)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def joins_cluster(address: str | None) -> bool:
    """Whether ``main.py`` joins a running cluster (``--address`` or ``RAY_ADDRESS``) rather than starting Ray here."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def check_resources(rc: RayConfig, have: dict[str, float], where: str = "the Ray cluster") -> None:
    """Refuse a trial that needs more CPUs or GPUs than ``have`` (all of ``where``): it would wait forever."""
    workers = rc.workers_per_trial
    need = {"CPU": workers * rc.cpus_per_trial + (COORDINATOR_CPU if workers > 1 else 0), "GPU": workers * rc.gpus_per_trial}
    for kind, amount in need.items():
        if amount > have.get(kind, 0) + 1e-9:
            raise ConfigError(f"ray_conf: one trial needs {amount:g} {kind} ({workers} worker(s) x cpus/gpus_per_trial"
                              f"{f' + {COORDINATOR_CPU} for the coordinator' if workers > 1 and kind == 'CPU' else ''}) but {where} has {have.get(kind, 0):g}")


def run_experiment(config: Config, raw: dict[str, Any], address: str | None = None, callbacks: list[tune.Callback] | None = None) -> Path:
    """Run a new Tuner, then write the experiment summary; returns the experiment folder.

    The raw config is saved as ``base_config.json`` in the experiment folder first, so that
    ``--resume`` rebuilds exactly the same trials whatever ``conf.yaml`` says by then.
    """
    rc = config.ray_conf
    init_ray(rc, address)
    check_resources(rc, ray.cluster_resources())
    name = f"{config.experiment}_{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = Path(rc.storage_path) / name
    if is_local(rc.storage_path):
        experiment.mkdir(parents=True)
        (experiment / BASE_CONFIG).write_text(json.dumps(raw, indent=2))
    param_space = search_space_to_tune(rc.search_space)
    if rc.scheduler.name == "PBT":  # every mutated value needs a starting value
        for path, domain in search_space_to_tune(rc.scheduler.hyperparam_mutations).items():
            param_space.setdefault(path, domain)
    tuner = tune.Tuner(
        make_trainable(raw, rc),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=rc.metric, mode=rc.mode, num_samples=rc.num_samples, max_concurrent_trials=rc.max_concurrent_trials,
            search_alg=OptunaSearch(seed=config.seed) if rc.search_alg == "optuna" else None,
            scheduler=make_scheduler(rc, config.param_conf.num_epochs),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=rc.storage_path,
            verbose=rc.verbose,
            callbacks=callbacks,
            stop=TrialPlateauStopper(metric=rc.metric, mode=rc.mode, std=rc.plateau_stopper.std, num_results=rc.plateau_stopper.num_results,
                                     grace_period=rc.plateau_stopper.grace_period) if rc.plateau_stopper else None,
            failure_config=tune.FailureConfig(max_failures=rc.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=rc.num_to_keep, checkpoint_score_attribute=rc.metric, checkpoint_score_order=rc.mode),
        ),
    )
    return summarise(tuner.fit(), raw, rc)


def resume_experiment(path: Path | None, storage_path: str, address: str | None = None) -> Path:
    """Continue an interrupted experiment: finished trials are kept, unfinished and errored ones
    continue from their latest checkpoints. ``path`` defaults to the newest experiment."""
    if path is None:
        base_config = latest_experiment_file(storage_path, BASE_CONFIG)
        if base_config is None:
            raise ConfigError(f"no experiment to resume under {storage_path}")
        path = base_config.parent
    path = Path(path).resolve()
    if not (path / BASE_CONFIG).is_file() or not tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"{path} is not a resumable experiment folder of main.py")
    raw = read_json(path / BASE_CONFIG)
    rc = validate(raw).ray_conf
    init_ray(rc, address)
    log.info("resuming %s", path)
    tuner = tune.Tuner.restore(str(path), make_trainable(raw, rc), resume_unfinished=True, resume_errored=True)
    return summarise(tuner.fit(), raw, rc)


def trial_histories(results: tune.ResultGrid) -> list[TrialHistory]:
    """Per-trial parameters, status and per-epoch metrics, with a line logged for each failed trial."""
    trials = []
    for result in results:
        if result.error is not None:
            log.error("trial %s failed: %s", result.path, str(result.error).strip().splitlines()[-1])
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        status = "ERROR" if result.error is not None else "TERMINATED"
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        trials.append(TrialHistory(trial_id, dict(result.config or {}), status, history))
    return trials


def best_checkpoint(result: tune.Result, rc: RayConfig) -> tuple[tune.Checkpoint, dict[str, Any]]:
    """The trial's kept checkpoint with the best selection metric, and the metrics it was saved with.

    Tune keeps the checkpoints of ordinary trials; a data-parallel trial's checkpoints are
    kept by Ray Train, and Tune only sees their paths in the ``checkpoint_path`` metric.
    """
    pick = max if rc.mode == "max" else min
    if result.best_checkpoints:
        return pick(result.best_checkpoints, key=lambda kept: kept[1][rc.metric])
    history = result.metrics_dataframe
    if history is not None and CHECKPOINT_PATH_KEY in history:
        kept = history[history[CHECKPOINT_PATH_KEY].map(lambda p: isinstance(p, str) and Path(p, CHECKPOINT_FILE).is_file())]
        if len(kept):
            row = kept.loc[kept[rc.metric].idxmax() if rc.mode == "max" else kept[rc.metric].idxmin()]
            return tune.Checkpoint(row[CHECKPOINT_PATH_KEY]), row.to_dict()
    raise RuntimeError("no trial kept a checkpoint; see the errors above")


class ExperimentInterrupted(RuntimeError):
    """Tuning stopped (Ctrl-C, lost driver) before every trial finished."""


def summarise(results: tune.ResultGrid, raw: dict[str, Any], rc: RayConfig) -> Path:
    """Write ``best.json``, the ``best/`` model export, ``results.csv`` and ``search.png``."""
    # After Ctrl-C, Tune marks the trials it cut short as terminated in memory; the experiment
    # state it saved on the way out still says which ones were pending or running.
    saved = tune.ExperimentAnalysis(results.experiment_path).trials
    unfinished = sum(trial.status not in ("TERMINATED", "ERROR") for trial in saved)
    if unfinished:
        raise ExperimentInterrupted(f"{unfinished} of {len(results)} trials did not finish; continue with: python main.py --resume {results.experiment_path}")
    trials = trial_histories(results)
    best = results.get_best_result(rc.metric, rc.mode, scope="all")
    checkpoint, metrics = best_checkpoint(best, rc)
    experiment = Path(results.experiment_path) if is_local(rc.storage_path) else Path.home() / "ray_results" / Path(results.experiment_path).name
    experiment.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:  # downloads it first when storage is remote
        model = export_model(Path(folder) / CHECKPOINT_FILE, experiment / BEST_MODEL_DIR)
    summary = {
        "trial_id": metrics["trial_id"],
        "model": str(model),
        "checkpoint": str(Path(checkpoint.path) / CHECKPOINT_FILE),
        "metric": rc.metric,
        "mode": rc.mode,
        "value": float(metrics[rc.metric]),
        "epoch": int(metrics["epoch"]),
        "trial_params": dict(best.config),
        "config": validate(with_overrides(raw, best.config)).model_dump(mode="json"),
    }
    (experiment / BEST_FILE).write_text(json.dumps(summary, indent=2))
    results_table(trials, rc.metric, rc.mode).to_csv(experiment / RESULTS_TABLE, index=False)
    plot_metric(trials, rc.metric, experiment / SEARCH_PLOT)
    log.info("best trial %s: %s = %.4f at epoch %d with %s", summary["trial_id"], rc.metric, summary["value"], summary["epoch"], summary["trial_params"])
    log.info("wrote %s, %s/, %s and %s in %s", BEST_FILE, BEST_MODEL_DIR, RESULTS_TABLE, SEARCH_PLOT, experiment)
    return experiment


def is_local(storage_path: str) -> bool:
    return "://" not in storage_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "conf.yaml", help="experiment config (default: conf.yaml)")
    parser.add_argument("--address", default=None, help="join a running Ray cluster, e.g. 'auto' (default: start a local Ray, or use RAY_ADDRESS)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="EXPERIMENT_DIR",
                        help="continue an interrupted experiment (default: the newest under ray_conf.storage_path); it keeps its own saved config")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. param_conf.batch_size=64 optimizer.lr=0.0005")
    args = parser.parse_args()
    setup_logging()
    # Ray's TensorBoard logger renames every '@' metric ("R@1" -> "R_1") with one INFO line per key and epoch.
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    with exit_on_input_error():
        config, raw = load_config(args.config, args.overrides)
        try:
            if args.resume:
                resume_experiment(None if args.resume == "latest" else Path(args.resume), config.ray_conf.storage_path, args.address)
            else:
                check_before_ray(config, joins_cluster(args.address))
                run_experiment(config, raw, args.address)
        except ExperimentInterrupted as err:
            log.warning("%s", err)
            sys.exit(130)


if __name__ == "__main__":
    main()
