"""salsa's stage 2: the distillation loss against its per-anchor definition, the teachers' store (built once, read
back as the teachers' own scores), and a student trained from it."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.losses import ClipLoss, LogSoftmaxLoss, distillation_loss
from utils.checkpoints import load_checkpoint, load_trained_model
from utils.config import DistillationConfig, check_search, validate, with_overrides
from utils.errors import ConfigError, DatasetError
from utils.inference import encode_split
from utils.teachers import TeacherScores, ensure_teacher_store, select_teachers, split_digest, store_teacher_ids
from utils.training import Distiller, train

CPU = torch.device("cpu")


def per_anchor_distillation(logits, teacher_logits):
    """The definition, one anchor at a time: for each audio row, the cross-entropy between the softmax of the
    teachers' row and the student's log-softmax over the texts; for each text column the same over the audios;
    each direction averaged over its anchors, the two averaged."""
    n = logits.shape[0]
    a2t = t2a = 0.0
    for i in range(n):
        target = torch.exp(teacher_logits[i]) / torch.exp(teacher_logits[i]).sum()
        a2t -= sum(target[j] * (logits[i, j] - torch.logsumexp(logits[i], 0)) for j in range(n))
        target = torch.exp(teacher_logits[:, i]) / torch.exp(teacher_logits[:, i]).sum()
        t2a -= sum(target[j] * (logits[j, i] - torch.logsumexp(logits[:, i], 0)) for j in range(n))
    return (a2t / n + t2a / n) / 2


@pytest.mark.parametrize("n", [1, 5, 12])
def test_distillation_loss_equals_its_per_anchor_definition(n):
    generator = torch.Generator().manual_seed(n)
    logits = torch.randn(n, n, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, n, generator=generator, dtype=torch.float64, requires_grad=True)
    loss = distillation_loss(logits, teacher)
    assert loss.item() == pytest.approx(per_anchor_distillation(logits.detach(), teacher.detach()).item(), rel=1e-10)
    loss.backward()
    assert teacher.grad is None and logits.grad is not None  # the targets carry no gradient
    # one-hot targets (a very confident teacher on the diagonal) give CLIP's loss
    sharp = torch.eye(n, dtype=torch.float64) * 1e4
    clip = ClipLoss(temperature=1.0).from_scores(logits.detach(), torch.arange(n))
    assert distillation_loss(logits.detach(), sharp).item() == pytest.approx(clip.item(), rel=1e-9)


def test_distiller_weighs_the_two_losses_and_takes_the_students_temperature():
    class Fixed:  # teachers whose scores are a fixed matrix
        def __call__(self, audio_ids, caption_ids):
            return torch.eye(len(audio_ids)) * 0.5

    criterion = LogSoftmaxLoss(temperature=0.1)
    scores = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    logits, ids = criterion.scaled(scores), torch.arange(4)
    supervised = criterion.from_scores(logits, ids)
    config = DistillationConfig(teachers="x", weight=0.3, supervised_weight=2.0)
    got = Distiller(Fixed(), config).combined(supervised, logits, ids, ids, criterion, None)
    want = 2.0 * supervised + 0.3 * distillation_loss(logits, torch.eye(4) * 0.5 / 0.1)
    assert got.item() == pytest.approx(want.item())
    scale = torch.tensor(20.0)  # a learnable temperature: the teachers' cosines are scaled like the student's
    tempered = Distiller(Fixed(), config.model_copy(update={"temperature": 0.25}))
    assert tempered.combined(supervised, logits, ids, ids, criterion, scale).item() == pytest.approx(
        (2.0 * supervised + 0.3 * distillation_loss(logits, torch.eye(4) * 0.5 / 0.25)).item()
    )


def train_copy(config, target: Path) -> Path:
    """Train ``config`` (one epoch) and keep its checkpoint at ``target``."""
    target.mkdir(parents=True)
    train(config, lambda metrics, folder: shutil.copy(Path(folder) / "checkpoint.pt", target))
    return target / "checkpoint.pt"


@pytest.fixture(scope="module")
def teachers(tiny_dataset, tmp_path_factory):
    """Two teachers trained one epoch on the tiny dataset: the tiny config, and one with a text-aware head."""
    from conftest import REPO_ROOT, TINY_OVERRIDES

    from utils.config import load_raw

    folder = tmp_path_factory.mktemp("teachers")
    raw = load_raw(REPO_ROOT / "conf.yaml", TINY_OVERRIDES + [f"data.dataset_dir={tiny_dataset}"])
    tap = with_overrides(raw, {"model.pooling": {"name": "TextAwareAttentionPooling", "proj_dim": 12}, "seed": 3})
    return raw, [train_copy(validate(raw), folder / "plain"), train_copy(validate(tap), folder / "tap")]


def test_the_store_holds_the_teachers_scores_and_is_written_once(teachers, tmp_path):
    raw, checkpoints = teachers
    store = tmp_path / "teachers.h5"
    config = validate(
        with_overrides(raw, {"distillation": {"checkpoints": list(map(str, checkpoints)), "store": str(store)}})
    )
    assert [t.id for t in select_teachers(config.distillation)] == list(map(str, checkpoints))
    assert ensure_teacher_store(config, CPU) == store and store_teacher_ids(store) == list(map(str, checkpoints))
    written = store.stat().st_mtime_ns
    ensure_teacher_store(config, CPU)
    assert store.stat().st_mtime_ns == written  # the same teachers: not embedded again

    # the plain definition: each teacher's cosine of every (clip, caption) pair of the split, averaged
    split = config.data.train_split
    embedded = [encode_split(*load_trained_model(c, CPU), split, CPU) for c in checkpoints]
    fids, cids = embedded[0].fids, embedded[0].cids
    scores = torch.stack([e.scores() for e in embedded]).mean(0)  # (n_audio, n_captions)
    digest = split_digest(config.data.dataset_dir, split)
    reader = TeacherScores(store, fids, cids, digest)
    rng = np.random.default_rng(0)
    audio_rows, caption_rows = rng.integers(len(fids), size=8), rng.integers(len(cids), size=8)
    got = reader(torch.from_numpy(fids[audio_rows]), torch.from_numpy(cids[caption_rows]))
    want = scores[audio_rows][:, caption_rows]
    assert torch.allclose(got, want, atol=2e-3)  # the TAP teacher's matrix is stored in float16
    with pytest.raises(DatasetError, match="no clip fid 999"):
        TeacherScores(store, np.append(fids, 999), cids, digest)
    with pytest.raises(DatasetError, match="re-indexed since"):  # the dataset's ids changed meaning since
        TeacherScores(store, fids, cids, "another digest")


def test_the_teachers_command_stores_them(teachers, tmp_path, monkeypatch, capsys):
    from postprocessing import teachers as command

    raw, checkpoints = teachers
    store = tmp_path / "by_command.h5"
    argv = ["teachers.py", "--checkpoint", str(checkpoints[1]), "--store", str(store), "--device", "cpu"]
    monkeypatch.setattr("sys.argv", argv + [f"data.dataset_dir={raw['data']['dataset_dir']}"])
    command.main()
    assert store_teacher_ids(store) == [str(checkpoints[1])] and str(store) in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["teachers.py", f"data.dataset_dir={raw['data']['dataset_dir']}"])
    with pytest.raises(SystemExit):  # no teachers named anywhere
        command.main()


def test_a_student_starts_from_the_best_teacher(teachers, tmp_path):
    raw, checkpoints = teachers
    store = tmp_path / "teachers.h5"
    student = with_overrides(
        raw,
        {
            "distillation": {"checkpoints": [str(checkpoints[0])], "store": str(store), "weight": 0.5},
            "optimizer.lr": 1e-12,
        },
    )
    config = validate(student)
    ensure_teacher_store(config, CPU)
    reports = []
    train(config, lambda metrics, folder: reports.append((metrics, load_checkpoint(Path(folder)))))
    teacher, _ = load_trained_model(checkpoints[0], CPU)
    # lr 1e-12: the weights stay the teacher's (batch-norm statistics move with every batch seen in training)
    weights = reports[0][1]["model"]
    for name, tensor in teacher.state_dict().items():
        if "running_" not in name and "num_batches" not in name:
            assert torch.allclose(weights[name], tensor, atol=1e-9), name
    assert np.isfinite(reports[0][0]["train/loss"])


def test_distillation_settings_are_checked(tiny_raw, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        validate(
            with_overrides(tiny_raw, {"distillation": {"teachers": "runs/x", "checkpoints": ["a.pt"], "store": "s.h5"}})
        )
    with pytest.raises(ConfigError, match="checkpoints need store"):
        validate(with_overrides(tiny_raw, {"distillation": {"checkpoints": ["a.pt"]}}))
    with pytest.raises(ConfigError, match="extra_train must be empty"):
        validate(
            with_overrides(
                tiny_raw,
                {"distillation": {"teachers": "runs/x"}, "data.extra_train": [{"dataset_dir": "/tmp"}]},
            )
        )
    with pytest.raises(ConfigError, match="distillation.weight"):
        validate(with_overrides(tiny_raw, {"distillation": {"teachers": "runs/x", "weight": -1}}))
    teaching = with_overrides(tiny_raw, {"distillation": {"teachers": "runs/x"}})
    with pytest.raises(ConfigError, match="only distillation.weight, .* can be searched"):
        check_search(
            teaching,
            validate(with_overrides(teaching, {"ray_conf.search_space": {"distillation.top_k": {"grid": [1, 2]}}})),
        )
    with pytest.raises(ConfigError, match="searched without teachers"):
        check_search(
            tiny_raw,
            validate(with_overrides(tiny_raw, {"ray_conf.search_space": {"distillation.weight": {"grid": [0, 1]}}})),
        )
    check_search(
        teaching,
        validate(with_overrides(teaching, {"ray_conf.search_space": {"distillation.weight": {"grid": [0, 1]}}})),
    )
    with pytest.raises(ConfigError, match="no results.csv and best.json"):
        select_teachers(DistillationConfig(teachers="/nowhere/at/all"))
    import main  # and main.py says so before Ray starts

    missing = validate(with_overrides(tiny_raw, {"distillation": {"teachers": str(tmp_path)}}))
    with pytest.raises(ConfigError, match="no results.csv and best.json"):
        main.check_before_ray(missing, joins_cluster=False)
