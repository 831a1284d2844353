"""The training loop without Ray: metrics, checkpoints and resuming."""

import json

import pytest
import torch

from utils.checkpoints import export_model, load_checkpoint, load_trained_model
from utils.config import validate, with_overrides
from utils.training import train


def collect(reports):
    def report(metrics, folder):
        reports.append((metrics, load_checkpoint(folder)))

    return report


@pytest.mark.slow
def test_training_reports_namespaced_metrics_and_full_checkpoints(tiny_raw):
    config = validate(with_overrides(tiny_raw, {"param_conf.num_epochs": 2}))
    reports = []
    train(config, collect(reports))
    assert [m["epoch"] for m, _ in reports] == [1, 2]
    metrics, state = reports[-1]
    for key in ("train/loss", "val/loss", "val/t2a_mAP@10", "val/a2t_mAP@10", "val/t2a_R@1", "val/a2t_R@10"):
        assert key in metrics
    assert 0 <= metrics["val/t2a_mAP@10"] <= 1
    assert state["config"] == config.model_dump(mode="json")  # resolved config travels with the weights
    assert {"model", "optimizer", "scheduler", "epoch", "metrics"} <= set(state)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_epoch(tiny_raw, tmp_path):
    config = validate(with_overrides(tiny_raw, {"param_conf.num_epochs": 2}))
    first = []
    train(validate(with_overrides(tiny_raw, {"param_conf.num_epochs": 1})), collect(first))
    torch.save(first[0][1], tmp_path / "checkpoint.pt")
    resumed = []
    train(config, collect(resumed), resume_from=tmp_path / "checkpoint.pt")
    assert [m["epoch"] for m, _ in resumed] == [2]


def test_saved_checkpoint_rebuilds_the_model(tiny_raw, tmp_path):
    reports = []
    train(validate(tiny_raw), collect(reports))
    torch.save(reports[0][1], tmp_path / "checkpoint.pt")
    model, config = load_trained_model(tmp_path / "checkpoint.pt", torch.device("cpu"))
    assert config.model.embed_dim == 16
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reports[0][1]["model"][name])

    # the export rebuilds the model on a machine without the dataset (its input sizes travel with it)
    export = export_model(tmp_path / "checkpoint.pt", tmp_path / "best")
    moved = json.loads((export / "config.json").read_text())
    moved["data"]["dataset_dir"] = str(tmp_path / "not-here")
    (export / "config.json").write_text(json.dumps(moved))
    exported, _ = load_trained_model(export, torch.device("cpu"))
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in exported.state_dict().items())


@pytest.mark.slow
def test_resume_with_a_perturbed_lr_uses_the_new_lr(tiny_raw, tmp_path):
    # What population based training does: restore another trial's checkpoint under a new lr.
    first = []
    train(validate(with_overrides(tiny_raw, {"optimizer.lr": 0.001})), collect(first))
    torch.save(first[0][1], tmp_path / "checkpoint.pt")
    resumed = []
    config = validate(with_overrides(tiny_raw, {"optimizer.lr": 0.004, "param_conf.num_epochs": 2}))
    train(config, collect(resumed), resume_from=tmp_path / "checkpoint.pt")
    assert resumed[0][0]["train/lr"] == pytest.approx(0.004)
