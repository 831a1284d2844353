"""Every script answers --help, and main.py refuses bad input before Ray starts."""
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPTS = [
    "main.py",
    "preprocessing/demo_dataset.py",
    "preprocessing/clotho_dataset.py",
    "preprocessing/audio_logmel.py",
    "preprocessing/sbert_embeddings.py",
    "preprocessing/cnn14_transfer.py",
    "postprocessing/xmodal_scores.py",
    "postprocessing/xmodal_retrieval.py",
    "example/retrieve.py",
]


def run(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, tmp_path):
    result = run(REPO_ROOT / script, "--help", cwd=tmp_path)  # from another folder: scripts find the repo themselves
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_main_rejects_bad_key_and_missing_data_before_ray(tmp_path):
    result = run("main.py", "param_conf.bach_size=4")
    assert result.returncode != 0 and "param_conf.bach_size" in result.stderr
    result = run("main.py", f"data.dataset_dir={tmp_path}")
    assert result.returncode != 0 and "run the preprocessing scripts first" in result.stderr
    assert "Ray" not in result.stderr  # rejected before any Ray start-up


def test_library_imports_without_ray():
    code = "import sys, models, utils.training, utils.audio, utils.text, utils.experiments; assert 'ray' not in sys.modules"
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
