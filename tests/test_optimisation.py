"""Parameter groups, learning-rate schedules, accumulation, clipping and the learnable temperature,
read back from the optimizer and the model."""

import math

import pytest
import torch

from models import DualEncoderModel, create_model
from models.losses import ClipLoss, LogSoftmaxLoss
from utils.checkpoints import load_checkpoint
from utils.config import (
    CosineWithWarmupConfig,
    LinearWithWarmupConfig,
    OptimizerConfig,
    ParamConfig,
    validate,
    with_overrides,
)
from utils.training import make_lr_scheduler, make_optimizer, run_epoch, train, warmup_then_decay

MODEL = {
    "embed_dim": 8,
    "audio_enc": {"name": "SmallCNNEncoder", "channels": [4], "out_dim": 8},
    "text_enc": {"name": "SentBERTBaseEncoder"},
}


def tiny_model(**model) -> DualEncoderModel:
    torch.manual_seed(0)
    return create_model(DualEncoderModel.Config(**MODEL | model), n_mels=8, text_dim=6)


def fake_batches(n: int, size: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "audio": {"logmels": torch.randn(size, 12, 8, generator=g), "lengths": torch.full((size,), 12)},
            "text": {"text_embeds": torch.randn(size, 6, generator=g)},
            "audio_ids": torch.arange(size) + 10 * i,
        }
        for i in range(n)
    ]


def test_parameter_groups_take_their_own_lr_and_weight_decay():
    model = tiny_model(learnable_temperature={"init": 0.07})
    config = OptimizerConfig(lr=1e-3, weight_decay=0.01, param_groups={"audio_encoder": {"lr": 4e-6}})
    optimizer = make_optimizer(model, config)
    groups = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups}
    # the frozen Sentence-BERT tower has no parameters, so no text group; the temperature gets no weight decay
    assert list(groups) == ["heads", "audio_encoder", "logit_scale"]
    assert groups["heads"][:2] == (1e-3, 0.01) and groups["audio_encoder"][:2] == (4e-6, 0.01)
    assert groups["logit_scale"] == (1e-3, 0.0, 1)
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("kind", [CosineWithWarmupConfig, LinearWithWarmupConfig])
def test_warmup_then_decay_is_stepped_per_optimizer_step(kind):
    model = tiny_model()
    optimizer = make_optimizer(model, OptimizerConfig(lr=0.1, param_groups={"audio_encoder": {"lr": 0.01}}))
    schedule = make_lr_scheduler(optimizer, kind(warmup_steps=3, min_lr_ratio=0.1), steps_per_epoch=5, num_epochs=2)
    assert schedule.per_step
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.scheduler.step()
    heads = [lrs[0] for lrs in seen]
    assert heads[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])  # linear warmup over 3 steps
    for step, lr in enumerate(heads[3:], start=3):  # then decay over the remaining 7 steps, to 10% at the end
        progress = (step - 3) / 7
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind is CosineWithWarmupConfig else 1 - progress
        assert lr == pytest.approx(0.1 * (0.1 + 0.9 * shape))
    assert [lrs[1] / lrs[0] for lrs in seen] == pytest.approx([0.1] * 10)  # every group follows the same shape
    assert warmup_then_decay(10, 3, 10, kind().name, 0.1) == pytest.approx(0.1)


