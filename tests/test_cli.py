"""Every script answers --help, and main.py refuses bad input before Ray starts."""

import importlib.util
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

from main import check_before_ray
from utils.config import validate, with_overrides
from utils.errors import ConfigError

SCRIPTS = [
    "main.py",
    "preprocessing/demo_dataset.py",
    "preprocessing/clotho_dataset.py",
    "preprocessing/audio_logmel.py",
    "preprocessing/sbert_embeddings.py",
    "preprocessing/tower_stores.py",
    "preprocessing/cnn14_transfer.py",
    "preprocessing/keywords_to_captions.py",
    "preprocessing/hf_dataset.py",
    "postprocessing/xmodal_scores.py",
    "postprocessing/xmodal_retrieval.py",
    "postprocessing/zero_shot.py",
    "postprocessing/teachers.py",
    "bench/many_trials.py",
    "bench/run.py",
    "example/retrieve.py",
    "example/index.py",
    "example/search.py",
    "example/search_app.py",
]


def run(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, tmp_path):
    result = run(REPO_ROOT / script, "--help", cwd=tmp_path)  # from another folder: scripts find the repo themselves
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "``" not in result.stdout  # plain text, no reStructuredText markup


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_before_torch_and_ray_load(script):
    code = (
        "import runpy, sys\n"
        "sys.argv = [sys.argv[1], '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as done:\n    assert done.code == 0\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'sentence_transformers') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    result = run("-c", code, REPO_ROOT / script)
    assert result.returncode == 0, result.stderr


def test_main_rejects_bad_key_and_missing_data_before_ray(tmp_path):
    result = run("main.py", "param_conf.bach_size=4")
    assert result.returncode != 0 and "param_conf.bach_size" in result.stderr
    result = run("main.py", f"data.dataset_dir={tmp_path}")
    assert result.returncode != 0 and "run the preprocessing scripts first" in result.stderr
    result = run("main.py", f"data.dataset_dir={tmp_path / 'nowhere'}")
    assert result.stderr == f"error: data.dataset_dir: {tmp_path / 'nowhere'} does not exist or is not a folder\n"
    assert "Ray" not in result.stderr  # rejected before any Ray start-up


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["criterion.temperature=0"],
            "error: invalid config: criterion.temperature: Input should be greater than 0 (got 0)",
        ),
        (
            ["model.audio_enc.channels=[]"],
            "error: invalid config: model.audio_enc.channels: List should have at least 1 item",
        ),
        (
            ["ray_conf.search_space={criterion.temperature: {grid: [0.1, 0]}}"],
            "error: ray_conf.search_space.criterion.temperature=0 gives an invalid config: criterion.temperature: "
            "Input should be greater than 0",
        ),
        (
            ["model.audio_enc.chanels=[4]"],
            "error: invalid config: model.audio_enc.chanels: Extra inputs are not permitted (did you mean channels?)",
        ),
        (
            ["param_conf.bach_size=4"],
            "error: invalid config: param_conf.bach_size: Extra inputs are not permitted (did you mean batch_size?)",
        ),
        (
            ["param_conf.num_epochs=1", "ray_conf.scheduler.grace_period=2"],
            "error: invalid config: ray_conf.scheduler.grace_period 2 is more than param_conf.num_epochs 1",
        ),
        (["features.fmax=9000"], "error: invalid config: features: need fmin < fmax <= sample_rate / 2"),
    ],
    ids=[
        "temperature-0",
        "no-channels",
        "searched-temperature-0",
        "misspelt-key",
        "misspelt-top-key",
        "asha-longer-than-training",
        "fmax-above-nyquist",
    ],
)
def test_component_constraints_fail_in_one_line_before_ray(overrides, message, tmp_path):
    result = run("main.py", f"ray_conf.storage_path={tmp_path}", *overrides)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert result.stderr.startswith(message), result.stderr
    assert not list(tmp_path.iterdir())  # refused before Ray or any experiment folder


def test_a_text_model_that_cannot_be_loaded_is_one_line_within_seconds(tmp_path):
    start = time.monotonic()
    result = run(
        "preprocessing/sbert_embeddings.py",
        "--dataset-dir",
        tmp_path,
        "text_embeddings.model_name=no-such-org/no-such-model",
    )
    assert result.returncode == 1 and result.stderr.count("\n") == result.stderr.count("error:") == 1, result.stderr
    assert result.stderr.startswith("error: text_embeddings.model_name: cannot load 'no-such-org/no-such-model'")
    assert time.monotonic() - start < 60


def test_a_missing_cnn14_weight_file_names_its_key_and_the_command_that_makes_it(tmp_path):
    from models import CNN14Encoder
    from utils.errors import CheckpointError

    missing = tmp_path / "pretrained" / "CNN14Encoder.safetensors"
    with pytest.raises(CheckpointError) as err:
        CNN14Encoder(n_mels=64, weight=missing)
    assert str(err.value) == (
        f"model.audio_enc.weight: {missing} not found; make it from the PANNs checkpoint with: python "
        f"preprocessing/cnn14_transfer.py --checkpoint Cnn14_mAP=0.431.pth --output {missing}"
    )


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_its_package_is_one_line_before_ray(tiny_raw):
    config = validate(with_overrides(tiny_raw, {"ray_conf.wandb": {"project": "p"}}))
    with pytest.raises(ConfigError, match=r"^ray_conf.wandb: .*pip install wandb"):
        check_before_ray(config, joins_cluster=False)
