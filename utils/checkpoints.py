"""Model files: trial checkpoints, self-contained exports, and the model they rebuild.

A checkpoint (``checkpoint.pt``) holds model, optimizer, scheduler, epoch, metrics, the
resolved config and the model's input sizes, and loads with ``weights_only=True``. An export
(``main.py`` writes one as ``<experiment>/best/``) holds the weights as safetensors, the config,
the metrics and the input sizes as JSON: nothing pickled, and nothing else needed to rebuild the
model (not even the dataset it was trained on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from models.dual_encoder import DualEncoderModel, create_model
from models.weights import load_weights, read_safetensors, read_torch_file
from utils.config import Config, validate
from utils.errors import CheckpointError
from utils.stores import LogmelStore, atomic_folder, logmel_file, read_json, text_embed_dim, text_embeds_file
from utils.tower_stores import audio_store, is_pretrained, open_store, text_store

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "config", "epoch", "metrics")
EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_METRICS = "model.safetensors", "config.json", "metrics.json"
EXPORT_INPUTS = "inputs.json"  # {"n_mels": ..., "text_dim": ...}: the sizes the model was built for (model_inputs)


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: Config,
    epoch: float,
    metrics: dict[str, float],
    inputs: dict[str, int] | None = None,
) -> Path:
    """Write model, optimizer, scheduler, epoch, metrics, the resolved config and the model's ``inputs``
    (``model_inputs``) to ``folder/checkpoint.pt``."""
    path = Path(folder) / CHECKPOINT_FILE
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": config.model_dump(mode="json"),
        "epoch": epoch,
        "metrics": metrics,
        "inputs": inputs or {},
    }
    torch.save(state, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file (or folder holding one) safely: tensors and plain containers only."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    state = read_torch_file(path)
    if not isinstance(state, dict) or not all(key in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(
            f"{path}: not a checkpoint written by this project (expected the keys {', '.join(CHECKPOINT_KEYS)})"
        )
    return state


def export_model(checkpoint: Path, folder: Path) -> Path:
    """Write a checkpoint's weights (safetensors), resolved config and metrics into ``folder``.

    The export needs nothing else to be loaded (``load_trained_model``), so post-processing does
    not depend on Ray's trial folders, and it holds no pickled objects at all. It is written whole
    beside ``folder`` and then replaces it (``atomic_folder``): an older export stays until then.
    """
    state = load_checkpoint(checkpoint)
    folder = Path(folder)
    with atomic_folder(folder) as partial:
        save_file({k: v.contiguous() for k, v in state["model"].items()}, str(partial / EXPORT_WEIGHTS))
        (partial / EXPORT_CONFIG).write_text(json.dumps(state["config"], indent=2))
        (partial / EXPORT_METRICS).write_text(json.dumps({"epoch": state["epoch"], **state["metrics"]}, indent=2))
        if state.get("inputs"):  # checkpoints from before the sizes were saved have none
            (partial / EXPORT_INPUTS).write_text(json.dumps(state["inputs"], indent=2))
    return folder


def read_model_config(path: Path) -> Config:
    """The resolved config stored with a model export folder or a checkpoint."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file():
        return validate(read_json(path / EXPORT_CONFIG))
    return validate(load_checkpoint(path)["config"])


def model_inputs(config: Config) -> dict[str, int]:
    """The input sizes a model of ``config`` is built for, read from its training split's stores: ``n_mels``
    (log-mel bands, for a CNN), ``text_dim`` (the width of precomputed caption vectors) and ``audio_dim``
    (of a frozen audio backbone's cached frames); a tower that reads neither has no entry."""
    data, inputs = config.data, {}
    store = audio_store(config, data.train_split)
    if store is None:
        inputs["n_mels"] = LogmelStore(logmel_file(data.dataset_dir, data.train_split)).n_mels
    elif store[1]["kind"] == "outputs":
        inputs["audio_dim"] = open_store(store[0]).width
    text = text_store(config, data.train_split)
    if text is not None:
        inputs["text_dim"] = open_store(text[0]).width
    elif not is_pretrained(config.model.text_enc):
        inputs["text_dim"] = text_embed_dim(text_embeds_file(data.dataset_dir, data.train_split))
    return inputs


def build_model(
    config: Config,
    device: torch.device,
    pretrained: bool = True,
    inputs: dict[str, int] | None = None,
    backbones: bool = False,
) -> DualEncoderModel:
    """A new model for ``config`` and ``inputs`` (default: ``model_inputs(config)``), with the pretrained
    weights the config names unless ``pretrained`` is False (trained weights follow). Frozen ``transformers``
    backbones are loaded only with ``backbones`` (to embed new audio or text); without, the model reads
    their cached outputs."""
    model_config = config.model
    inputs = model_inputs(config) if inputs is None else inputs
    if not pretrained:
        # the CNN14 file may be missing where a trained model is used, and its weights would be replaced anyway
        if getattr(model_config.audio_enc, "weight", None) is not None:
            audio_enc = model_config.audio_enc.model_copy(update={"weight": None})
            model_config = model_config.model_copy(update={"audio_enc": audio_enc})
        model_config = model_config.model_copy(update={"init_from": None})
    return create_model(model_config, backbones=backbones, **inputs).to(device)


def load_trained_model(path: Path, device: torch.device, backbones: bool = False) -> tuple[DualEncoderModel, Config]:
    """The model of an export folder (``best/``) or a checkpoint, with its stored config and weights,
    in inference mode; frozen ``transformers`` backbones come from their model ids with ``backbones``."""
    path = Path(path)
    if (path / EXPORT_WEIGHTS).is_file():
        config = read_model_config(path)
        weights = read_safetensors(path / EXPORT_WEIGHTS)
        inputs = read_json(path / EXPORT_INPUTS) if (path / EXPORT_INPUTS).is_file() else None
    else:  # one read of the checkpoint for its config, weights and sizes
        state = load_checkpoint(path)
        config, weights, inputs = validate(state["config"]), state["model"], state.get("inputs")
    # no inputs saved: from the stores
    model = build_model(config, device, pretrained=False, inputs=inputs, backbones=backbones)
    load_weights(model, weights, str(path))
    return model.eval(), config