def heads_lrs(optimizer: torch.optim.Optimizer, schedule, steps: int) -> list[float]:
    """The first group's lr at each of ``steps`` optimizer steps, stepping the per-step schedule after each."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.scheduler.step()
    return lrs


def test_warmup_in_epochs_counts_optimizer_steps():
    optimizer = make_optimizer(tiny_model(), OptimizerConfig(lr=1.0))
    schedule = make_lr_scheduler(optimizer, CosineWithWarmupConfig(warmup_epochs=0.5), steps_per_epoch=8, num_epochs=1)
    lrs = heads_lrs(optimizer, schedule, 4)
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0])  # 0.5 epoch x 8 steps = 4 warmup steps


def test_salsa_schedule_warms_up_one_epoch_then_decays_until_epoch_15_of_20_and_stays():
    optimizer = make_optimizer(tiny_model(), OptimizerConfig(lr=1.0))
    config = CosineWithWarmupConfig(warmup_epochs=1, decay_epochs=15, min_lr_ratio=0.01)
    schedule = make_lr_scheduler(optimizer, config, steps_per_epoch=2, num_epochs=20)
    lrs = heads_lrs(optimizer, schedule, 40)
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])  # 1 epoch of warmup, then the peak
    middle = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 14 / 28))  # step 16: halfway through steps 2..30
    assert lrs[16] == pytest.approx(middle)
    assert lrs[30:] == pytest.approx([0.01] * 10)  # epochs 15 to 20 at the floor


def test_accumulation_steps_once_per_k_batches_and_clipping_bounds_the_update():
    model = tiny_model()
    optimizer = make_optimizer(model, OptimizerConfig(name="AdamW", lr=1.0))
    schedule = make_lr_scheduler(optimizer, LinearWithWarmupConfig(), steps_per_epoch=3, num_epochs=1)
    criterion = LogSoftmaxLoss(temperature=0.1)
    params = ParamConfig(num_epochs=1, accumulate_grad_batches=2, clip_grad_norm=1e-6)
    run_epoch(model, fake_batches(5), criterion, torch.device("cpu"), optimizer, params, schedule)
    assert schedule.scheduler.last_epoch == 3  # batches 1-2, 3-4, then the shorter 5

    # SGD makes the clipped update visible: lr x gradient norm <= lr x 1e-6
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    run_epoch(
        model, fake_batches(1), criterion, torch.device("cpu"), sgd, ParamConfig(num_epochs=1, clip_grad_norm=1e-6)
    )
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < moved <= 1e-6 * 1.001


def test_learnable_temperature_is_trained_clamped_and_saved(tiny_raw):
    model = tiny_model(learnable_temperature={"init": 0.5, "max_logit_scale": 20})
    assert model.scale().item() == pytest.approx(2.0)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))  # far past the clamp
    optimizer = make_optimizer(model, OptimizerConfig(lr=1e-3))
    run_epoch(model, fake_batches(1), ClipLoss(), torch.device("cpu"), optimizer, ParamConfig(num_epochs=1))
    assert model.logit_scale.item() == pytest.approx(math.log(20.0))  # the parameter itself is clamped

    overrides = {
        "model.learnable_temperature": {"init": 0.1},
        "model.projection": {"name": "MLPProjection", "hidden_dim": 32},
        "criterion": {"name": "ClipLoss"},
        "lr_scheduler": {"name": "CosineWithWarmup", "warmup_steps": 1},
        "optimizer.param_groups": {"audio_encoder": {"lr": 1e-4}},
    }
    reports = []
    train(validate(with_overrides(tiny_raw, overrides)), lambda m, folder: reports.append((m, load_checkpoint(folder))))
    metrics, state = reports[-1]
    assert metrics["train/temperature"] != pytest.approx(0.1)  # it moved in training
    assert metrics["train/lr_audio_encoder"] == pytest.approx(metrics["train/lr"] / 10)
    assert 1 / math.exp(state["model"]["logit_scale"].item()) == pytest.approx(metrics["train/temperature"], rel=1e-4)
    assert "audio_proj.0.weight" in state["model"] and "audio_proj.3.weight" in state["model"]  # the 2-layer head


def test_a_schedule_rewound_to_a_step_gives_that_steps_lrs():
    from utils.training import rewind

    model = tiny_model()
    optimizer = make_optimizer(model, OptimizerConfig(lr=1e-3))
    schedule = make_lr_scheduler(optimizer, CosineWithWarmupConfig(warmup_steps=3), steps_per_epoch=5, num_epochs=2)
    lrs = heads_lrs(optimizer, schedule, 8)
    rewind(schedule.scheduler, optimizer, 5)  # a mid-epoch checkpoint of epoch 2 replays epoch 2 from step 5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[5])
    optimizer.step()
    schedule.scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[6])
