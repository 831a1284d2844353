"""The audio2img recipe's tiny variant: w2v-BERT with its strided adapter, resampled to the frozen CLIP text
encoder's 77 positions and trained with the sequence loss in a real Ray Tune trial, then scored, then turned
into a Stable Diffusion pipeline's prompt_embeds."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_recipes import recipe, score

from main import check_before_ray, check_model_ids, run_experiment
from models.tiny import tiny_sd_text_encoder, tiny_w2v_bert
from utils.config import validate, with_overrides
from utils.errors import ConfigError
from utils.tower_stores import open_store, text_store


@pytest.mark.slow
def test_audio2img_recipe_aligns_audio_sequences_with_clip_hidden_states(tiny_dataset, ray_session, tmp_path):
    w2v = tiny_w2v_bert(
        tmp_path / "w2v", add_adapter=True, adapter_kernel_size=3, adapter_stride=2, num_adapter_layers=2
    )
    sd = tiny_sd_text_encoder(tmp_path / "sd", width=16)
    raw = recipe(
        "audio2img.yaml",
        tiny_dataset,
        tmp_path / "runs",
        {
            "model.audio_enc.model_id": str(w2v),
            "model.text_enc.model_id": str(sd),
            "model.embed_dim": 16,
            "model.audio_enc.adapter.out_dim": 16,
            "param_conf.precision": "fp32",
        },
    )
    config = validate(raw)
    with pytest.raises(ConfigError, match="sequence alignment needs all three"):
        validate(with_overrides(raw, {"criterion": {"name": "ClipLoss"}}))
    with pytest.raises(ConfigError, match="must be IdentityProjection and model.text_enc.trainable false"):
        validate(with_overrides(raw, {"model.projection": {"name": "LinearProjection"}}))
    with pytest.raises(ConfigError, match="positions 64 must equal model.text_enc.max_length 77"):
        validate(with_overrides(raw, {"model.pooling.positions": 64}))
    longer = validate(with_overrides(raw, {"model.text_enc.max_length": 100, "model.pooling.positions": 100}))
    with pytest.raises(ConfigError, match="max_length 100 is more than the 77 tokens"):
        check_model_ids(longer)
    check_before_ray(config, joins_cluster=False)
    experiment = run_experiment(config, raw)

    targets = open_store(text_store(config, "development")[0])  # the frozen CLIP's hidden states, per caption
    assert targets.rows(0).shape == (77, 16) and len(targets) == 120
    table = pd.read_csv(experiment / "results.csv")
    assert list(table["status"]) == ["TERMINATED"]
    assert -1 <= table["val/seq_cosine"][0] <= 1 and table["val/seq_mse"][0] >= 0 and table["val/seq_euclidean"][0] >= 0
    metrics = score(experiment)
    assert 0 <= metrics["t2a"]["mAP@10"] <= 1

    from example.audio_to_prompt_embeds import prompt_embeds

    member = sorted((tiny_dataset / "validation").glob("*.wav"))[0]
    (written,) = prompt_embeds(experiment / "best", [member], tmp_path / "embeds", "cpu")
    embeds = load_file(written)["prompt_embeds"]
    assert embeds.shape == (1, 77, 16) and torch.isfinite(embeds).all()
    best = json.loads((experiment / "best.json").read_text())
    assert best["config"]["criterion"]["name"] == "SequenceContrastiveLoss"
