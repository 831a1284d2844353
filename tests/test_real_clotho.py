"""The README's real-Clotho route, command by command as printed there, on a small dataset in
Clotho's release format: generated audio under file names shaped like Clotho's."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import REPO_ROOT

from models import CNN14Encoder

pytestmark = pytest.mark.slow

RECIPE = "example/recipes/dcase2023_baseline.yaml"
# Only what needs a download, a GPU or hours changes; everything else is the recipe's.
OFFLINE = ["text_embeddings.model_name=sentence-transformers/all-MiniLM-L6-v2"]
SMALL = [
    "ray_conf.gpus_per_trial=0",
    "ray_conf.cpus_per_trial=2",
    "param_conf.num_epochs=1",
    "ray_conf.search_space=null",
    "ray_conf.scheduler={name: FIFO}",
    "ray_conf.include_dashboard=false",
    "param_conf.num_workers=0",
]
OVERRIDES = {"sbert_embeddings.py": OFFLINE, "main.py": OFFLINE + SMALL}

# Names as Clotho has them: spaces, commas, HTML entities, quotes, parentheses.
NAMES = {
    "development": [
        "Huston we have a problem (before &amp; after cleaning).wav",
        "Rain on a tin roof, heavy.wav",
        "kid&#39;s toy piano 01.wav",
        'the "big" door creak.wav',
        "Distorted AM Radio noise.wav",
    ],
    "validation": ["Birds at dawn (park) 2.wav", "dog barking, far away.wav", "traffic &amp; horns.wav"],
    "evaluation": ["Santa Motor.wav", "footsteps on gravel (slow).wav", "o&#39;clock bell, church.wav"],
}
SOUNDS = ["a low hum with a {} whistle", "{} beeps over rain", "clicking of a {} machine", "a door creaks {}"]


def readme_commands() -> list[str]:
    """The command lines of the README's real-Clotho block."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- real-clotho-commands.*?-->\n```bash\n(.*?)```", readme, re.S)
    assert block, "README lost its real-Clotho command block"
    return [line for line in block[1].splitlines() if line.strip()]


def write_clotho_release(folder, rng):
    """Clotho as downloaded: {split}/ audio (44.1 kHz, one stereo 48 kHz file) and clotho_captions_{split}.csv."""
    for split, names in NAMES.items():
        (folder / split).mkdir(parents=True)
        rows = []
        for i, name in enumerate(names):
            rate, seconds = (48000, 1.3) if i == 1 else (44100, 1.0 + 0.15 * i)
            t = np.arange(int(rate * seconds)) / rate
            wave = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size)
            sf.write(folder / split / name, np.stack([wave, wave[::-1]], 1) if i == 1 else wave, rate)
            words = ["quiet", "loud", "distant", "sharp", "slow"]
            captions = [SOUNDS[(i + k) % len(SOUNDS)].format(words[k]).capitalize() + "." for k in range(5)]
            captions[2] = captions[2].replace(".", ", then silence.")  # punctuation inside a caption
            rows.append([name, *captions])
        pd.DataFrame(rows, columns=["file_name"] + [f"caption_{k}" for k in range(1, 6)]).to_csv(
            folder / f"clotho_captions_{split}.csv", index=False
        )


def write_panns_checkpoint(path):
    """A checkpoint in PANNs' layout (state dict under "model", front end and AudioSet head included)."""
    state = CNN14Encoder(n_mels=64).state_dict()
    state["spectrogram_extractor.stft.conv_real.weight"] = torch.zeros(513, 1, 1024)
    state["logmel_extractor.melW"] = torch.zeros(513, 64)
    state["fc_audioset.weight"], state["fc_audioset.bias"] = torch.zeros(527, 2048), torch.zeros(527)
    torch.save({"iteration": 1, "model": state}, path)


def test_readme_real_clotho_route_from_the_release_files_to_a_submission(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / RECIPE).parent.mkdir(parents=True)
    shutil.copy(REPO_ROOT / RECIPE, tmp_path / RECIPE)  # the recipe's relative paths then point into tmp_path
    shutil.copy(REPO_ROOT / "example" / "example.wav", tmp_path / "example" / "example.wav")
    write_clotho_release(tmp_path / "data" / "clotho", rng)
    write_panns_checkpoint(tmp_path / "Cnn14_mAP=0.431.pth")

    outputs = {}
    for line in readme_commands():
        words = shlex.split(line)
        assert words[0] == "python", line
        script = words[1]
        command = [sys.executable, str(REPO_ROOT / script), *words[2:], *OVERRIDES.get(script.split("/")[-1], [])]
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        outputs[script] = run.stdout + run.stderr

    assert "clotho_captions_development.csv, the Clotho release format" in outputs["preprocessing/clotho_dataset.py"]
    text = pd.read_csv(tmp_path / "data" / "clotho" / "development_text.csv", keep_default_na=False)
    assert set(text["fname"]) == set(NAMES["development"]) and len(text) == 25
    assert text["text"].str.match(r"^[a-z0-9 '\-]+$").all()  # normalised: lower case, no punctuation
    (experiment,) = (tmp_path / "runs").glob("dcase2023-baseline_*")
    best = json.loads((experiment / "best.json").read_text())
    assert best["config"]["model"]["audio_enc"]["name"] == "CNN14Encoder"
    assert best["config"]["text_embeddings"]["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    submission = pd.read_csv(experiment / "evaluation.t2a_retrieval.csv", keep_default_na=False)
    assert len(submission) == 15 and set(submission["fname_1"]) <= set(NAMES["evaluation"])
    metrics = json.loads((experiment / "retrieval_metrics.json").read_text())
    assert 0 <= metrics["t2a"]["mAP@10"] <= 1
    assert f"using experiment {experiment}" in outputs["postprocessing/xmodal_retrieval.py"]
    assert "[gallery]" not in outputs["example/retrieve.py"] and "A dog barks" in outputs["example/retrieve.py"]
    assert f"using experiment {experiment}" in outputs["example/retrieve.py"]
