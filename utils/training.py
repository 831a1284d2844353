"""The training loop of one trial, free of Ray: ``main.py`` hands in a ``report`` callback."""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from models import DualEncoderModel, create_model
from models.weights import load_weights, read_safetensors, read_torch_file
from utils.config import Config, validate
from utils.distributed import gather_batch, world
from utils.data import (AUDIO_COLUMNS, TEXT_COLUMNS, CaptionPairs, LogmelStore, audio_table, check_split, logmel_file, pad_logmels,
                        pair_loader, read_json, read_table, read_text_embeds, text_embed_dim, text_embeds_file, text_table)
from utils.errors import CheckpointError
from utils.losses import LOSSES
from utils.metrics import flatten_metrics, retrieval_metrics
from utils.runtime import resolve_device, seed_everything

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
# A self-contained model export (main.py writes one as <experiment>/best/): weights, config, metrics.
EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_METRICS = "model.safetensors", "config.json", "metrics.json"

# report(metrics, checkpoint_dir): called once per epoch; the folder is deleted after the call returns.
# In a data-parallel run only rank 0 writes a checkpoint; the other ranks get None.
ReportFn = Callable[[dict[str, float], Path | None], None]


@dataclass
class SplitEmbeddings:
    """Every clip and caption of a split in the shared space; row i of ``text`` describes ``audio[caption_audio[i]]``."""

    fnames: list[str]  # (n_audio,)
    audio: torch.Tensor  # (n_audio, E)
    captions: list[str]  # (n_captions,)
    text: torch.Tensor  # (n_captions, E)
    caption_audio: torch.Tensor  # (n_captions,) long

    def scores(self) -> torch.Tensor:
        """Cosine similarity ``(n_audio, n_captions)`` (embeddings are unit length)."""
        return self.audio @ self.text.T


@torch.no_grad()
def embed_split(model: DualEncoderModel, dataset_dir: Path, split: str, device: torch.device, batch_size: int = 32) -> SplitEmbeddings:
    """Embed each clip and each caption of ``split`` exactly once, in batches."""
    model.train(False)  # inference mode: dropout off, BatchNorm running statistics
    logmels = LogmelStore(logmel_file(dataset_dir, split))
    audio_rows = read_table(audio_table(dataset_dir, split), AUDIO_COLUMNS)
    audio_rows = audio_rows[audio_rows["fid"].isin(logmels.row_of)]
    fids = audio_rows["fid"].to_numpy(np.int64)
    audio = []
    for start in range(0, len(fids), batch_size):
        batch, lengths = pad_logmels([logmels[f] for f in fids[start : start + batch_size]])
        audio.append(model.encode_audio(batch.to(device), lengths.to(device)).cpu())

    cids, embeds, _ = read_text_embeds(text_embeds_file(dataset_dir, split))
    row_of_cid = {int(c): i for i, c in enumerate(cids)}
    text_rows = read_table(text_table(dataset_dir, split), TEXT_COLUMNS)
    row_of_fid = {int(f): i for i, f in enumerate(fids)}
    text_rows = text_rows[text_rows["fid"].isin(row_of_fid) & text_rows["cid"].isin(row_of_cid)]
    caption_embeds = torch.from_numpy(embeds[[row_of_cid[int(c)] for c in text_rows["cid"]]])
    text = [model.encode_text(caption_embeds[s : s + 1024].to(device)).cpu() for s in range(0, len(caption_embeds), 1024)]
    return SplitEmbeddings(
        fnames=audio_rows["fname"].tolist(),
        audio=torch.cat(audio),
        captions=text_rows["raw_text"].tolist(),
        text=torch.cat(text),
        caption_audio=torch.tensor([row_of_fid[int(f)] for f in text_rows["fid"]], dtype=torch.long),
    )


def build_model(config: Config, device: torch.device) -> DualEncoderModel:
    """Create the model for ``config`` with the feature and text dimensions of its dataset."""
    data = config.data
    n_mels = LogmelStore(logmel_file(data.dataset_dir, data.train_split)).n_mels
    text_dim = text_embed_dim(text_embeds_file(data.dataset_dir, data.train_split))
    return create_model(config.model, n_mels=n_mels, text_dim=text_dim).to(device)


def run_epoch(model: nn.Module, loader: Any, criterion: nn.Module, device: torch.device, optimizer: torch.optim.Optimizer | None = None) -> float:
    """Mean loss over ``loader``; trains when an optimizer is given, else only evaluates.

    In a data-parallel run the loss of each training step is taken over the global batch:
    every worker's embeddings are gathered, so the negatives are those of all workers.
    """
    model.train(optimizer is not None)
    total, batches = 0.0, 0
    with torch.set_grad_enabled(optimizer is not None):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            audio, text = model(batch["logmels"], batch["lengths"], batch["text_embeds"])
            audio_ids = batch["audio_ids"]
            if optimizer is not None:
                audio, text, audio_ids = gather_batch(audio, text, audio_ids)
            loss = criterion(audio, text, audio_ids)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} after {batches} batches; lower the learning rate or check the features")
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += loss.item()
            batches += 1
    return total / max(batches, 1)


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: Config, epoch: int, metrics: dict[str, float]) -> Path:
    """Write model, optimizer, scheduler, epoch, metrics and the resolved config to ``folder/checkpoint.pt``."""
    path = Path(folder) / CHECKPOINT_FILE
    torch.save({
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": config.model_dump(mode="json"),
        "epoch": epoch,
        "metrics": metrics,
    }, path)
    return path


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "config", "epoch", "metrics")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file (or folder holding one) safely: tensors and plain containers only."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    state = read_torch_file(path)
    if not isinstance(state, dict) or not all(key in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path}: not a checkpoint written by this project (expected the keys {', '.join(CHECKPOINT_KEYS)})")
    return state


