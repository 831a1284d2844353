"""A real Ray Tune run of two tiny trials, then postprocessing of its best checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT

from example.retrieve import retrieve
from main import make_trackers, run_experiment
from postprocessing.xmodal_retrieval import evaluate
from utils.config import validate, with_overrides


@pytest.mark.slow
def test_two_trial_search_writes_best_json_and_is_scored(tiny_raw, tiny_dataset, ray_session, tmp_path, capsys):
    raw = with_overrides(
        tiny_raw,
        {
            "param_conf.num_epochs": 2,
            "ray_conf.num_to_keep": 1,
            "ray_conf.search_space": {"optimizer.lr": {"grid": [0.003, 0.0001]}},
            "ray_conf.mlflow": {"tags": {"team": "audio"}},  # the default: a local file store beside the runs
        },
    )
    experiment = run_experiment(validate(raw), raw)
    assert "To visualize your results with TensorBoard" not in capsys.readouterr().out  # Tune's hint names no events

    best = json.loads((experiment / "best.json").read_text())
    assert best["metric"] == "val/t2a_mAP@10" and best["trial_params"]["optimizer.lr"] in (0.003, 0.0001)
    assert best["config"]["optimizer"]["lr"] == best["trial_params"]["optimizer.lr"]
    assert (experiment / "best" / "model.safetensors").is_file() and best["model"] == str(experiment / "best")
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 2 and table["val/t2a_mAP@10"].iloc[0] == pytest.approx(best["value"])
    assert (experiment / "search.png").read_bytes()[:4] == b"\x89PNG"
    trials = sorted(p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("train_trial"))
    assert len(trials) == 2
    for trial in trials:  # num_to_keep=1: only the best epoch's checkpoint survives
        assert len(list(trial.glob("checkpoint_*"))) == 1
        assert len(list(trial.glob("events.out.tfevents.*"))) == 1 and (trial / "result.json").is_file()
        progress = pd.read_csv(trial / "progress.csv")
        assert progress["epoch"].tolist() == [1, 2]
    trial_progress = pd.concat(pd.read_csv(t / "progress.csv") for t in trials)
    assert best["value"] == pytest.approx(trial_progress["val/t2a_mAP@10"].max())
    check_mlflow_runs(tmp_path / "runs" / "mlruns", raw, trial_progress)

    run = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "postprocessing" / "xmodal_retrieval.py"),
            "--best",
            str(experiment / "best.json"),
            "--device",
            "cpu",
            "--per-query",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "t2a" in run.stdout and "mAP@10" in run.stdout and "a2t_any" in run.stdout and "NDCG@10" in run.stdout
    metrics = json.loads((experiment / "retrieval_metrics.json").read_text())
    assert metrics["split"] == "evaluation" and 0 <= metrics["t2a"]["mAP@10"] <= 1
    submission = pd.read_csv(experiment / "evaluation.t2a_retrieval.csv")
    assert list(submission.columns) == ["caption"] + [f"fname_{k}" for k in range(1, 11)]
    assert len(submission) == 60  # 12 evaluation clips x 5 captions
    ranks = pd.read_csv(experiment / "evaluation.t2a_ranks.csv")  # --per-query: each caption's rank of its clip
    assert (
        list(ranks.columns) == ["caption", "fname", "rank"] and len(ranks) == 60 and ranks["rank"].between(1, 12).all()
    )
    assert ranks["rank"].mean() == pytest.approx(metrics["t2a"]["mean_rank"])
    assert (ranks["rank"] == 1).mean() == pytest.approx(metrics["t2a"]["R@1"])

    # the same step as a function with real parameters, and as a module with another device
    untrained = evaluate(Path(best["model"]), experiment, untrained=True, device="cpu")
    assert json.loads((experiment / "retrieval_metrics_untrained.json").read_text())["t2a"] == untrained["t2a"]
    assert untrained["t2a"] != metrics["t2a"]
    if not torch.cuda.is_available():
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "postprocessing.xmodal_scores",
                "--best",
                str(experiment / "best.json"),
                "--device",
                "cuda",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO_ROOT,
        )
        assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == (
            "error: device: 'cuda' was requested but no CUDA GPU is visible to this process; use cpu or auto"
        )

    scores = retrieve(
        Path(best["model"]), [REPO_ROOT / "example" / "example.wav"], ["three high beeps"], "validation", 3, "cpu"
    )
    assert scores.shape == (1 + 12, 1 + 60)  # the query file and caption, then the validation clips and captions
    member = sorted((tiny_dataset / "validation").glob("*.wav"))[0]  # a query that is also a gallery clip
    caption = pd.read_csv(tiny_dataset / "validation_text.csv", keep_default_na=False)["raw_text"][0]
    capsys.readouterr()
    assert retrieve(Path(best["model"]), [member], [caption], "validation", 12, "cpu").shape == (12, 60)
    printed = capsys.readouterr().out
    assert f"[query]  {member.name}" in printed and f"[gallery]  {member.name}" not in printed  # listed once


def check_mlflow_runs(store: Path, raw: dict, progress: pd.DataFrame) -> None:
    """One MLflow run per trial, with the trial's whole resolved config and every epoch's metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    runs = client.search_runs([client.get_experiment_by_name(raw["experiment"]).experiment_id])
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    lrs = sorted(float(run.data.params["optimizer.lr"]) for run in runs)
    assert lrs == [0.0001, 0.003]
    for run in runs:
        params, tags = run.data.params, run.data.tags
        assert params["model.embed_dim"] == "16" and params["param_conf.num_epochs"] == "2" and tags["team"] == "audio"
        history = client.get_metric_history(run.info.run_id, "val/t2a_mAP_at_10")
        assert [m.step for m in history] == [1, 2]
        assert progress["val/t2a_mAP@10"].round(6).isin([round(m.value, 6) for m in history]).sum() == 2


