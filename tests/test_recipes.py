"""The Whisper-embedder and CLAP recipes, as written in example/recipes/, with tiny models of the same classes
loaded through the recipes' model-id keys: a real 1-epoch Ray Tune trial each, then xmodal_retrieval.py."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT

from main import check_before_ray, run_experiment
from models.tiny import tiny_clap, tiny_roberta, tiny_whisper
from utils.config import load_raw, validate, with_overrides
from utils.tower_stores import audio_store, text_store

RECIPES = REPO_ROOT / "example" / "recipes"


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "whisper": tiny_whisper(root / "whisper"),
        "roberta": tiny_roberta(root / "roberta"),
        "clap": tiny_clap(root / "clap"),
    }


def recipe(name: str, dataset: Path, runs: Path, overrides: dict) -> dict:
    """The recipe file as users run it, shrunk to the tiny data, one CPU trial and one epoch."""
    raw = load_raw(RECIPES / name)
    return with_overrides(
        raw,
        {
            "data.dataset_dir": str(dataset),
            "device": "cpu",
            "param_conf.num_epochs": 1,
            "param_conf.batch_size": 16,
            "param_conf.num_workers": 0,
            "ray_conf.storage_path": str(runs),
            "ray_conf.include_dashboard": False,
            "ray_conf.verbose": 0,
            "ray_conf.gpus_per_trial": 0,
            "ray_conf.cpus_per_trial": 1,
            "ray_conf.scheduler": {"name": "FIFO"},
            "ray_conf.search_space": {},
        }
        | overrides,
    )


def score(experiment: Path, *args: str) -> dict:
    run = subprocess.run(
        [sys.executable, "postprocessing/xmodal_retrieval.py", "--best", str(experiment / "best.json"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert run.returncode == 0, run.stderr
    name = "retrieval_metrics_untrained.json" if "--untrained" in args else "retrieval_metrics.json"
    return json.loads((experiment / name).read_text())


@pytest.mark.slow
def test_whisper_embedder_recipe_trains_from_cached_encoder_outputs(tiny_folders, tiny_dataset, ray_session, tmp_path):
    raw = recipe(
        "whisper_embedder.yaml",
        tiny_dataset,
        tmp_path / "runs",
        {
            "model.audio_enc.model_id": str(tiny_folders["whisper"]),
            "model.text_enc.model_id": str(tiny_folders["roberta"]),
            "model.embed_dim": 32,
            "model.audio_enc.adapter.out_dim": 32,
            "model.text_enc.max_length": 64,  # the tiny RoBERTa's positions
            "param_conf.val_every_steps": 4,  # 120 captions / 16: 8 steps, so one report within the epoch
        },
    )
    config = validate(raw)
    check_before_ray(config, joins_cluster=False)  # model ids resolve; the missing stores are left to Ray
    experiment = run_experiment(config, raw)

    # the frozen encoder ran once per clip: one mean frame per clip, 32 wide, for every split
    path, settings = audio_store(config, "development")
    assert settings["kind"] == "outputs" and settings["model"]["pooled"]
    with h5py.File(path) as f:
        assert f["rows"].shape == (24, 32) and f["rows"].dtype == "float32"
    assert all(audio_store(config, split)[0].is_file() for split in ("validation", "evaluation"))
    assert text_store(config, "development") is None  # a trainable text tower tokenises in the loader

    best = json.loads((experiment / "best.json").read_text())
    trial = next(p for p in experiment.iterdir() if p.name.startswith("train_trial"))
    assert pd.read_csv(trial / "progress.csv")["epoch"].tolist() == [0.5, 1]  # every 4 steps, and the epoch end
    weights = set(json.loads((experiment / "best" / "config.json").read_text())["model"]["audio_enc"])
    assert "model_id" in weights
    from safetensors import safe_open

    with safe_open(experiment / "best" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("audio_encoder.backbone.") for k in keys)  # frozen: the model id's weights
    assert any(k.startswith("text_encoder.backbone.") for k in keys)  # trained
    metrics = score(experiment)
    assert 0 <= metrics["t2a"]["mAP@10"] <= 1 and best["config"]["model"]["audio_enc"]["name"] == "WhisperEncoder"

    # retrieving with a new file runs the whole tower, the frozen encoder from its model id
    from example.retrieve import retrieve

    member = sorted((tiny_dataset / "validation").glob("*.wav"))[0]
    scores = retrieve(experiment / "best", [member], ["three high beeps"], "validation", 3, "cpu")
    assert scores.shape == (12, 1 + 60)


@pytest.mark.slow
def test_clap_recipe_loads_the_released_model_whole_and_fine_tunes_it(
    tiny_folders, tiny_dataset, ray_session, tmp_path
):
    tiny_clap_folder = str(tiny_folders["clap"])
    raw = recipe(
        "clap_htsat_roberta.yaml",
        tiny_dataset,
        tmp_path / "runs",
        {
            "model.init_from": tiny_clap_folder,
            "model.audio_enc.model_id": tiny_clap_folder,
            "model.text_enc.model_id": tiny_clap_folder,
            "model.embed_dim": 16,
            "crops.train_views": 2,
        },
    )
    config = validate(raw)
    check_before_ray(config, joins_cluster=False)
    experiment = run_experiment(config, raw)
    path, settings = audio_store(config, "development")
    assert settings["kind"] == "inputs"  # trainable HTS-AT: its extractor's output is stored
    with h5py.File(path) as f:  # two 10 s views per training clip, each (1 x 1001, 64)
        assert f["rows"].shape == (24 * 2 * 1001, 64) and f["item_id"].shape == (48,)

    # zero-shot: the released model as loaded, before any training
    from transformers import ClapModel

    from utils.checkpoints import build_model

    released = ClapModel.from_pretrained(tiny_clap_folder)
    model = build_model(config, torch.device("cpu"), backbones=True)
    assert torch.equal(model.audio_proj[0].weight, released.audio_projection.linear1.weight)
    assert torch.equal(model.text_proj[3].bias, released.text_projection.linear2.bias)
    assert model.logit_scale.item() == pytest.approx(3.0)
    zero_shot = score(experiment, "--untrained")
    trained = score(experiment)
    assert zero_shot["t2a"] != trained["t2a"] and 0 <= trained["t2a"]["mAP@10"] <= 1
