"""Searching across architectures: a search space chooses whole sub-configs (inline or named presets), every
combination is validated before Ray starts, the stores each one reads are made first, and results.csv names each
trial's architecture. Also the salsa/TAP recipe's tiny variant: AST + RoBERTa, both trained, TAP pair scoring."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT
from test_recipes import recipe, score

from main import check_before_ray, run_experiment, store_variants
from models.tiny import tiny_ast, tiny_roberta
from utils.config import Config, load_config, load_raw, validate, validate_search_space, with_overrides
from utils.config_files import is_section
from utils.errors import ConfigError
from utils.tower_stores import audio_store

CNN = {"name": "SmallCNNEncoder", "channels": [4, 8], "out_dim": 16}
TAP = {"name": "TextAwareAttentionPooling", "proj_dim": 16, "chunk_mb": 1}


@pytest.fixture(scope="module")
def ast_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_ast(tmp_path_factory.mktemp("tiny_models") / "ast")


def presets(ast_folder: Path) -> dict:
    return {
        "cnn": CNN,
        "ast": {"name": "ASTEncoder", "model_id": str(ast_folder)},  # frozen: its outputs stored once
        "mean": {"name": "MeanPooling"},
        "tap": TAP,
    }


def test_presets_are_sections_by_name_and_every_combination_is_checked(tiny_raw, ast_folder):
    raw = with_overrides(tiny_raw, {"presets": presets(ast_folder)})
    config = validate(with_overrides(raw, {"model.audio_enc": "ast", "model.pooling": "tap"}))
    assert config.model.audio_enc.name == "ASTEncoder" and config.model.pooling.proj_dim == 16
    assert validate(with_overrides(raw, {"optimizer.name": "AdamW"})).optimizer.name == "AdamW"  # values stay values
    # each value is valid alone; together, a learned temperature of 0 is not
    space = {"criterion.temperature": {"grid": [0.05, 0.1]}, "model.pooling": {"grid": ["mean", "tap"]}}
    validate_search_space(raw, space)
    bad = {"model.audio_enc": {"grid": ["cnn", {"name": "SmallCNNEncoder", "channels": []}]}}
    with pytest.raises(ConfigError, match=r"model.audio_enc='SmallCNNEncoder' gives an invalid config"):
        validate_search_space(raw, bad)
    two = {"model.audio_enc": {"grid": ["cnn", "ast"]}, "crops.seconds": {"grid": [None, 1.0]}}
    with pytest.raises(ConfigError, match=r"model.audio_enc='ast' with crops.seconds=1.0 gives an invalid config"):
        validate_search_space(raw, two)  # a frozen AST cannot draw fresh crops: named by both keys
    with pytest.raises(ConfigError, match="model.pooling"):
        load_config("conf.yaml", ["model.pooling=nothing"])
    # only sub-config keys take presets: a plain value that happens to be a preset's name stays a value
    assert is_section(Config, "model.pooling") and is_section(Config, "model.audio_enc")
    assert not is_section(Config, "model.text_enc.pooling") and not is_section(Config, "optimizer.name")
    # a preset's relative paths resolve against the config file, as the file's own do (a trial runs elsewhere)
    raw = load_raw(REPO_ROOT / "conf.yaml", ["presets={cnn14: {name: CNN14Encoder, weight: w.safetensors}}"], Config)
    assert raw["presets"]["cnn14"]["weight"] == str(REPO_ROOT / "w.safetensors")
    config, _ = load_config(REPO_ROOT / "conf.yaml", ["presets={mean: {name: MeanPooling}}", "model.pooling=mean"])
    assert config.model.pooling.name == "MeanPooling"


def test_every_architecture_a_search_can_choose_is_built_before_ray(tiny_raw):
    # each value is a valid config, but the frozen Sentence-BERT vectors (384 wide) cannot go without a head into
    # a 16-wide space: found while building the models, before Ray, naming the searched value
    raw = with_overrides(
        tiny_raw,
        {
            "ray_conf.search_space": {
                "model.projection": {"grid": [{"name": "LinearProjection"}, {"name": "IdentityProjection"}]}
            }
        },
    )
    config = validate(raw)
    with pytest.raises(
        ConfigError, match=r"model.projection='IdentityProjection' gives a model that cannot be built: .*384"
    ):
        check_before_ray(config, joins_cluster=False)


@pytest.mark.slow
def test_a_search_across_cnn_and_transformers_towers_and_mean_and_tap_is_one_experiment(
    tiny_raw, ast_folder, ray_session
):
    raw = with_overrides(
        tiny_raw,
        {
            "presets": presets(ast_folder),
            "ray_conf.search_space": {
                "model.audio_enc": {"grid": ["cnn", "ast"]},
                "model.pooling": {"grid": ["mean", "tap"]},
            },
        },
    )
    config = validate(raw)
    variants = store_variants(config)
    assert len(variants) == 5  # the file's config and the 4 architectures
    ast_stores = {audio_store(v, "development")[0] for v in variants if v.model.audio_enc.name == "ASTEncoder"}
    assert len(ast_stores) == 2  # mean pooling reads one mean frame per clip, TAP every frame
    check_before_ray(config, joins_cluster=False)
    experiment = run_experiment(config, raw)
    assert all(path.is_file() for path in ast_stores)

    table = pd.read_csv(experiment / "results.csv")
    assert sorted(zip(table["param/model.audio_enc"], table["param/model.pooling"])) == [
        ("ast", "mean"),
        ("ast", "tap"),
        ("cnn", "mean"),
        ("cnn", "tap"),
    ]
    assert set(table["status"]) == {"TERMINATED"} and table["val/t2a_mAP@10"].between(0, 1).all()
    best = json.loads((experiment / "best.json").read_text())
    assert best["trial_params"]["model.audio_enc"] in ("cnn", "ast")
    assert best["config"]["model"]["audio_enc"]["name"] in ("SmallCNNEncoder", "ASTEncoder")
    metrics = score(experiment)
    assert 0 <= metrics["t2a"]["mAP@10"] <= 1


@pytest.mark.slow
def test_salsa_tap_recipe_trains_ast_and_roberta_with_tap_pair_scores(tiny_dataset, ast_folder, ray_session, tmp_path):
    roberta = tiny_roberta(tmp_path / "roberta")
    raw = recipe(
        "salsa_tap.yaml",
        tiny_dataset,
        tmp_path / "runs",
        {
            "model.audio_enc.model_id": str(ast_folder),
            "model.text_enc.model_id": str(roberta),
            "model.embed_dim": 16,
            "model.pooling.proj_dim": 32,
            "lr_scheduler.decay_epochs": None,
            "param_conf.precision": "fp32",
        },
    )
    config = validate(raw)
    assert config.model.pooling.name == "TextAwareAttentionPooling" and config.optimizer.group("pooling")["lr"] == 2e-5
    check_before_ray(config, joins_cluster=False)
    experiment = run_experiment(config, raw)
    path, settings = audio_store(config, "development")
    assert settings["kind"] == "inputs" and path.is_file()  # a trainable AST: its fbank windows stored
    table = pd.read_csv(experiment / "results.csv")
    assert list(table["status"]) == ["TERMINATED"] and "train/lr_pooling" in table
    metrics = score(experiment)
    assert 0 <= metrics["t2a"]["mAP@10"] <= 1 and 0 <= metrics["a2t"]["mAP@10"] <= 1

    from example.retrieve import retrieve

    member = sorted((tiny_dataset / "validation").glob("*.wav"))[0]
    scores = retrieve(experiment / "best", [member], ["three high beeps"], "validation", 3, "cpu")
    assert scores.shape == (12, 1 + 60)  # every pair scored through TAP, the gallery's frames padded to the query's