def test_every_config_search_kind_maps_to_a_ray_domain():
    from main import search_space_to_tune
    from utils.config import SEARCH_SPACE_KINDS

    specs = {
        "a": {"choice": [1, 2]},
        "b": {"grid": [1, 2]},
        "c": {"uniform": [0, 1]},
        "d": {"loguniform": [1e-4, 1e-2]},
        "e": {"randint": [1, 5]},
        "f": {"quniform": [0, 1, 0.25]},
    }
    assert {kind for spec in specs.values() for kind in spec} == set(SEARCH_SPACE_KINDS)  # the one list, all covered
    space = search_space_to_tune(specs)
    assert space["a"].sample() in (1, 2) and space["b"] == {"grid_search": [1, 2]}
    assert 0 <= space["c"].sample() <= 1 and 1e-4 <= space["d"].sample() <= 1e-2 and 1 <= space["e"].sample() < 5
    assert space["f"].sample() in (0, 0.25, 0.5, 0.75, 1.0)


def test_wandb_runs_offline_without_an_account_with_each_trials_whole_config(tiny_raw, monkeypatch):
    """Without the wandb package here: Tune's callback with a stand-in module, up to the run it would start."""
    import types

    import ray.air.integrations.wandb as tune_wandb

    monkeypatch.setattr(tune_wandb, "wandb", types.SimpleNamespace(__name__="wandb"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    raw = with_overrides(tiny_raw, {"ray_conf.wandb": {"project": "audio", "entity": "lab"}})
    (tracker,) = make_trackers(validate(raw), raw)
    assert os.environ["WANDB_MODE"] == "offline"  # Tune asks for no API key then
    tune_wandb._set_api_key(tracker.api_key_path)  # what Tune checks before the first trial: no key, no error

    started = {}
    monkeypatch.setattr(tracker, "_start_logging_actor", lambda trial, exclude, **init: started.update(init))
    trial = types.SimpleNamespace(config={"optimizer.lr": 0.003}, trial_id="t1", experiment_dir_name="demo_x")
    tracker.log_trial_start(trial)
    assert started["project"] == "audio" and started["entity"] == "lab" and started["mode"] == "offline"
    assert started["config"]["optimizer.lr"] == 0.003 and started["config"]["model.embed_dim"] == 16
    assert started["group"] == "demo_x" and started["id"] == "t1"
