"""Zero-shot classification: the pipeline against a plain per-file, per-prompt reference, a known answer (each
clip's own caption as its class gives the training path's retrieval scores), the metrics by hand."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, TINY_OVERRIDES

from postprocessing import zero_shot
from postprocessing.zero_shot import (
    average_precision,
    class_prompts,
    classify,
    confusion_matrix,
    ensemble_prompts,
    read_labels,
    zero_shot_metrics,
)
from utils.audio import file_logmel
from utils.checkpoints import load_checkpoint, load_trained_model
from utils.config import load_raw, validate
from utils.errors import InputError
from utils.inference import encode_split
from utils.training import train

MODELS = {"mean-max": [], "tap": ["model.pooling={name: TextAwareAttentionPooling, proj_dim: 16, chunk_mb: 1}"]}
# the demo's event kinds and loudness, by words its captions use for them; underscores as in AudioSet's names
KEYWORDS = {
    "beeps": ("beep", "pitched tones"),
    "static_noise": ("static", "hiss"),
    "rising_whistle": ("rising", "upward", "rises", "going up"),
    "falling_whistle": ("falling", "downward", "drops", "going down"),
    "clicks": ("click", "ticking", "taps"),
    "mains_hum": ("hum", "buzz", "drone"),
    "loud": ("loud", "strong", "intense"),
    "quiet": ("quiet", "soft", "faint"),
}
TEMPLATES = ["the sound of {label}", "a recording of {label}"]


def train_checkpoint(raw: dict, path):
    """Train ``raw``'s config and save its last checkpoint at ``path``."""
    states = []
    train(validate(raw), lambda metrics, checkpoint: states.append(load_checkpoint(checkpoint)))
    path.parent.mkdir()
    torch.save(states[-1], path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tiny_dataset, tmp_path_factory) -> dict:
    """The tiny default model (mean-max pooling) and a TAP one, each trained for one epoch: name -> checkpoint."""
    folder = tmp_path_factory.mktemp("zero_shot_models")
    dataset = [f"data.dataset_dir={tiny_dataset}", f"ray_conf.storage_path={folder / 'runs'}"]
    return {
        name: train_checkpoint(
            load_raw(REPO_ROOT / "conf.yaml", TINY_OVERRIDES + dataset + overrides), folder / name / "checkpoint.pt"
        )
        for name, overrides in MODELS.items()
    }


@pytest.fixture(scope="module")
def sounds(tiny_dataset, tmp_path_factory) -> tuple:
    """The 12 evaluation clips copied into nested folders, plus one unlabelled file: ``(folder, {clip name:
    its path relative to the folder}, {clip name: its captions})``."""
    folder = tmp_path_factory.mktemp("sounds")
    captions = pd.read_csv(tiny_dataset / "evaluation_captions.csv").groupby("fname")["raw_text"].apply(list)
    relative = {}
    for i, fname in enumerate(sorted(captions.index)):
        relative[fname] = f"{'a' if i % 2 else 'b/c'}/{fname}"
        (folder / relative[fname]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_dataset / "evaluation" / fname, folder / relative[fname])
    (folder / "unlabelled").mkdir()
    shutil.copy(tiny_dataset / "evaluation" / fname, folder / "unlabelled" / "extra.wav")
    return folder, relative, captions.to_dict()


def keyword_labels(captions: list[str]) -> set[str]:
    """The classes whose keywords one of a clip's captions holds."""
    text = " ".join(captions).lower()
    return {label for label, words in KEYWORDS.items() if any(word in text for word in words)}


