"""bench/many_trials.py on a 10-trial search: disk stays bounded by num_to_keep, the driver's memory is flat, and
the report's numbers match their definitions recomputed here from the files the search left."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # about a minute on 2 cores: each trial starts a Ray worker that imports torch

TRIALS, NUM_TO_KEEP = 10, 1
KIB = 1024


def test_ten_tiny_trials_keep_disk_and_driver_memory_bounded(tiny_dataset, tmp_path):
    out = tmp_path / "many_trials.json"
    command = [sys.executable, REPO_ROOT / "bench" / "many_trials.py", "--trials", TRIALS, "--workdir", tmp_path]
    command += ["--num-to-keep", NUM_TO_KEEP, "--out", out, "--dataset-dir", tiny_dataset, "param_conf.batch_size=16"]
    # a report every 2 of the epoch's 8 steps: 4 checkpoints per trial, so keeping only the best is exercised
    command += ["param_conf.val_every_steps=2"]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "| overhead per trial |" in result.stdout  # the markdown table
    report = json.loads(out.read_text())

    expected = {
        "trials", "concurrent", "num_to_keep", "experiment", "main_log", "status", "wall_s", "startup_s", "search_s",
        "summary_s", "trials_per_minute", "search_trials_per_minute", "mean_train_s", "overhead_per_trial_s",
        "slot_gap_s", "disk", "memory",
    }  # fmt: skip
    assert set(report) == expected
    assert set(report["slot_gap_s"]) == {"median", "p90", "max"}
    assert set(report["disk"]) == {
        "experiment_bytes", "bytes_per_trial", "trial_folder_bytes_mean", "trial_folder_bytes_max",
        "checkpoint_bytes_mean", "checkpoints_kept_per_trial_max", "checkpoints_written_per_trial_max",
        "experiment_state_bytes", "ray_session", "ray_session_logs_bytes",
    }  # fmt: skip
    assert set(report["memory"]) == {
        "samples",
        "rss_start_mb",
        "rss_after_10pct_mb",
        "rss_end_mb",
        "rss_peak_mb",
        "growth_mb_per_trial",
    }
    for section in (report, report["slot_gap_s"], report["disk"], report["memory"]):
        assert all(value is not None for value in section.values()), section
    assert report["status"] == {"TERMINATED": TRIALS}

    # Disk: Tune keeps the num_to_keep best checkpoints of a trial plus its newest (Ray's checkpoint manager never
    # deletes the latest one, which a retried trial restores), of the 4 each trial wrote.
    disk = report["disk"]
    assert disk["checkpoints_written_per_trial_max"] >= 3
    assert 1 <= disk["checkpoints_kept_per_trial_max"] <= NUM_TO_KEEP + 1
    # Per trial: those checkpoints (about 125 KiB each for the tiny model with Adam's state), its logs (a few KiB per
    # report) and its share of the experiment's files (experiment state, about 30 KiB per trial; best/, plot, table):
    # 100 KiB above the kept checkpoints is generous (about 60 KiB are used), keeping all four would exceed it.
    checkpoint = disk["checkpoint_bytes_mean"]
    assert 50 * KIB < checkpoint < 500 * KIB
    assert disk["bytes_per_trial"] < (NUM_TO_KEEP + 1) * checkpoint + 100 * KIB
    assert disk["trial_folder_bytes_max"] < (NUM_TO_KEEP + 1) * checkpoint + 100 * KIB
    session = disk["ray_session"]
    assert os.path.basename(session).startswith("session_") and disk["ray_session_logs_bytes"] > 0

    # Memory: flat means under 5 MB per trial (the tiny driver's RSS moves by a few MB between samples).
    memory = report["memory"]
    assert memory["samples"] >= report["wall_s"] / 0.5 / 2  # sampled about every 0.5 s
    assert abs(memory["growth_mb_per_trial"]) < 5
    assert memory["rss_start_mb"] <= memory["rss_peak_mb"] and memory["rss_end_mb"] <= memory["rss_peak_mb"]

    # The definitions, recomputed from the trials' progress.csv and a plain walk of the experiment folder.
    experiment = report["experiment"]
    trials = sorted(p for p in os.listdir(experiment) if p.startswith("train_trial_"))
    last = pd.DataFrame([pd.read_csv(os.path.join(experiment, t, "progress.csv")).iloc[-1] for t in trials])
    assert len(last) == TRIALS
    search_s = last["timestamp"].max() - (last["timestamp"] - last["time_total_s"]).min()
    overhead = search_s * 2 / TRIALS - last["time_total_s"].mean()
    assert report["search_s"] == pytest.approx(search_s) and report["overhead_per_trial_s"] == pytest.approx(overhead)
    assert report["wall_s"] == pytest.approx(report["startup_s"] + report["search_s"] + report["summary_s"])
    assert report["trials_per_minute"] == pytest.approx(60 * TRIALS / report["wall_s"])
    walked = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(experiment) for f in files)
    assert disk["experiment_bytes"] == walked and disk["bytes_per_trial"] == pytest.approx(walked / TRIALS)
    kept = [sum(c.startswith("checkpoint_") for c in os.listdir(os.path.join(experiment, t))) for t in trials]
    assert disk["checkpoints_kept_per_trial_max"] == max(kept)
