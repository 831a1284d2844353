"""The tuning service under stress: early stopping, crashed trials, interrupted experiments, clusters."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT, TINY_OVERRIDES
from ray import tune

from bench.many_trials import processes
from main import run_experiment
from utils.config import validate, with_overrides

pytestmark = pytest.mark.slow


def trial_folders(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("train_trial"))


def epochs(trial: Path) -> list[int]:
    return pd.read_csv(trial / "progress.csv")["epoch"].tolist()


def test_asha_stops_weak_trials_of_a_two_parameter_search(tiny_raw, ray_session):
    raw = with_overrides(
        tiny_raw,
        {
            "param_conf.num_epochs": 4,
            "ray_conf.max_concurrent_trials": 1,  # sequential, so every later trial meets a recorded rung
            "ray_conf.scheduler": {"name": "ASHA", "grace_period": 1, "reduction_factor": 2},
            "ray_conf.search_space": {
                "optimizer.lr": {"grid": [0.01, 1e-9]},
                "criterion.temperature": {"grid": [0.05, 0.1]},
            },
        },
    )
    experiment = run_experiment(validate(raw), raw)
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 4
    stopped = table[table["epochs_run"] < 4]
    assert len(stopped) >= 1, table[
        ["param/optimizer.lr", "param/criterion.temperature", "epochs_run", "val/t2a_mAP@10"]
    ]
    assert table.iloc[0]["param/optimizer.lr"] == 0.01  # the best trial is a learning one
    assert (table.loc[table["param/optimizer.lr"] == 0.01, "epochs_run"] == 4).any()
    # results.csv tells the trials ASHA cut short from those that ran every epoch
    assert (table["status"] == table["epochs_run"].map(lambda n: "TERMINATED" if n == 4 else "STOPPED")).all()


class KillTrialOnce(tune.Callback):
    """SIGKILLs the trial process as soon as its first checkpoint is registered, like a lost node."""

    def __init__(self):
        self.killed, self.recovered = False, 0

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if not self.killed:
            self.killed = True
            os.kill(trial.last_result["pid"], signal.SIGKILL)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.recovered += 1


def test_killed_trial_resumes_from_its_checkpoint(tiny_raw, ray_session):
    raw = with_overrides(tiny_raw, {"param_conf.num_epochs": 3, "ray_conf.max_failures": 1})
    killer = KillTrialOnce()
    experiment = run_experiment(validate(raw), raw, callbacks=[killer])
    assert killer.killed and killer.recovered == 1
    (trial,) = trial_folders(experiment)
    # Restarted from the epoch-1 checkpoint: epoch 1 is not trained twice.
    assert epochs(trial) == [1, 2, 3]
    assert json.loads((experiment / "best.json").read_text())["epoch"] in (1, 2, 3)


def run_main(*args, env: dict[str, str] | None = None, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "main.py"), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def overrides(raw_dataset: Path, storage: Path, *extra: str) -> list[str]:
    return TINY_OVERRIDES + [f"data.dataset_dir={raw_dataset}", f"ray_conf.storage_path={storage}", *extra]


def test_interrupted_experiment_is_completed_by_resume(tiny_dataset, tmp_path):
    storage = tmp_path / "runs"
    args = overrides(
        tiny_dataset,
        storage,
        "param_conf.num_epochs=2",
        "ray_conf.max_concurrent_trials=1",
        # three trials one after another: two still to run when the first is seen finished, so the Ctrl-C below
        # lands mid-search even when a loaded machine notices the first one late
        "ray_conf.search_space={optimizer.lr: {grid: [0.003, 0.001, 0.0003]}}",
    )
    proc = run_main(*args)
    deadline = time.time() + 240
    first = None
    while time.time() < deadline and first is None:  # wait until one trial has finished both epochs
        time.sleep(0.5)
        for progress in storage.glob("*/train_trial_*/progress.csv"):
            if len(pd.read_csv(progress)) == 2:
                first = progress
    assert first is not None, proc.communicate(timeout=60)[0][-3000:]
    proc.send_signal(signal.SIGINT)  # Ctrl-C while the second trial runs or is about to
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "--resume" in output
    experiment = first.parent.parent
    assert not (experiment / "best.json").exists()
    finished = first.read_text()

    resumed = run_main("--resume", experiment, "ray_conf.include_dashboard=false")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert first.read_text() == finished  # the finished trial was kept, not rerun
    assert [epochs(t) for t in trial_folders(experiment)] == [[1, 2]] * 3
    assert len(pd.read_csv(experiment / "results.csv")) == 3 and (experiment / "best" / "model.safetensors").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_main_joins_a_token_authenticated_cluster_and_a_client_without_the_token_is_refused(tiny_dataset, tmp_path):
    """The README's recipe: a head started with RAY_AUTH_MODE=token and a token file, main.py joining with the same
    file; a client without it gets one line."""
    port = free_port()
    ray_cli = Path(sys.executable).parent / "ray"
    head_log = tmp_path / "head.log"
    short_tmp = tempfile.mkdtemp(prefix="ray")  # Ray's socket paths must stay under 107 bytes
    token_file = tmp_path / "ray_token"
    token_file.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    with head_log.open("w") as log_file:
        head = subprocess.Popen(
            [
                str(ray_cli),
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={short_tmp}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **auth},
        )
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in head_log.read_text():
            assert head.poll() is None and time.time() < deadline, head_log.read_text()[-3000:]
            time.sleep(0.5)
        args = ("--address", f"127.0.0.1:{port}", *overrides(tiny_dataset, tmp_path / "runs"))
        refused = run_main(*args)  # conftest's RAY_AUTH_MODE=disabled: a client that sends no token
        output = refused.communicate(timeout=300)[0]
        assert refused.returncode == 1, output[-3000:]
        assert f"error: cannot join the Ray cluster at 127.0.0.1:{port}" in output and "RAY_AUTH_TOKEN_PATH" in output
        assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/best.json"))

        proc = run_main(*args, env=auth)
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
        assert (
            "Connecting to existing Ray cluster at address: " in output and f":{port}..." in output
        )  # joined, did not start its own
        assert len(list((tmp_path / "runs").glob("*/best.json"))) == 1
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(short_tmp, ignore_errors=True)


def test_population_based_training_exploits_and_perturbs(tiny_raw, ray_session):
    raw = with_overrides(
        tiny_raw,
        {
            "param_conf.num_epochs": 3,
            "ray_conf.num_samples": 2,
            "ray_conf.num_to_keep": 3,
            "ray_conf.scheduler": {
                "name": "PBT",
                "perturbation_interval": 1,
                "quantile_fraction": 0.5,
                "resample_probability": 0.5,
                "synch": True,
                "hyperparam_mutations": {
                    "optimizer.lr": {"loguniform": [1e-4, 1e-2]},
                    "criterion.temperature": {"uniform": [0.05, 0.2]},
                },
            },
        },
    )
    experiment = run_experiment(validate(raw), raw)
    assert all(epochs(t)[-1] == 3 for t in trial_folders(experiment))
    policy = (experiment / "pbt_global.txt").read_text().strip().splitlines()
    assert policy, "PBT never copied a strong trial into a weak one"
    with pytest.raises(Exception, match="num_to_keep >= 3"):
        validate(with_overrides(raw, {"ray_conf.num_to_keep": 2}))


def test_optuna_search_runs_and_rejects_grids(tiny_raw, ray_session):
    raw = with_overrides(
        tiny_raw,
        {
            "ray_conf.search_alg": "optuna",
            "ray_conf.num_samples": 2,
            "ray_conf.search_space": {
                "optimizer.lr": {"loguniform": [1e-4, 1e-2]},
                "model.embed_dim": {"choice": [8, 16]},
            },
        },
    )
    experiment = run_experiment(validate(raw), raw)
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 2 and table["param/model.embed_dim"].isin([8, 16]).all()
    with pytest.raises(Exception, match="cannot run grid searches"):
        validate(with_overrides(raw, {"ray_conf.search_space": {"optimizer.lr": {"grid": [0.1, 0.01]}}}))


def ray_workers_of(driver: int, actor: str) -> list[int]:
    """Pids of the ``actor`` worker processes of the local Ray that process ``driver`` started: their parent is
    its raylet, whose parent is the driver. Other Ray instances on this machine (another pytest-xdist worker's)
    are left alone."""
    table = processes()
    return sorted(
        pid
        for pid, (parent, args) in table.items()
        if args[0].startswith(f"ray::{actor}".encode()) and table.get(parent, (0, []))[0] == driver
    )


def test_data_parallel_trial_with_two_workers_is_resumed_from_its_checkpoint_when_a_worker_dies(tiny_dataset, tmp_path):
    """main.py in its own process group, with its own local Ray; once the trial has saved a checkpoint, one of its
    two Ray Train worker processes gets SIGKILL (a real crash)."""
    storage = tmp_path / "runs"
    args = overrides(tiny_dataset, storage, "param_conf.num_epochs=3", "ray_conf.workers_per_trial=2")
    proc = run_main(*args, "ray_conf.cpus_per_trial=0.9", start_new_session=True)
    try:
        deadline, killed = time.time() + 240, None
        while time.time() < deadline and killed is None and proc.poll() is None:
            saved = len(list(storage.glob("*/*_data_parallel/checkpoint_*")))
            workers = ray_workers_of(proc.pid, "RayTrainWorker")
            if saved and workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed = saved
            time.sleep(0.1)
        try:
            output = proc.communicate(timeout=300)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the local Ray the driver started
    assert killed is not None and killed < 3, output[-3000:]  # a worker died mid-trial, with 1 or 2 epochs saved
    assert proc.returncode == 0, output[-5000:]
    (summary,) = storage.glob("*/best.json")
    experiment, best = summary.parent, json.loads(summary.read_text())
    assert "_data_parallel" in best["checkpoint"] and (experiment / "best" / "model.safetensors").is_file()
    (trial,) = trial_folders(experiment)
    assert epochs(trial) == [1, 2, 3]  # restarted from its checkpoint: no epoch trained or reported twice
    assert pd.read_csv(experiment / "results.csv")["status"].tolist() == ["TERMINATED"]


def test_trial_larger_than_the_cluster_is_refused(tiny_raw, ray_session):
    from utils.errors import ConfigError

    raw = with_overrides(tiny_raw, {"ray_conf.workers_per_trial": 2, "ray_conf.cpus_per_trial": 1})  # 2.01 CPUs of 2
    with pytest.raises(ConfigError, match=r"needs 2\.01 CPU"):
        run_experiment(validate(raw), raw)
    raw = with_overrides(tiny_raw, {"ray_conf.gpus_per_trial": 0.5})
    with pytest.raises(ConfigError, match="needs 0.5 GPU"):
        run_experiment(validate(raw), raw)


def test_plateau_stopper_ends_a_flat_trial(tiny_raw, ray_session):
    # std=1 is wider than any mAP change, so the trial counts as flat once it has 2 results.
    raw = with_overrides(
        tiny_raw,
        {"param_conf.num_epochs": 4, "ray_conf.plateau_stopper": {"std": 1.0, "num_results": 2, "grace_period": 2}},
    )
    experiment = run_experiment(validate(raw), raw)
    (trial,) = trial_folders(experiment)
    assert epochs(trial) == [1, 2]
    assert pd.read_csv(experiment / "results.csv")["status"].tolist() == ["STOPPED"]


def test_a_trial_whose_loss_turns_nan_fails_once_alone_with_its_reason(tiny_raw, tiny_dataset, tmp_path, ray_session):
    """max_failures retries a crash, but not a trial that would fail the same way again: it ends at once."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_dataset, poisoned)
    with h5py.File(poisoned / "development_logmel.h5", "r+") as f:
        f["logmel"][:5] = np.nan  # what preprocessing refuses to write, as if a file were corrupted later
    raw = with_overrides(
        tiny_raw,
        {
            "ray_conf.search_space": {"data.dataset_dir": {"grid": [str(tiny_dataset), str(poisoned)]}},
            "ray_conf.max_failures": 3,
        },
    )
    experiment = run_experiment(validate(raw), raw)
    table = pd.read_csv(experiment / "results.csv").set_index("param/data.dataset_dir")
    assert table.loc[str(poisoned), "status"] == "ERROR" and table.loc[str(tiny_dataset), "status"] == "TERMINATED"
    assert table.loc[str(poisoned), "error"].startswith("FloatingPointError: loss became nan after")
    (failure,) = experiment.glob("train_trial*/failure.json")
    assert json.loads(failure.read_text())["reason"] == table.loc[str(poisoned), "error"]
    assert not list(experiment.glob("train_trial*/error.txt"))  # Tune saw no error: the trial ran once, not 4 times
    assert json.loads((experiment / "best.json").read_text())["trial_params"]["data.dataset_dir"] == str(tiny_dataset)