def reference_scores(model, config, sentence_model, paths, classes, templates) -> torch.Tensor:
    """The definition file by file and prompt by prompt: each prompt embedded alone and normalised, the mean over
    templates normalised; each file's whole-clip log-mels through the model; one pair score at a time."""
    class_embeds = []
    for label in classes:
        prompts = [template.replace("{label}", label.replace("_", " ")) for template in templates]
        vectors = [
            F.normalize(model.encode_text(torch.from_numpy(sentence_model.encode([p])))[0], dim=0) for p in prompts
        ]
        class_embeds.append(F.normalize(torch.stack(vectors).mean(0), dim=0))
    rows = []
    for path in paths:
        logmels = torch.from_numpy(file_logmel(path, config.features))[None]  # (1, T, n_mels)
        frames, lengths = model.audio_frames(logmels, torch.tensor([logmels.shape[1]]))
        rows.append([model.pair_scores(frames, lengths, embed[None])[0, 0].item() for embed in class_embeds])
    return torch.tensor(rows)


def reference_metrics(scores: torch.Tensor, labels: list[set[str]], classes: list[str]) -> dict:
    """Accuracy, top-5, per-class recall and mAP with plain loops (``sorted`` is stable: ties to the lower index)."""
    values = scores.tolist()
    ranked = [sorted(range(len(classes)), key=lambda j, row=row: -row[j]) for row in values]
    top1 = [classes[order[0]] for order in ranked]
    average_precisions = []
    for j, label in enumerate(classes):
        files = sorted(range(len(values)), key=lambda i, j=j: -values[i][j])
        hits, total = 0, 0.0
        for rank, i in enumerate(files, start=1):
            if label in labels[i]:
                hits += 1
                total += hits / rank
        average_precisions.append(total / hits)
    return {
        "accuracy": sum(top in truth for top, truth in zip(top1, labels)) / len(labels),
        "top5_accuracy": sum(any(classes[j] in truth for j in order[:5]) for order, truth in zip(ranked, labels))
        / len(labels),
        "per_class_recall": {
            c: sum(top == c for top, truth in zip(top1, labels) if c in truth) / sum(c in truth for truth in labels)
            for c in classes
        },
        "mAP": sum(average_precisions) / len(classes),
    }


