"""xmodal_retrieval.py --report: the recall@k curves against a per-query loop, and the page rendered in headless
Chromium (metrics table, images, playable clips, the expected gallery), on a generated split, no training."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from browser import chromium, needs_chromium
from conftest import REPO_ROOT

from postprocessing.report import (
    RANK_PLOT,
    RECALL_PLOT,
    RESULTS_TABLE,
    SEARCH_PLOT,
    TOP_CLIPS,
    recall_at_k,
    retrieval_ranks,
)
from postprocessing.xmodal_retrieval import evaluate
from postprocessing.xmodal_scores import save_scores, scores_file
from preprocessing.demo_dataset import write_demo_dataset
from utils.checkpoints import EXPORT_CONFIG
from utils.config import load_raw, validate
from utils.experiments import BEST_FILE
from utils.inference import SplitEmbeddings
from utils.metrics import retrieval_metrics
from utils.reporting import TrialHistory, plot_metric, results_table

SPLIT = "evaluation"
EXAMPLES = 3
AWKWARD = {1: 'dog "barks" & <cat>.wav', 2: "rain #1 at 100%.wav"}  # clip index -> file name
AWKWARD_CAPTION = "A dog & a <b>cat</b> say \"hi\" and 'bye'."


def plain_curves(scores: np.ndarray, caption_audio: np.ndarray, max_k: int) -> dict[str, np.ndarray]:
    """Recall@k for k = 1..max_k by the definitions, one query at a time (ties in index order)."""
    n_audio, n_captions = scores.shape
    t2a, a2t, any_hit = np.zeros(max_k), np.zeros(max_k), np.zeros(max_k)
    for c in range(n_captions):
        rank = list(np.argsort(-scores[:, c], kind="stable")).index(caption_audio[c]) + 1
        for k in range(1, max_k + 1):
            t2a[k - 1] += (rank <= k) / n_captions
    for a in range(n_audio):
        relevant = [int(caption_audio[c] == a) for c in np.argsort(-scores[a], kind="stable")]
        for k in range(1, max_k + 1):
            a2t[k - 1] += sum(relevant[:k]) / max(1, sum(relevant)) / n_audio
            any_hit[k - 1] += any(relevant[:k]) / n_audio
    return {"t2a": t2a, "a2t": a2t, "a2t_any": any_hit}


def plain_ranks(scores: np.ndarray, caption_audio: np.ndarray) -> list[int]:
    return [list(np.argsort(-scores[:, c], kind="stable")).index(a) + 1 for c, a in enumerate(caption_audio)]


@pytest.mark.parametrize("ties", [False, True])
def test_recall_at_k_equals_plain_per_query_loop(ties):
    rng = np.random.default_rng(7)
    n_audio, n_captions = 9, 34  # k runs past both: recall reaches 1 (or stays below for a clip without captions)
    caption_audio = rng.integers(0, n_audio - 1, n_captions)  # the last clip has no caption
    scores = rng.normal(size=(n_audio, n_captions)).astype(np.float32)
    if ties:
        scores = scores.round(0)  # many exact ties, broken by index
    curves = recall_at_k(retrieval_ranks(scores, caption_audio), max_k=50)
    for name, expected in plain_curves(scores, caption_audio, 50).items():
        np.testing.assert_allclose(curves[name], expected, atol=1e-6, err_msg=name)
    if not ties:  # the curve at k = 1, 5, 10 is the table's R@k (topk orders ties its own way)
        metrics = retrieval_metrics(scores, caption_audio)
        for name in curves:
            for k in (1, 5, 10):
                assert curves[name][k - 1] == pytest.approx(metrics[name][f"R@{k}"], abs=1e-6)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A generated 8-clip split with awkward file names and captions, its scores file, and two models: the
    best/ export of an experiment folder (results.csv, search.png) and a loose one; both reports written."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    write_demo_dataset(data, {SPLIT: 8}, seed=3)
    table = pd.read_csv(data / f"{SPLIT}_captions.csv")
    fnames = list(dict.fromkeys(table["fname"]))
    for i, name in AWKWARD.items():
        (data / SPLIT / fnames[i]).rename(data / SPLIT / name)
        fnames[i] = name
    caption_audio = table["fname"].map({f: i for i, f in enumerate(dict.fromkeys(table["fname"]))}).to_numpy()
    captions = table["raw_text"].tolist()
    captions[0] = AWKWARD_CAPTION  # a caption of clip 0
    rng = np.random.default_rng(0)
    relevant = caption_audio[None, :] == np.arange(8)[:, None]
    scores = (rng.normal(size=(8, len(captions))) + 1.2 * relevant).round(1).astype(np.float32)  # with ties
    scores[0, 0] = 5.0  # the awkward caption finds its clip first: the first of the best

    def save(out_dir: Path, untrained: bool) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        embeds = SplitEmbeddings(
            fnames, None, captions, None, torch.tensor(caption_audio), lambda *_: torch.as_tensor(scores)
        )
        save_scores(scores_file(out_dir, SPLIT, untrained), embeds)

    config = validate(load_raw(REPO_ROOT / "conf.yaml", [f"data.dataset_dir={data}", f"ray_conf.storage_path={root}"]))
    experiment, loose = root / "runs" / "demo_20260101-120000", root / "elsewhere" / "model"
    for model in (experiment / "best", loose):
        model.mkdir(parents=True)
        (model / EXPORT_CONFIG).write_text(json.dumps(config.model_dump(mode="json")))
    (experiment / BEST_FILE).write_text(json.dumps({"model": str(experiment / "best")}))
    metric = "val/t2a_mAP@10"
    trials = [
        TrialHistory(
            f"trial_{i}",
            {"optimizer.lr": lr},
            "TERMINATED" if i else "STOPPED",
            pd.DataFrame({"epoch": [1, 2, 3][: i + 1], metric: [0.1 * lr * 1e3 * e for e in range(1, i + 2)]}),
        )
        for i, lr in enumerate((3e-3, 1e-3, 3e-4))
    ]
    results_table(trials, metric, "max").to_csv(experiment / RESULTS_TABLE, index=False)
    plot_metric(trials, metric, experiment / SEARCH_PLOT)
    save(experiment, untrained=False)
    out = root / "elsewhere" / "reports" / "untrained"  # the page in another folder than the model and the data
    save(out, untrained=True)
    metrics = evaluate(experiment / "best", experiment, SPLIT, report=True, report_examples=EXAMPLES)
    evaluate(loose, out, SPLIT, untrained=True, report=True, report_examples=EXAMPLES)
    ranks = plain_ranks(scores, caption_audio)
    best = sorted(range(len(captions)), key=lambda c: (ranks[c], c))[:EXAMPLES]
    worst = sorted(range(len(captions)), key=lambda c: (-ranks[c], c))[:EXAMPLES]
    shown = set()  # the clips the gallery plays: each caption's top clips and its own clip
    for c in best + worst:
        shown |= {fnames[a] for a in np.argsort(-scores[:, c], kind="stable")[:TOP_CLIPS]} | {fnames[caption_audio[c]]}
    assert best[0] == 0 and set(AWKWARD.values()) <= shown  # the awkward names are on the page
    return {
        "data": data,
        "pages": (experiment / f"{SPLIT}.report.html", out / f"{SPLIT}.report_untrained.html"),
        "experiment": experiment,
        "metrics": metrics,
        "captions": captions,
        "fnames": fnames,
        "caption_audio": caption_audio,
        "best": best,
        "worst": worst,
        "shown": shown,
    }


def test_report_files_embed_the_figures_and_refer_to_clips_relatively(case):
    page, untrained_page = case["pages"]
    text = page.read_text(encoding="utf-8")
    for png in (RECALL_PLOT, RANK_PLOT):  # written beside the page and embedded in it
        data = (page.with_suffix("") / png).read_bytes()
        assert data.startswith(b"\x89PNG") and base64.b64encode(data).decode() in text
        assert (untrained_page.with_suffix("") / png).is_file()
    assert base64.b64encode((case["experiment"] / SEARCH_PLOT).read_bytes()).decode() in text
    assert "<cat>" not in text and "<b>cat" not in text  # names and captions are escaped
    sources = [html.unescape(s) for s in re.findall(r'<audio [^>]*src="([^"]*)"', text)]
    assert sources and all(not s.startswith(("/", "file:")) and " " not in s for s in sources)
    assert {Path(unquote(s)).name for s in sources} == case["shown"]
    assert "No search results" in untrained_page.read_text(encoding="utf-8")


PAGE_STATE = """
const texts = sel => [...document.querySelectorAll(sel)].map(e => e.textContent);
return {
  title: document.title, h1: texts('h1')[0],
  metrics: [...document.querySelectorAll('table.metrics tr')].map(r => [...r.cells].map(c => c.textContent)),
  images: [...document.images].map(i => [i.complete, i.naturalWidth]),
  audio: [...document.querySelectorAll('audio')].map(a => [a.src, a.preload]),
  best: texts('#best .caption'), worst: texts('#worst .caption'),
  hits: [...document.querySelectorAll('article.example')].map(a => a.querySelector('.hit .fname').title),
  search: texts('#search .empty'), searchRows: document.querySelectorAll('table.search tbody tr').length,
};
"""

LOAD_CLIPS = """
const done = arguments[arguments.length - 1];
Promise.all([...document.querySelectorAll('audio')].map(a => new Promise(ok => {
  a.addEventListener('loadedmetadata', () => ok([a.src, a.duration]), {once: true});
  a.addEventListener('error', () => ok([a.src, null]), {once: true});
  a.load();
}))).then(done);
"""


@needs_chromium
def test_report_renders_in_chromium(case, tmp_path):
    metrics, captions, fnames = case["metrics"], case["captions"], case["fnames"]
    with chromium(tmp_path / "profile") as driver:
        driver.set_script_timeout(30)
        states, loaded = [], []
        for page in case["pages"]:
            driver.get(page.as_uri())
            states.append(driver.execute_script(PAGE_STATE))
            loaded += driver.execute_async_script(LOAD_CLIPS)  # the browser reads every clip: it plays
    trained, untrained = states
    assert trained["title"] == trained["h1"] == "Retrieval report: evaluation"
    assert untrained["title"] == "Retrieval report: evaluation (untrained model)"
    header, *rows = trained["metrics"]
    assert [r[0].split()[0] for r in rows] == ["t2a", "a2t", "a2t_any"] and "CLAP-style" in rows[2][0]
    for row, direction in zip(rows, ("t2a", "a2t", "a2t_any")):
        for name, cell in zip(header[1:], row[1:]):
            value = metrics[direction].get(name.replace(" ", "_"))
            assert cell == ("–" if value is None else f"{value:.1f}" if "rank" in name else f"{value:.3f}")
    assert len(trained["images"]) == 3 and len(untrained["images"]) == 2  # no search.png without an experiment
    assert all(complete and width > 0 for state in states for complete, width in state["images"])
    for state in states:
        assert state["audio"] and all(preload == "none" for _, preload in state["audio"])
        files = [Path(unquote(urlparse(src).path)) for src, _ in state["audio"]]
        assert all(f.is_file() and f.parent == case["data"] / SPLIT for f in files)
        assert {f.name for f in files} == case["shown"]
        assert state["best"] == [captions[c] for c in case["best"]]
        assert state["worst"] == [captions[c] for c in case["worst"]]
        assert state["hits"] == [fnames[case["caption_audio"][c]] for c in case["best"] + case["worst"]]
    for src, seconds in loaded:
        assert seconds == pytest.approx(sf.info(unquote(urlparse(src).path)).duration, abs=0.01), src
    assert trained["searchRows"] == 3 and not trained["search"]
    assert untrained["searchRows"] == 0 and "No search results" in untrained["search"][0]