def export_model(checkpoint: Path, folder: Path) -> Path:
    """Write a checkpoint's weights (safetensors), resolved config and metrics into ``folder``.

    The export needs nothing else to be loaded (``load_trained_model``), so post-processing does
    not depend on Ray's trial folders, and it holds no pickled objects at all.
    """
    state = load_checkpoint(checkpoint)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(folder / EXPORT_WEIGHTS))
    (folder / EXPORT_CONFIG).write_text(json.dumps(state["config"], indent=2))
    (folder / EXPORT_METRICS).write_text(json.dumps({"epoch": state["epoch"], **state["metrics"]}, indent=2))
    return folder


def read_model_config(path: Path) -> Config:
    """The resolved config stored with a model export folder or a checkpoint."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file():
        return validate(read_json(path / EXPORT_CONFIG))
    return validate(load_checkpoint(path)["config"])


def load_trained_model(path: Path, device: torch.device) -> tuple[DualEncoderModel, Config]:
    """Rebuild the model from an export folder (``best/``) or a checkpoint, with its stored config and weights."""
    path = Path(path)
    config = read_model_config(path)
    model = build_model(config, device)
    weights = read_safetensors(path / EXPORT_WEIGHTS) if (path / EXPORT_WEIGHTS).is_file() else load_checkpoint(path)["model"]
    load_weights(model, weights, str(path))
    return model.train(False), config


def train(config: Config, report: ReportFn, resume_from: Path | None = None) -> None:
    """Train one configuration: Adam + ReduceLROnPlateau, one ``report`` per epoch.

    Every epoch reports ``train/loss``, ``val/loss`` and the validation retrieval metrics
    (``val/t2a_mAP@10``, ...) with a checkpoint. The evaluation split is never touched.

    Inside a ``torch.distributed`` process group (one process per worker) the model is wrapped
    in DDP, each worker trains on its shard with ``batch_size / world size`` pairs per step,
    and the loss sees the gathered global batch, so training matches one process with
    ``batch_size`` pairs. Every worker validates on the whole validation split.
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    data, params = config.data, config.param_conf
    world_size, rank = world()
    for split in (data.train_split, data.val_split):
        check_split(data.dataset_dir, split, config.features)
    train_set = CaptionPairs(data.dataset_dir, data.train_split)
    val_set = CaptionPairs(data.dataset_dir, data.val_split)
    train_loader = pair_loader(train_set, params.batch_size // world_size, True, config.seed, params.num_workers, world_size, rank)
    val_loader = pair_loader(val_set, params.batch_size, False, config.seed, params.num_workers)

    model = create_model(config.model, n_mels=train_set.n_mels, text_dim=train_set.text_dim).to(device)
    criterion = LOSSES.build(config.criterion)
    optimizer = getattr(torch.optim, config.optimizer.name)(
        [p for p in model.parameters() if p.requires_grad], lr=config.optimizer.lr, weight_decay=config.optimizer.weight_decay)
    sched = config.lr_scheduler
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=sched.mode, factor=sched.factor, patience=sched.patience,
        threshold=sched.threshold, threshold_mode=sched.threshold_mode, min_lr=sched.min_lr)

    first_epoch = 1
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        load_weights(model, state["model"], str(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["config"]["optimizer"]["lr"] != config.optimizer.lr:
            # Population based training restarted this trial from another trial's checkpoint with a
            # perturbed lr: the restored optimizer state would otherwise keep the old one.
            for group in optimizer.param_groups:
                group["lr"] = config.optimizer.lr
        first_epoch = state["epoch"] + 1
        log.info("resumed from %s at epoch %d", resume_from, first_epoch)
    # DDP broadcasts rank 0's (possibly restored) weights to every worker when it wraps the model.
    trained = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model

    epoch = first_epoch
    try:
        for epoch in range(first_epoch, params.num_epochs + 1):
            if world_size > 1:
                train_loader.sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every worker
            train_loss = run_epoch(trained, train_loader, criterion, device, optimizer)
            val_loss = run_epoch(model, val_loader, criterion, device)
            val = embed_split(model, data.dataset_dir, data.val_split, device, params.batch_size)
            metrics = {
                "epoch": epoch,
                "train/loss": train_loss,
                "val/loss": val_loss,
                "train/lr": optimizer.param_groups[0]["lr"],
                **flatten_metrics(retrieval_metrics(val.scores(), val.caption_audio), "val"),
            }
            scheduler.step(val_loss)
            log.info("epoch %d: train/loss %.4f val/loss %.4f val/t2a_mAP@10 %.4f", epoch, train_loss, val_loss, metrics["val/t2a_mAP@10"])
            if rank > 0:
                report(metrics, None)
                continue
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(Path(folder), model, optimizer, scheduler, config, epoch, metrics)
                report(metrics, Path(folder))
    except torch.OutOfMemoryError:
        # The trial fails with advice; other trials run in their own processes and go on.
        raise torch.OutOfMemoryError(
            f"out of {device.type} memory in epoch {epoch} with param_conf.batch_size={params.batch_size}: lower the batch "
            "size, reserve more of a GPU per trial (ray_conf.gpus_per_trial) or run fewer at once (ray_conf.max_concurrent_trials)") from None