@torch.no_grad()
@pytest.mark.parametrize("name", list(MODELS))
def test_classify_equals_the_definition_file_by_file_and_prompt_by_prompt(
    name, checkpoints, sounds, sentence_model, tmp_path, caplog
):
    folder, relative, captions = sounds
    labels = {fname: keyword_labels(texts) for fname, texts in captions.items()}
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"fname": list(relative.values()), "label": [";".join(sorted(labels[f])) for f in relative]}).to_csv(
        csv, index=False
    )
    with caplog.at_level(logging.INFO, logger="zero_shot"):
        summary, scores = classify(checkpoints[name], folder, csv, tmp_path / "out", TEMPLATES, "cpu")
    assert "1 audio file(s) in" in caplog.text  # the unlabelled copy is ignored
    classes = sorted(set().union(*labels.values()))
    assert list(summary["per_class_recall"]) == classes  # raw names, underscores kept
    assert summary["n_files"] == 12 and summary["n_classes"] == len(classes) >= 6

    model, config = load_trained_model(checkpoints[name], torch.device("cpu"))
    assert model.text_aware == (name == "tap")
    paths = [folder / path for path in relative.values()]
    expected = reference_scores(model, config, sentence_model, paths, classes, TEMPLATES)
    assert torch.allclose(scores, expected, atol=1e-5)
    reference = reference_metrics(scores, [labels[f] for f in relative], classes)
    assert any(len(truth) > 1 for truth in labels.values())  # every clip is loud or quiet and holds an event
    for key in ("accuracy", "top5_accuracy", "mAP"):
        assert summary[key] == pytest.approx(reference[key], abs=1e-6), key
    assert summary["per_class_recall"] == pytest.approx(reference["per_class_recall"], abs=1e-6)
    assert json.loads((tmp_path / "out" / "zero_shot.json").read_text())["mAP"] == summary["mAP"]
    assert (tmp_path / "out" / "zero_shot_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob("*.partial"))


@torch.no_grad()
@pytest.mark.parametrize("name", list(MODELS))
def test_each_clips_own_caption_as_its_class_gives_the_training_paths_retrieval_scores(
    name, checkpoints, sounds, tmp_path
):
    # known answer: with the template "{label}" the classes are captions, so a file's scores are its retrieval
    # scores against them, as the training path computes them from the stored log-mels and caption vectors
    folder, relative, _ = sounds
    model, config = load_trained_model(checkpoints[name], torch.device("cpu"))
    split = encode_split(model, config, "evaluation", torch.device("cpu"), batch_size=1)  # unpadded, as files
    first = [int((split.caption_audio == i).nonzero()[0]) for i in range(len(split.fnames))]  # a caption per clip
    csv = tmp_path / "captions.csv"
    pd.DataFrame({"fname": [relative[f] for f in split.fnames], "label": [split.captions[j] for j in first]}).to_csv(
        csv, index=False
    )
    summary, scores = classify(checkpoints[name], folder, csv, tmp_path, ["{label}"], "cpu")
    classes = list(summary["per_class_recall"])
    assert classes == sorted(split.captions[j] for j in first)
    caption_of_class = {split.captions[j]: j for j in first}
    expected = split.scores()[:, [caption_of_class[c] for c in classes]]  # (12 clips, 12 classes)
    assert torch.allclose(scores, expected, atol=1e-5)
    own = torch.tensor([classes.index(split.captions[j]) for j in first])  # each clip's class
    assert summary["accuracy"] == pytest.approx((expected.argmax(1) == own).float().mean().item())
    assert "mAP" not in summary  # one label per file


def test_metrics_and_confusion_matrix_by_hand():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.7], [0.6, 0.3, 0.4], [0.1, 0.2, 0.3]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    metrics = zero_shot_metrics(scores, targets, ["a", "b", "c"])
    # top classes a, b, a, c: right for files 0, 1 and 3
    assert metrics["accuracy"] == pytest.approx(0.75) and metrics["top5_accuracy"] == 1.0
    assert metrics["per_class_recall"] == pytest.approx({"a": 1 / 2, "b": 1.0, "c": 1 / 3})
    # class a ranks files 0 (labelled), 2, 1, 3 (labelled): precisions 1/1 and 2/4; b and c rank theirs first
    assert average_precision(scores, targets).tolist() == pytest.approx([0.75, 1.0, 1.0])
    assert metrics["mAP"] == pytest.approx((0.75 + 1 + 1) / 3)
    assert metrics["n_files"] == 4 and metrics["n_classes"] == 3
    assert confusion_matrix(scores, targets).tolist() == [[1, 0, 1], [0, 1, 0], [1, 1, 1]]
    single = zero_shot_metrics(scores, torch.eye(4, 3, dtype=torch.bool)[[0, 1, 2, 0]], ["a", "b", "c"])
    assert "mAP" not in single and single["accuracy"] == pytest.approx(0.5)

    # top 5 of 7 classes; equal scores rank the lower index first
    descending = torch.arange(7, 0, -1).float()
    ranked = torch.stack([descending, descending, torch.zeros(7)])
    labels = torch.zeros(3, 7, dtype=torch.bool)
    labels[0, 5], labels[1, 4], labels[2, 0] = True, True, True  # ranks 6, 5 and (a tie of all) 1
    tied = zero_shot_metrics(ranked, labels, list("abcdefg"))
    assert tied["top5_accuracy"] == pytest.approx(2 / 3) and tied["accuracy"] == pytest.approx(1 / 3)


def test_average_precision_with_ties_equals_the_loop_over_ranks():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (30, 6), generator=g).float()  # many ties: broken in file order
    targets = torch.rand(30, 6, generator=g) < 0.3
    targets[0] = True  # every class labels a file
    expected = []
    for c in range(6):
        order = sorted(range(30), key=lambda i, c=c: -scores[i, c].item())
        hits = [bool(targets[i, c]) for i in order]
        precisions = [sum(hits[: r + 1]) / (r + 1) for r, hit in enumerate(hits) if hit]
        expected.append(sum(precisions) / len(precisions))
    assert average_precision(scores, targets).tolist() == pytest.approx(expected)


