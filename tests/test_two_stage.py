"""salsa's two stages in one command, end to end on the demo's shared variant (tiny models, real Ray Tune): a
search, the teachers' store from its best trials, a distilling search, ``--resume`` of either, and the DCASE 2025
protocol on the result."""

import json

import pandas as pd
import pytest
import yaml
from conftest import REPO_ROOT, TINY_OVERRIDES, make_tiny_dataset

import main
from postprocessing.xmodal_retrieval import evaluate
from utils.config import load_config, load_raw, validate, with_overrides
from utils.errors import ConfigError
from utils.teachers import store_teacher_ids


@pytest.fixture(scope="module")
def shared_dataset(tmp_path_factory, sentence_model):
    """The shared demo variant, 24/12/12 clips, preprocessed, with its relevance tables."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_shared"), sentence_model, variant="shared")


def two_stage_raw(dataset, runs):
    raw = load_raw(
        REPO_ROOT / "conf.yaml", TINY_OVERRIDES + [f"data.dataset_dir={dataset}", f"ray_conf.storage_path={runs}"]
    )
    return with_overrides(
        raw,
        {
            "ray_conf.search_space": {"optimizer.lr": {"grid": [0.003, 0.001]}},
            "distillation": {"top_k": 2, "weight": 0.5, "stage2": {"ray_conf.search_space": {}}},
        },
    )


@pytest.mark.slow
def test_two_stages_in_one_command_then_resumed(shared_dataset, ray_session, tmp_path, capsys):
    runs = tmp_path / "runs"
    second = main.run_two_stages(two_stage_raw(shared_dataset, runs))
    (first,) = runs.glob("demo-audio-retrieval-stage1_*")
    assert second.name.startswith("demo-audio-retrieval_") and second.parent == runs

    # stage 1: a plain search; its results name each trial's best checkpoint, best first
    table = pd.read_csv(first / "results.csv")
    assert {"val/t2a_mAP@10", "val/relevance/t2a_mAP@16"} <= set(table.columns)  # the val split has a table
    assert len(table) == 2 and all((first / c).is_relative_to(first) for c in table["checkpoint"])
    assert "distillation" not in json.loads((first / "base_config.json").read_text())
    store = first / "teachers_development_top2.h5"
    assert store_teacher_ids(store) == table["trial_id"].tolist()  # both trials, best first

    # stage 2: distils from stage 1's folder, in its own experiment with its own summary
    base = json.loads((second / "base_config.json").read_text())
    assert base["distillation"]["teachers"] == str(first) and base["ray_conf"]["search_space"] == {}
    assert pd.read_csv(second / "results.csv")["status"].tolist() == ["TERMINATED"]
    best = json.loads((second / "best.json").read_text())
    assert best["config"]["distillation"]["weight"] == 0.5
    assert json.loads((first / main.NEXT_STAGE).read_text())["experiment"] == str(second)

    # --resume of the first stage finds it finished and goes on to the second, which is finished too
    written = store.stat().st_mtime_ns
    assert main.resume_experiment(first, str(runs), []) == second
    assert main.resume_experiment(second, str(runs), []) == second
    assert sorted(p.name for p in runs.iterdir()) == sorted([first.name, second.name])
    assert store.stat().st_mtime_ns == written  # the teachers were embedded once

    # the DCASE 2025 protocol on the result: several relevant clips per caption, mAP@16, top-16 submission
    metrics = evaluate(second / "best", second, relevance="dataset")
    saved = json.loads((second / "retrieval_metrics.json").read_text())
    assert saved["relevance"]["relevant_per_caption"] > 1.0 and "mAP@16" in saved["relevance"]["t2a"]
    assert saved["t2a"] == metrics["t2a"] and "mAP@16" not in saved["t2a"]  # the pairing's table as before
    submission = pd.read_csv(second / "evaluation.t2a_retrieval.csv")
    assert list(submission.columns) == ["caption"] + [f"fname_{k}" for k in range(1, 13)]  # 12 clips: all of them
    assert "DCASE 2025 protocol" in capsys.readouterr().out


def test_a_bad_second_stage_fails_before_anything_runs(tmp_path):
    raw = two_stage_raw(tmp_path / "data", tmp_path / "runs")
    raw["distillation"]["stage2"] = {"ray_conf.search_space": {"distillation.weight": {"grid": [-1.0]}}}
    path = tmp_path / "two_stage.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"distillation.stage2 .*distillation.weight"):
        load_config(path)


def test_both_stages_are_checked_before_ray_starts(tiny_dataset, tmp_path):
    raw = two_stage_raw(tiny_dataset, tmp_path / "runs")
    path = tmp_path / "two_stage.yaml"
    # a second stage whose student cannot start from a first-stage trial's weights
    raw["distillation"]["stage2"] = {"model.embed_dim": 8, "data.dataset_dir": "elsewhere"}
    path.write_text(yaml.safe_dump(raw))
    _, loaded = load_config(path)
    assert loaded["distillation"]["stage2"]["data.dataset_dir"] == str(tmp_path / "elsewhere")  # as the file's
    del loaded["distillation"]["stage2"]["data.dataset_dir"]
    with pytest.raises(ConfigError, match="init_from_teacher: .*shape mismatch"):
        main.check_two_stages(loaded, joins_cluster=False)


def test_selecting_on_the_dcase2025_metric_needs_a_relevance_table(tiny_raw):
    config = validate(with_overrides(tiny_raw, {"ray_conf.metric": "val/relevance/t2a_mAP@16"}))
    with pytest.raises(ConfigError, match="validation_relevance.csv does not exist"):
        main.check_before_ray(config, joins_cluster=False)
