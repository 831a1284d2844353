"""The training loop of one trial, free of Ray: ``main.py`` hands in a ``report`` callback."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from models.losses import LOSSES
from models.weights import load_weights
from utils.checkpoints import build_model, load_checkpoint, save_checkpoint
from utils.config import Config, LRSchedulerConfig, OptimizerConfig
from utils.data import CaptionPairs, pair_loader
from utils.distributed import gather_batch, world
from utils.inference import encode_split
from utils.metrics import flatten_metrics, retrieval_metrics
from utils.runtime import resolve_device, seed_everything
from utils.stores import check_split

log = logging.getLogger(__name__)

# report(metrics, checkpoint_dir): called once per epoch; the folder is deleted after the call returns.
# In a data-parallel run only rank 0 writes a checkpoint; the other ranks get None.
ReportFn = Callable[[dict[str, float], Path | None], None]


def make_optimizer(parameters: Iterable[nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    """The ``optimizer`` section's ``torch.optim`` class over the trainable ``parameters``."""
    optimizer_class = getattr(torch.optim, config.name)
    return optimizer_class([p for p in parameters if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: LRSchedulerConfig
) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """``ReduceLROnPlateau`` with the ``lr_scheduler`` section's settings, stepped on the validation loss."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode=config.mode,
        factor=config.factor,
        patience=config.patience,
        threshold=config.threshold,
        threshold_mode=config.threshold_mode,
        min_lr=config.min_lr,
    )


def run_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    criterion: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
) -> float:
    """Mean loss over ``loader``; trains when an optimizer is given, else only evaluates.

    In a data-parallel run the loss of each training step is taken over the global batch:
    every worker's embeddings are gathered, so the negatives are those of all workers.
    """
    training = optimizer is not None
    model.train(training)
    total, batches = 0.0, 0
    with torch.set_grad_enabled(training):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            audio, text = model(batch["logmels"], batch["lengths"], batch["text_embeds"])  # (B, E) each
            audio_ids = batch["audio_ids"]  # (B,)
            if training:
                audio, text, audio_ids = gather_batch(audio, text, audio_ids)
            loss = criterion(audio, text, audio_ids)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} after {batches} batches; lower the learning rate or check the features"
                )
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += loss.item()
            batches += 1
    return total / max(batches, 1)


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
    train_loader = pair_loader(
        CaptionPairs(data.dataset_dir, data.train_split),
        params.batch_size // world_size,
        shuffle=True,
        seed=config.seed,
        num_workers=params.num_workers,
        world_size=world_size,
        rank=rank,
    )
    val_loader = pair_loader(
        CaptionPairs(data.dataset_dir, data.val_split),
        params.batch_size,
        shuffle=False,
        seed=config.seed,
        num_workers=params.num_workers,
    )

    model = build_model(config, device)
    criterion = LOSSES.build(config.criterion)
    optimizer = make_optimizer(model.parameters(), config.optimizer)
    lr_scheduler = make_lr_scheduler(optimizer, config.lr_scheduler)

    first_epoch = 1
    if resume_from is not None:
        first_epoch = restore(resume_from, model, optimizer, lr_scheduler, config) + 1
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
            val = encode_split(model, data.dataset_dir, data.val_split, device, params.batch_size)
            metrics = {
                "epoch": epoch,
                "train/loss": train_loss,
                "val/loss": val_loss,
                "train/lr": optimizer.param_groups[0]["lr"],
                **flatten_metrics(retrieval_metrics(val.scores(), val.caption_audio), "val"),
            }
            lr_scheduler.step(val_loss)
            log.info(
                "epoch %d: train/loss %.4f val/loss %.4f val/t2a_mAP@10 %.4f",
                epoch,
                train_loss,
                val_loss,
                metrics["val/t2a_mAP@10"],
            )
            if rank > 0:
                report(metrics, None)
                continue
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(Path(folder), model, optimizer, lr_scheduler, config, epoch, metrics)
                report(metrics, Path(folder))
    except torch.OutOfMemoryError:
        # The trial fails with advice; other trials run in their own processes and go on.
        raise torch.OutOfMemoryError(
            f"out of {device.type} memory in epoch {epoch} with param_conf.batch_size={params.batch_size}: lower the "
            "batch size, reserve more of a GPU per trial (ray_conf.gpus_per_trial) or run fewer at once "
            "(ray_conf.max_concurrent_trials)"
        ) from None


def restore(
    checkpoint: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    config: Config,
) -> int:
    """Load a checkpoint's model, optimizer and scheduler state; returns the epoch it was saved after.

    Population based training restarts a trial from another trial's checkpoint with a perturbed
    lr: the restored optimizer state would keep the old one, so the config's lr wins.
    """
    state = load_checkpoint(checkpoint)
    load_weights(model, state["model"], str(checkpoint))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["scheduler"])
    if state["config"]["optimizer"]["lr"] != config.optimizer.lr:
        for group in optimizer.param_groups:
            group["lr"] = config.optimizer.lr
    return state["epoch"]