def test_prompts_replace_underscores_and_templates_are_averaged_after_normalising():
    assert class_prompts(["Dog_bark", "hum"], ["the sound of {label}", "{label}!"]) == [
        "the sound of Dog bark",
        "Dog bark!",
        "the sound of hum",
        "hum!",
    ]
    with pytest.raises(InputError, match=r"--template 'the sound of \{x\}' has no \{label\}"):
        class_prompts(["hum"], ["{label}", "the sound of {x}"])
    # class 0: [1, 0] and [0, 2] normalise to the axes, their mean to the diagonal; class 1 twice [3, 0]
    prompts = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [3.0, 0.0]])
    assert torch.allclose(ensemble_prompts(prompts, 2), torch.tensor([[0.5**0.5, 0.5**0.5], [1.0, 0.0]]))
    sequences = torch.randn(6, 4, 3)  # 3 classes x 2 templates of (L=4, E=3) sequences: per position
    expected = F.normalize(F.normalize(sequences, dim=-1).view(3, 2, 4, 3).mean(1), dim=-1)
    assert torch.allclose(ensemble_prompts(sequences, 2), expected)


def test_labels_csv_rules(sounds, tmp_path):
    folder, relative, _ = sounds
    names = list(relative.values())
    csv = tmp_path / "labels.csv"
    csv.write_text("fname,label\n" + f"{names[0]}, hum ; beeps\n./{names[1]},hum\n{names[0]},clicks\n")
    paths, classes, targets = read_labels(csv, folder)
    assert paths == [folder / names[0], folder / names[1]] and classes == ["beeps", "clicks", "hum"]
    assert targets.tolist() == [[True, True, True], [False, False, True]]  # rows of one file add up
    bad = {
        "fname,label\n" + "".join(f"gone{i}.wav,hum\n" for i in range(7)): r"7 listed file\(s\) not in .*: gone0.wav, "
        r"gone1.wav, gone2.wav, gone3.wav, gone4.wav, \.\.\.$",
        f"file,label\n{names[0]},hum\n": "missing column\\(s\\) fname",
        f"fname,label\n{names[0]},hum\n../x.wav,hum\n": "line 3: '../x.wav' must be a file name relative to",
        f"fname,label\n{names[0]}, ; \n": "line 2: no label for",
        "fname,label\n": "no labelled file",
    }
    for text, message in bad.items():
        csv.write_text(text)
        with pytest.raises(InputError, match=message):
            read_labels(csv, folder)
    with pytest.raises(InputError, match="--audio-dir: .* is not a folder"):
        read_labels(csv, folder / names[0])


def test_the_script_writes_into_the_models_folder_and_refuses_bad_input_in_one_line(
    checkpoints, sounds, monkeypatch, capsys
):
    folder, relative, _ = sounds
    checkpoint = checkpoints["mean-max"]
    csv = checkpoint.parent / "labels.csv"
    three = list(relative.values())[:3]  # the other clips in the folder are ignored
    csv.write_text(f"fname,label\n{three[0]},hum\n{three[1]},beeps\n{three[2]},hum;beeps\n")
    monkeypatch.setattr(
        sys, "argv", ["zero_shot", "--checkpoint", str(checkpoint), "--audio-dir", str(folder), "--labels", str(csv)]
    )
    zero_shot.main()
    out = capsys.readouterr().out
    assert "accuracy" in out and "mAP" in out and f"wrote {checkpoint.parent / 'zero_shot.json'}" in out
    summary = json.loads((checkpoint.parent / "zero_shot.json").read_text())
    assert (summary["n_files"], summary["n_classes"], summary["templates"]) == (3, 2, ["the sound of {label}"])
    assert (checkpoint.parent / "zero_shot_confusion.png").is_file()
    csv.write_text("fname,label\nnot-there.wav,hum\n")
    with pytest.raises(SystemExit, match=r"^error: .*labels.csv: 1 listed file\(s\) not in .*: not-there.wav$"):
        zero_shot.main()
