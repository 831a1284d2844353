"""The training loop of one trial, free of Ray: ``main.py`` hands in a ``report`` callback."""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.dual_encoder import DualEncoderModel
from models.losses import LOSSES, ContrastiveLoss, distillation_loss
from models.masked_norm import synchronise_batch_norms
from models.weights import load_weights
from utils.checkpoints import build_model, load_checkpoint, load_trained_model, model_inputs, save_checkpoint
from utils.config import Config, DistillationConfig, LRSchedulerConfig, OptimizerConfig, ParamConfig
from utils.data import CaptionPairs, TrainingPairs, pair_loader, to_device
from utils.distributed import gather_ids, gather_pairs, world
from utils.errors import ConfigError
from utils.inference import encode_split
from utils.metrics import DCASE2025_KS, flatten_metrics, retrieval_metrics, sequence_metrics
from utils.relevance import read_relevance, relevance_matrix
from utils.runtime import resolve_device, seed_everything
from utils.stores import relevance_csv
from utils.teachers import TeacherScores, local_file, split_digest, store_location
from utils.tower_stores import check_inputs, extra_sources

log = logging.getLogger(__name__)

# report(metrics, checkpoint_dir): called once per epoch (and every param_conf.val_every_steps optimizer steps);
# the folder is deleted after the call returns.
# In a data-parallel run only rank 0 writes a checkpoint; the other ranks get None.
ReportFn = Callable[[dict[str, float], Path | None], None]
PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_optimizer(model: DualEncoderModel, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The ``optimizer`` section's ``torch.optim`` class with one parameter group per trainable part of the
    model (``heads`` first), each with its own lr and weight decay (``OptimizerConfig.group``)."""
    groups = [
        {"params": params, "name": name, **config.group(name)} for name, params in model.parameter_groups().items()
    ]
    return getattr(torch.optim, config.name)(groups, lr=config.lr, betas=config.betas)


@dataclass
class Schedule:
    """An lr scheduler and when it steps: after every optimizer step, or once per epoch on the validation loss."""

    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    per_step: bool


def warmup_then_decay(step: int, warmup: int, total: int, shape: str, floor: float) -> float:
    """The lr factor at optimizer step ``step``: linear from 0 to 1 over ``warmup`` steps, then cosine or
    linear from 1 down to ``floor`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "CosineWithWarmup" else 1 - progress
    return floor + (1 - floor) * decay


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: LRSchedulerConfig, steps_per_epoch: int, num_epochs: int
) -> Schedule:
    """``ReduceLROnPlateau`` on the validation loss, or warmup followed by cosine or linear decay per step."""
    if config.name == "ReduceLROnPlateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=config.mode,
            factor=config.factor,
            patience=config.patience,
            threshold=config.threshold,
            threshold_mode=config.threshold_mode,
            min_lr=config.min_lr,
        )
        return Schedule(plateau, per_step=False)
    total = steps_per_epoch * num_epochs
    if config.decay_epochs is not None:
        total = min(total, round(config.decay_epochs * steps_per_epoch))
    warmup = round(config.warmup_epochs * steps_per_epoch) if config.warmup_epochs is not None else config.warmup_steps
    factor = lambda step: warmup_then_decay(step, min(warmup, total), total, config.name, config.min_lr_ratio)
    return Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, factor), per_step=True)


@dataclass
class Distiller:
    """salsa's stage 2 in the training loop: the teachers' scores of each batch and how their loss is weighed."""

    teachers: TeacherScores
    config: DistillationConfig

    def combined(
        self,
        supervised: torch.Tensor,
        logits: torch.Tensor,
        audio_ids: torch.Tensor,
        caption_ids: torch.Tensor,
        criterion: ContrastiveLoss,
        logit_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """``supervised_weight`` x the criterion's loss + ``weight`` x the distillation loss of the student's
        ``logits`` ``(N, N)`` against the teachers' averaged cosines of the same clips and captions, divided by
        ``temperature`` (or scaled as the student's scores are)."""
        teacher = self.teachers(audio_ids, caption_ids)  # (N, N) cosines
        if self.config.temperature is not None:
            teacher_logits = teacher / self.config.temperature
        else:
            teacher_logits = criterion.scaled(teacher, logit_scale)
        return self.config.supervised_weight * supervised + self.config.weight * distillation_loss(
            logits, teacher_logits
        )


def unwrap(model: nn.Module) -> DualEncoderModel:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def run_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    criterion: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    params: ParamConfig | None = None,
    schedule: Schedule | None = None,
    every_steps: Callable[[int, float], None] | None = None,
    distiller: Distiller | None = None,
) -> float:
    """Mean loss over ``loader``; trains when an optimizer is given, else only evaluates.

    Training follows ``params``: gradients summed over ``accumulate_grad_batches`` batches, clipped
    to ``clip_grad_norm``, autocast to ``precision`` on CUDA; a per-step ``schedule`` steps after
    every optimizer step and a learnable temperature is clamped after it. In a data-parallel run the
    loss of each training step is taken over the global batch: every worker's embeddings are
    gathered, so the negatives are those of all workers. ``every_steps(step, mean loss so far)`` is
    called after every ``params.val_every_steps``-th optimizer step of the epoch but the last. With a
    ``distiller``, the training loss adds the distillation term (``Distiller.combined``); evaluation scores the
    criterion alone.
    """
    training = optimizer is not None
    params = params or ParamConfig(num_epochs=1)
    model.train(training)
    base = unwrap(model)
    autocast = contextlib.nullcontext()
    if device.type == "cuda" and params.precision in PRECISION:
        autocast = torch.autocast("cuda", dtype=PRECISION[params.precision])
    scaler = torch.amp.GradScaler("cuda", enabled=training and device.type == "cuda" and params.precision == "fp16")
    total, batches, steps = 0.0, 0, 0
    last_step = math.ceil(len(loader) / params.accumulate_grad_batches) if training else 0
    with torch.set_grad_enabled(training):
        for batch in loader:
            batch = to_device(batch, device)
            audio_ids = batch["audio_ids"]  # (B,)
            gather = gather_pairs if training else None  # the global batch's pairs, scored inside DDP's forward
            with autocast:
                scores = model(batch["audio"], batch["text"], gather)  # (N, N) cosines, N: the global batch
            if training:
                audio_ids = gather_ids(audio_ids)
            logits = criterion.scaled(scores.float(), base.scale())  # (N, N)
            loss = criterion.from_scores(logits, audio_ids)
            if training and distiller is not None:
                caption_ids = gather_ids(batch["caption_ids"])
                loss = distiller.combined(loss, logits, audio_ids, caption_ids, criterion, base.scale())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} after {batches} batches; lower the learning rate or check the features"
                )
            total += loss.item()
            batches += 1
            if training:
                scaler.scale(loss / params.accumulate_grad_batches).backward()
                if batches % params.accumulate_grad_batches == 0:
                    step(model, optimizer, scaler, params.clip_grad_norm, schedule)
                    steps += 1
                    every = params.val_every_steps
                    if every_steps is not None and every and steps % every == 0 and steps < last_step:
                        every_steps(steps, total / batches)
                        model.train(True)
    if training and batches % params.accumulate_grad_batches:  # the last, shorter accumulation
        step(model, optimizer, scaler, params.clip_grad_norm, schedule)
    return total / max(batches, 1)


def step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clip_grad_norm: float | None,
    schedule: Schedule | None,
) -> None:
    """One optimizer step on the accumulated gradients: unscale, clip, step, zero, then the per-step
    schedule and the clamp of a learnable temperature (open_clip clamps ``logit_scale`` the same way)."""
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if schedule is not None and schedule.per_step:
        schedule.scheduler.step()
    base = unwrap(model)
    if base.max_logit_scale is not None:
        with torch.no_grad():
            base.logit_scale.clamp_(max=math.log(base.max_logit_scale))


def train(config: Config, report: ReportFn, resume_from: Path | None = None) -> None:
    """Train one configuration, one ``report`` per epoch (and one every ``param_conf.val_every_steps``
    optimizer steps within it).

    Every report holds ``epoch`` (the epochs done: fractional between epoch ends), ``train/loss``,
    ``val/loss``, the lr of each parameter group (``train/lr`` for the heads, ``train/lr_<group>`` for
    the others), ``train/temperature`` when it is learnable, and the validation retrieval metrics
    (``val/t2a_mAP@10``, ...; when the dataset has a relevance table for the validation split, also those of the
    DCASE 2025 protocol, ``val/relevance/t2a_mAP@16``, ...) with a checkpoint. The evaluation split is never
    touched. Frozen ``transformers`` backbones are not even loaded: their outputs are read from the stores.

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
        check_inputs(config, split)
    for source in extra_sources(config):  # each data.extra_train dataset, read from its own stores
        check_inputs(source, source.data.train_split)
    if params.precision != "fp32" and device.type != "cuda":
        log.warning("param_conf.precision %s applies on CUDA only; training in fp32 on %s", params.precision, device)
    training_pairs = TrainingPairs(config)  # the training split, and that of every data.extra_train source
    train_loader = pair_loader(
        training_pairs,
        params.batch_size // world_size,
        shuffle=True,
        seed=config.seed,
        num_workers=params.num_workers,
        world_size=world_size,
        rank=rank,
    )
    val_loader = pair_loader(
        CaptionPairs(config, data.val_split),
        params.batch_size,
        shuffle=False,
        seed=config.seed,
        num_workers=params.num_workers,
    )

    inputs = model_inputs(config)
    model = build_model(config, device, inputs=inputs)
    distiller = None
    if config.distillation is not None and config.distillation.two_stage:
        raise ConfigError("distillation names no teachers: main.py runs the search that makes them first")
    if config.distillation is not None:  # stage 2: the teachers' store was written before the search started
        pairs = training_pairs.datasets[0]  # the only training source (no data.extra_train with distillation)
        digest = split_digest(data.dataset_dir, data.train_split)
        teachers = TeacherScores(local_file(store_location(config)), pairs.fids, pairs.cids, digest)
        distiller = Distiller(teachers, config.distillation)
        if config.distillation.init_from_teacher and resume_from is None:
            best = local_file(teachers.checkpoints[0])
            load_weights(model, load_trained_model(best, device)[0].state_dict(), str(best))
            log.info("the student starts from the best teacher's weights, %s", teachers.checkpoints[0])
    criterion = LOSSES.build(config.criterion)
    optimizer = make_optimizer(model, config.optimizer)
    steps_per_epoch = math.ceil(len(train_loader) / params.accumulate_grad_batches)
    schedule = make_lr_scheduler(optimizer, config.lr_scheduler, steps_per_epoch, params.num_epochs)

    first_epoch = 1
    if resume_from is not None:
        done = restore(resume_from, model, optimizer, schedule, config)
        first_epoch = math.floor(done) + 1
        if done != first_epoch - 1 and schedule.per_step:
            # a checkpoint from within an epoch replays that epoch from its start, from the weights it had
            # reached; its per-step schedule is rewound with it, so the lr follows the steps trained
            rewind(schedule.scheduler, optimizer, (first_epoch - 1) * steps_per_epoch)
        log.info("resumed from %s (epoch %g) at the start of epoch %d", resume_from, done, first_epoch)
    # DDP broadcasts rank 0's (possibly restored) weights to every worker when it wraps the model. A pretrained
    # tower may hold parameters that no loss reaches (a pooler, layers past the one read): DDP must not wait
    # for their gradients.
    unused = any(p.requires_grad for tower in (model.audio_encoder, model.text_encoder) for p in _backbone(tower))
    trained = model
    if world_size > 1:
        # every worker normalises with the batch statistics of the global batch's valid frames, as one process would
        synchronise_batch_norms(model)
        trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused)

    val_relevance, relevance = relevance_csv(data.dataset_dir, data.val_split), {}  # its grades, read once

    def validate_and_report(progress: float, train_loss: float, lrs: dict[str, float], epoch_end: bool) -> None:
        val_loss = run_epoch(model, val_loader, criterion, device)
        val = encode_split(model, config, data.val_split, device, params.batch_size)
        metrics = {"epoch": progress, "train/loss": train_loss, "val/loss": val_loss, "train/lr": lrs["heads"]}
        metrics |= {f"train/lr_{name}": lr for name, lr in lrs.items() if name != "heads"}
        if model.scale() is not None:
            metrics["train/temperature"] = 1.0 / model.scale().item()
        scores = val.scores()
        metrics |= flatten_metrics(retrieval_metrics(scores, val.caption_audio), "val")
        if val_relevance.is_file():  # DCASE 2025: several relevant clips per caption, mAP@16 to select on
            if "matrix" not in relevance:  # the split's rows come in the same order at every validation
                table = read_relevance(val_relevance, data.dataset_dir, data.val_split)
                relevance["matrix"] = relevance_matrix(table, val.fnames, val.captions, str(val_relevance))
            dcase2025 = retrieval_metrics(
                scores, val.caption_audio, relevance["matrix"], threshold=data.relevance_threshold, ks=DCASE2025_KS
            )
            metrics |= flatten_metrics(dcase2025, "val/relevance")
        if model.sequence:  # audio2img: how close the audio sequences come to their captions' targets
            metrics |= {
                f"val/{k}": v for k, v in sequence_metrics(val.audio.frames, val.text, val.caption_audio).items()
            }
        if epoch_end and not schedule.per_step:
            schedule.scheduler.step(val_loss)
        log.info(
            "epoch %g: train/loss %.4f val/loss %.4f val/t2a_mAP@10 %.4f",
            progress,
            train_loss,
            val_loss,
            metrics["val/t2a_mAP@10"],
        )
        if rank > 0:
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(Path(folder), model, optimizer, schedule.scheduler, config, progress, metrics, inputs)
            report(metrics, Path(folder))

    epoch = first_epoch
    try:
        for epoch in range(first_epoch, params.num_epochs + 1):
            if world_size > 1:
                train_loader.sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every worker
            lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}  # the lrs this epoch starts with

            def within(step_no: int, loss: float, epoch: int = epoch) -> None:
                current = {group["name"]: group["lr"] for group in optimizer.param_groups}
                validate_and_report(epoch - 1 + step_no / steps_per_epoch, loss, current, epoch_end=False)

            train_loss = run_epoch(
                trained, train_loader, criterion, device, optimizer, params, schedule, within, distiller
            )
            validate_and_report(epoch, train_loss, lrs, epoch_end=True)
    except torch.OutOfMemoryError:
        # The trial fails with advice; other trials run in their own processes and go on.
        raise torch.OutOfMemoryError(
            f"out of {device.type} memory in epoch {epoch} with param_conf.batch_size={params.batch_size}: lower the "
            "batch size, reserve more of a GPU per trial (ray_conf.gpus_per_trial) or run fewer at once "
            "(ray_conf.max_concurrent_trials)"
        ) from None


def _backbone(tower: nn.Module) -> list[nn.Parameter]:
    backbone = getattr(tower, "backbone", None)
    return list(backbone.parameters()) if backbone is not None else []


def rewind(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer, step_no: int) -> None:
    """Set a per-step schedule, and the lrs of ``optimizer``'s groups, to where they are at step ``step_no``."""
    scheduler.last_epoch = step_no
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step_no)


def restore(
    checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule, config: Config
) -> float:
    """Load a checkpoint's model, optimizer and scheduler state; returns the epochs done when it was saved.

    Population based training restarts a trial from another trial's checkpoint with perturbed
    values: the restored optimizer state would keep the old lrs, so the config's lrs win.
    """
    state = load_checkpoint(checkpoint)
    load_weights(model, state["model"], str(checkpoint))
    optimizer.load_state_dict(state["optimizer"])
    schedule.scheduler.load_state_dict(state["scheduler"])
    if state["config"]["optimizer"] != config.optimizer.model_dump(mode="json"):
        lrs = [config.optimizer.group(group["name"])["lr"] for group in optimizer.param_groups]
        if schedule.per_step:  # a per-step schedule scales the lr each group started from
            scheduler = schedule.scheduler
            scheduler.base_lrs = lrs
            lrs = [lr * factor(scheduler.last_epoch) for lr, factor in zip(lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    return state["epoch"]
