"""Cloud storage end to end, against a real S3-compatible server: moto's server mode, a separate process on
127.0.0.1 reached over HTTP through the standard AWS environment (no patching of storage in this process).

A search whose driver is killed with SIGKILL mid-search is finished by ``--resume`` from the bucket, its finished
trial kept byte for byte; then scoring, the report and retrieval run from the bucket, and what they write lands
there. A bucket or endpoint that cannot be used is one line before Ray starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest
from conftest import REPO_ROOT
from test_tune_service import free_port, overrides, run_main

from models.tiny import tiny_roberta, tiny_whisper

BUCKET = "runs"
pytestmark = pytest.mark.slow  # Ray searches through main.py


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server process and the AWS environment that points at it (plus a private cache folder)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")),  # where the scripts mirror cloud experiments
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_REGION"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    deadline = time.time() + 30
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.2)
    yield env, client
    server.terminate()
    server.wait(timeout=10)


def objects(client, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix``: key -> bytes."""
    return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys(client, prefix)}


def keys(client, prefix: str) -> list[str]:
    """The keys of the objects under ``prefix``."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def finished_trials(client, experiment_prefix: str) -> list[str]:
    """Trial folder names that the newest experiment state in the bucket records as TERMINATED and whose
    ``progress.csv`` in the bucket already holds every one of their results. (The driver uploads the experiment
    state and the trial folders file by file, so the state can name a finished trial whose rows are still on
    their way.)"""
    states = [k for k in keys(client, experiment_prefix) if "/experiment_state-" in k]
    if not states:
        return []
    state = json.loads(client.get_object(Bucket=BUCKET, Key=max(states))["Body"].read())
    names = []
    for trial_json, metadata_json in state["trial_data"]:
        trial = json.loads(trial_json)
        progress = f"{experiment_prefix}{trial['relative_logdir']}/progress.csv"
        if trial["status"] == "TERMINATED" and keys(client, progress):
            reported = json.loads(metadata_json)["last_result"]["training_iteration"]
            rows = pd.read_csv(io.BytesIO(client.get_object(Bucket=BUCKET, Key=progress)["Body"].read()))
            if len(rows) == reported:
                names.append(trial["relative_logdir"])
    return names


def script(path: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / path), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


SEARCH = (
    "ray_conf.max_concurrent_trials=1",
    "ray_conf.sync_period=1",
    # five trials one after the other: trials of the tiny models, in reused processes, take a few seconds each
    "ray_conf.search_space={optimizer.lr: {grid: [0.003, 0.002, 0.001, 0.0005, 0.0003]}}",
)


def whisper_args(dataset: Path, storage: str, tmp_path: Path) -> list[str]:
    """main.py's arguments for the Whisper-embedder recipe (a frozen transformers tower computed once into a
    store, a trainable text tower) with tiny random models, one trial."""
    models = {"whisper": tiny_whisper(tmp_path / "whisper"), "roberta": tiny_roberta(tmp_path / "roberta")}
    return [
        "--config",
        REPO_ROOT / "example" / "recipes" / "whisper_embedder.yaml",
        f"data.dataset_dir={dataset}",
        f"ray_conf.storage_path={storage}",
        f"model.audio_enc.model_id={models['whisper']}",
        f"model.text_enc.model_id={models['roberta']}",
        "model.embed_dim=32",
        "model.audio_enc.adapter.out_dim=32",
        "model.text_enc.max_length=64",  # the tiny RoBERTa's positions
        "device=cpu",
        "param_conf.num_epochs=1",
        "param_conf.batch_size=16",
        "param_conf.num_workers=0",
        "ray_conf.include_dashboard=false",
        "ray_conf.verbose=0",
        "ray_conf.gpus_per_trial=0",
        "ray_conf.cpus_per_trial=1",
        "ray_conf.scheduler={name: FIFO}",
        "ray_conf.search_space={}",
    ]


def test_search_killed_hard_is_resumed_from_the_bucket_and_scored_from_it(tiny_dataset, s3_env):
    env, client = s3_env
    storage = f"s3://{BUCKET}/default"
    # Tune snapshots its experiment state every 10 s or more ("auto"): every second here, so that the kill below
    # lands while trials are still to run
    fast_state = {**env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = run_main(*overrides(tiny_dataset, storage, *SEARCH), env=fast_state, start_new_session=True)
    try:  # (its own process group above, so that no Ray process outlives the test)
        deadline, done, prefix = time.time() + 240, [], None
        while time.time() < deadline and not done:  # until the bucket holds a finished trial, its rows included
            time.sleep(1)
            configs = [k for k in keys(client, "default/") if k.endswith("/base_config.json")]
            if configs:
                prefix = configs[0].rsplit("/", 1)[0]
                done = finished_trials(client, prefix + "/")
        assert done, proc.communicate(timeout=60)[0][-3000:]
        proc.send_signal(signal.SIGKILL)  # no clean-up: the experiment state is whatever the bucket holds now
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the local Ray the driver started
    assert proc.returncode == -signal.SIGKILL and len(done) < 5, done  # killed mid-search
    kept = objects(client, f"{prefix}/{done[0]}/")
    assert any("/checkpoint_" in k for k in kept) and any(k.endswith("progress.csv") for k in kept)
    assert f"{prefix}/best.json" not in keys(client, prefix)

    experiment = f"s3://{BUCKET}/{prefix}"
    resumed = run_main("--resume", experiment, env=env)
    try:
        output = resumed.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        resumed.kill()
        output = resumed.communicate()[0]
    assert resumed.returncode == 0, output[-5000:]
    after = objects(client, prefix + "/")
    assert {k: after.get(k) for k in kept} == kept  # the finished trial was kept byte for byte, not rerun
    progress = sorted(k for k in after if k.endswith("/progress.csv"))
    assert len(progress) == 5 and all(after[k].decode().count("\n") == 2 for k in progress)  # header + 1 epoch
    for name in ("base_config.json", "best.json", "results.csv", "search.png", "best/model.safetensors"):
        assert f"{prefix}/{name}" in after, name
    best = json.loads(after[f"{prefix}/best.json"])
    assert best["model"] == f"{experiment}/best" and best["checkpoint"].startswith(f"{experiment}/train_trial_")
    assert best["checkpoint"].removeprefix(f"s3://{BUCKET}/") in after

    # post-processing from the bucket: its outputs land beside the experiment there
    scored = script("postprocessing/xmodal_retrieval.py", "--experiment", experiment, "--report", env=env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads(objects(client, f"{prefix}/retrieval_metrics.json")[f"{prefix}/retrieval_metrics.json"])
    assert metrics["split"] == "evaluation" and 0 <= metrics["t2a"]["mAP@10"] <= 1
    assert {f"{prefix}/evaluation_scores.h5", f"{prefix}/evaluation.report.html"} <= set(keys(client, prefix))
    retrieved = script("example/retrieve.py", "--best", f"{experiment}/best.json", "--gallery", "evaluation", env=env)
    assert retrieved.returncode == 0, retrieved.stderr[-3000:]
    assert re.search(r"\.wav", retrieved.stdout)


def test_a_transformers_tower_recipe_is_stored_in_the_bucket_and_scored_from_it(tiny_dataset, s3_env, tmp_path):
    """The Whisper-embedder recipe: its export names the frozen tower by model id, which scoring from the bucket
    loads beside the downloaded weights."""
    env, client = s3_env
    run = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "main.py"),
            *map(str, whisper_args(tiny_dataset, f"s3://{BUCKET}/whisper", tmp_path)),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (best_key,) = [k for k in keys(client, "whisper/") if k.endswith("/best.json")]
    experiment = f"s3://{BUCKET}/{best_key.rsplit('/', 1)[0]}"
    best = json.loads(client.get_object(Bucket=BUCKET, Key=best_key)["Body"].read())
    assert best["model"] == f"{experiment}/best" and best["config"]["model"]["audio_enc"]["name"] == "WhisperEncoder"
    scored = script("postprocessing/xmodal_retrieval.py", "--best", f"{experiment}/best.json", env=env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics_key = best_key.replace("best.json", "retrieval_metrics.json")
    metrics = json.loads(client.get_object(Bucket=BUCKET, Key=metrics_key)["Body"].read())
    assert 0 <= metrics["t2a"]["mAP@10"] <= 1


def test_a_bucket_that_cannot_be_used_is_one_line_before_ray_starts(tiny_dataset, s3_env, tmp_path):
    env, _ = s3_env
    for storage, reason in (
        (f"s3://no-such-bucket/{tmp_path.name}", "no-such-bucket"),
        (f"s3://{BUCKET}/x?endpoint_override=elsewhere", "options in the URI are not supported"),
    ):
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "main.py"), *overrides(tiny_dataset, storage)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and reason in lines[0], result.stderr[-2000:]
        assert lines[0].startswith("error: ") and "ray_conf.storage_path" in lines[0]
    assert "no-such-bucket" not in {b["Name"] for b in s3_env[1].list_buckets()["Buckets"]}
