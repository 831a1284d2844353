"""The HTML evaluation report of ``xmodal_retrieval.py --report``: one self-contained page and its PNG figures.

``{split}.report.html`` holds the metrics table (both audio-to-text protocols labelled), the experiment's
search results and ``search.png``, a recall@k curve and a rank histogram, and a gallery of the best- and
worst-ranked captions with their top clips, each playable in the page. The figures are also written beside
the page (``{split}.report/recall_at_k.png``, ``rank_histogram.png``) and embedded in it as data URIs, so the
page is one file; the clips are referred to by their path relative to the page, so the page and the dataset
can move together. No Ray and no training here.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from pandas.api.types import is_numeric_dtype

from utils.experiments import BEST_FILE
from utils.metrics import caption_ranks
from utils.reporting import RESULTS_TABLE, SEARCH_PLOT
from utils.stores import atomic_path, read_csv

log = logging.getLogger("report")

MAX_K = 50  # the recall@k curve's last k
TOP_CLIPS = 5  # clips shown per caption in the gallery
RECALL_PLOT, RANK_PLOT = "recall_at_k.png", "rank_histogram.png"
COLOURS = {"t2a": "#2563eb", "a2t": "#ea580c", "a2t_any": "#9333ea"}  # the same in the figures and the page
DIRECTIONS = {  # metrics key -> (what it is, how it counts)
    "t2a": ("text → audio", "each caption retrieves its one clip"),
    "a2t": ("audio → text, DCASE-normalised", "R@k over all of the clip's captions: R@1 at most 1 / their number"),
    "a2t_any": ("audio → text, CLAP-style", "a hit when any of the clip's captions is in the top k"),
}


@dataclass
class RetrievalRanks:
    """The 1-based ranks behind the report's figures (ties broken by index, as a stable sort breaks them)."""

    t2a: torch.Tensor  # (n_captions,) each caption's rank of its clip among all clips
    a2t: torch.Tensor  # (n_captions,) each caption's rank among all captions when its clip is the query
    a2t_first: torch.Tensor  # (n_audio,) each clip's best-ranked caption; n_captions + 1 for a clip without one
    caption_audio: torch.Tensor  # (n_captions,) each caption's clip


def retrieval_ranks(scores: np.ndarray | torch.Tensor, caption_audio: np.ndarray | torch.Tensor) -> RetrievalRanks:
    """Ranks in both directions from ``scores`` ``(n_audio, n_captions)`` and ``caption_audio`` ``(n_captions,)``."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    caption_audio = torch.as_tensor(caption_audio, dtype=torch.long)
    n_audio, n_captions = scores.shape
    order = scores.argsort(dim=1, descending=True, stable=True)  # (n_audio, n_captions): captions, best first
    positions = torch.arange(1, n_captions + 1).expand(n_audio, n_captions)
    rank_of = torch.empty_like(order).scatter_(1, order, positions)  # (n_audio, n_captions): each caption's rank
    a2t = rank_of[caption_audio, torch.arange(n_captions)]
    first = torch.full((n_audio,), n_captions + 1).scatter_reduce(0, caption_audio, a2t, "amin")
    return RetrievalRanks(caption_ranks(scores, caption_audio), a2t, first, caption_audio)


def recall_at_k(ranks: RetrievalRanks, max_k: int = MAX_K) -> dict[str, np.ndarray]:
    """Recall@k for k = 1..``max_k``, each ``(max_k,)``: ``t2a``, ``a2t`` (relevant captions in the top k over all
    of the clip's captions, a clip without captions counting 0, as ``retrieval_metrics``) and ``a2t_any`` (1 when
    any of them is)."""
    ks = torch.arange(1, max_k + 1)
    n_audio = ranks.a2t_first.size(0)
    within = (ranks.a2t[:, None] <= ks[None, :]).float()  # (n_captions, max_k)
    per_clip = torch.zeros(n_audio, max_k).index_add_(0, ranks.caption_audio, within)  # (n_audio, max_k)
    n_relevant = torch.bincount(ranks.caption_audio, minlength=n_audio)  # (n_audio,)
    any_hit = (ranks.a2t_first[:, None] <= ks[None, :]) & (n_relevant[:, None] > 0)  # (n_audio, max_k)
    return {
        "t2a": (ranks.t2a[:, None] <= ks[None, :]).float().mean(dim=0).numpy(),
        "a2t": (per_clip / n_relevant.clamp(min=1)[:, None]).mean(dim=0).numpy(),
        "a2t_any": any_hit.float().mean(dim=0).numpy(),
    }


def gallery_captions(t2a_ranks: torch.Tensor, n: int) -> tuple[list[int], list[int]]:
    """The ``n`` best- and the ``n`` worst-ranked captions by their rank of their clip, ties by caption order."""
    best = t2a_ranks.argsort(stable=True)[:n]
    worst = (-t2a_ranks).argsort(stable=True)[:n]
    return best.tolist(), worst.tolist()


def report_file(out_dir: Path, split: str, untrained: bool) -> Path:
    """Where the page goes: ``{split}.report.html``, or ``{split}.report_untrained.html``; its figures go into
    the folder of the same name without ``.html``."""
    return Path(out_dir) / f"{split}.report{'_untrained' if untrained else ''}.html"


def experiment_folder(model_path: Path) -> Path | None:
    """The experiment folder (holding ``best.json``) of a model: its ``best/`` export or a trial's checkpoint
    file or folder inside it; None for a model from elsewhere."""
    model_path = Path(model_path)
    for folder in [model_path, *model_path.parents][:4]:  # checkpoint.pt / checkpoint_n / trial / experiment
        if (folder / BEST_FILE).is_file():
            return folder
    return None


def _png(fig, path: Path) -> bytes:
    """Save ``fig`` as a PNG at ``path`` (atomically), close it and return the bytes for the page."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    with atomic_path(path) as partial_file:
        partial_file.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _axes(figsize: tuple[float, float]):
    """A figure and axes in the page's style (Agg: files only, no display on servers or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=150)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25)
    return fig, ax


def plot_recall(curves: dict[str, np.ndarray], path: Path) -> bytes:
    """PNG of recall@k against k, one line per direction and protocol; returns its bytes."""
    fig, ax = _axes((6.4, 4.0))
    ks = np.arange(1, len(curves["t2a"]) + 1)
    for name, curve in curves.items():
        label = f"{name}: {DIRECTIONS[name][0]}"
        ax.plot(ks, curve, color=COLOURS[name], lw=2, ls="--" if name == "a2t_any" else "-", label=label)
    ax.set(xlim=(1, ks[-1]), ylim=(0, 1.02), xlabel="k", ylabel="recall@k", title=f"Recall@k, k = 1 … {ks[-1]}")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig, path)


def plot_ranks(ranks: RetrievalRanks, path: Path) -> bytes:
    """PNG histogram (log-spaced bins) of each caption's rank of its clip and of each clip's first relevant
    caption, as shares of the queries, with their medians; returns its bytes."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, ax = _axes((6.4, 4.0))
    top = int(max(ranks.t2a.max(), ranks.a2t_first.max()))
    edges = np.unique(np.round(np.geomspace(1, top + 1, 30)))
    for name, values, what in (("t2a", ranks.t2a, "caption's clip"), ("a2t", ranks.a2t_first, "clip's first caption")):
        values = values.numpy()
        weights = np.full(len(values), 1 / len(values))
        colour = COLOURS[name]
        ax.hist(values, bins=edges, weights=weights, color=colour, alpha=0.25, histtype="stepfilled")
        ax.hist(values, bins=edges, weights=weights, color=colour, lw=1.5, histtype="step", label=f"{name}: {what}")
        ax.axvline(np.median(values), color=colour, ls=":", lw=1.5)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set(xlim=(1, edges[-1]), xlabel="rank (log scale; dotted: median)", ylabel="share of queries")
    ax.set_title("Rank of the first relevant item")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig, path)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes, alt: str, caption: str) -> str:
    return (
        f'<figure><img src="{_data_uri(png)}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _number(value: float, rank: bool) -> str:
    return f"{value:.1f}" if rank else f"{value:.3f}"


def metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """The metrics as an HTML table: one row per direction and protocol, ``–`` where a protocol has none."""
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    head = "".join(f"<th>{html.escape(name.replace('_', ' '))}</th>" for name in names)
    rows = []
    for direction, values in metrics.items():
        label, how = DIRECTIONS.get(direction, (direction, ""))
        cells = "".join(
            f"<td>{_number(values[n], n.endswith('rank'))}</td>" if n in values else '<td class="none">–</td>'
            for n in names
        )
        rows.append(
            f'<tr><th scope="row"><span class="dot" style="background:{COLOURS.get(direction, "#64748b")}"></span>'
            f"<code>{html.escape(direction)}</code> {html.escape(label)}<small>{html.escape(how)}</small></th>"
            f"{cells}</tr>"
        )
    return (
        f'<table class="metrics"><thead><tr><th>direction</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _cell(value: object) -> str:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return f"<td>{value}</td>"
    if isinstance(value, float):
        if np.isnan(value):
            return '<td class="none">–</td>'
        return f"<td>{int(value) if value.is_integer() and abs(value) >= 1 else f'{value:.4g}'}</td>"
    return f'<td class="text">{html.escape(str(value))}</td>'


def search_section(experiment: Path | None, model: str) -> str:
    """The experiment's ``results.csv`` (validation metrics; training columns left out) and ``search.png``,
    or a note saying why there are none."""
    if experiment is None:
        return (
            f'<p class="empty">No search results: the model ({html.escape(model)}) is not inside an experiment '
            f"folder (none of its folders holds {BEST_FILE}), e.g. a checkpoint given with --checkpoint.</p>"
        )
    parts = [f'<p class="meta">experiment folder <code>{html.escape(str(experiment))}</code></p>']
    table_file, plot_file = experiment / RESULTS_TABLE, experiment / SEARCH_PLOT
    if table_file.is_file():
        table = read_csv(table_file, ("trial_id", "status"), dtype={"trial_id": str})
        table = table[[c for c in table.columns if not str(c).startswith("train/")]]
        names = {c: html.escape(str(c).removeprefix("param/")) for c in table.columns}
        head = "".join(  # text columns (ids, status, presets) left-aligned like their cells
            f"<th{'' if is_numeric_dtype(table[c]) else ' class=text'}>{names[c]}</th>" for c in table.columns
        )
        rows = "".join(
            f"<tr{' class=best' if i == 0 else ''}>{''.join(_cell(v) for v in row)}</tr>"
            for i, row in enumerate(table.itertuples(index=False))
        )
        parts.append(
            f'<div class="scroll"><table class="search"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
            f'</div><p class="note">One row per trial at its best epoch, best first (highlighted).</p>'
        )
    else:
        parts.append(f'<p class="empty">{RESULTS_TABLE} is not in the experiment folder.</p>')
    if plot_file.is_file():
        parts.append(_figure(plot_file.read_bytes(), "search plot", f"{SEARCH_PLOT}: the selection metric per epoch"))
    else:
        parts.append(f'<p class="empty">{SEARCH_PLOT} is not in the experiment folder.</p>')
    return "".join(parts)


def _clip_row(position: int, fname: str, score: float, src: str, hit: bool) -> str:
    mark = '<span class="tag">its clip</span>' if hit else ""
    kind = "clip" + (" hit" if hit else "") + (" beyond" if position > TOP_CLIPS else "")
    return (
        f'<li class="{kind}"><span class="pos">{position}</span>'
        f'<span class="name"><span class="fname" title="{html.escape(fname)}">{html.escape(fname)}</span>{mark}</span>'
        f'<span class="score">{score:.3f}</span>'
        f'<audio controls preload="none" src="{src}"></audio></li>'
    )


def _rank_class(rank: int) -> str:
    return "r1" if rank == 1 else "top" if rank <= 10 else "miss"


def gallery(
    chosen: list[int],
    scores: torch.Tensor,
    ranks: torch.Tensor,
    fnames: list[str],
    captions: list[str],
    caption_audio: torch.Tensor,
    sources: list[str],
) -> str:
    """Cards for the ``chosen`` captions: each with its top clips (file name, score, player; its own clip
    highlighted, and added below when it is not among them) and its rank of its clip."""
    n_audio = scores.size(0)
    k = min(TOP_CLIPS, n_audio)
    top = scores.T[chosen].argsort(dim=1, descending=True, stable=True)[:, :k]  # (len(chosen), k), best first
    cards = []
    for caption, row in zip(chosen, top.tolist()):
        clip, rank = int(caption_audio[caption]), int(ranks[caption])
        clips = [
            _clip_row(p + 1, fnames[a], float(scores[a, caption]), sources[a], a == clip) for p, a in enumerate(row)
        ]
        if clip not in row:
            clips.append(_clip_row(rank, fnames[clip], float(scores[clip, caption]), sources[clip], True))
        cards.append(
            f'<article class="example"><header><p class="caption">{html.escape(captions[caption])}</p>'
            f'<span class="rank {_rank_class(rank)}">its clip at rank {rank} of {n_audio}</span></header>'
            f'<ol class="clips">{"".join(clips)}</ol></article>'
        )
    return "".join(cards)


def audio_source(clip: Path, page_dir: Path) -> str:
    """A clip's ``src``: its path relative to the page's folder, URL-quoted and HTML-escaped."""
    relative = Path(os.path.relpath(os.path.abspath(clip), os.path.abspath(page_dir))).as_posix()
    return html.escape(quote(relative), quote=True)


STYLE = """
:root { --ink: #0f172a; --muted: #64748b; --line: #e2e8f0; --soft: #f8fafc; --accent: #2563eb;
  --good: #15803d; --good-bg: #f0fdf4; --warn: #b45309; --bad: #b91c1c; }
* { box-sizing: border-box; }
body { margin: 0; background: #f1f5f9; color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 32px 28px 56px; }
header.page h1 { margin: 0 0 4px; font-size: 26px; letter-spacing: -0.01em; }
.meta { color: var(--muted); margin: 0; font-size: 13.5px; }
.meta code, code { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
nav { margin: 14px 0 0; display: flex; gap: 18px; font-size: 13.5px; }
nav a { color: var(--accent); text-decoration: none; }
section { background: #fff; border: 1px solid var(--line); border-radius: 12px; padding: 20px 24px;
  margin-top: 22px; box-shadow: 0 1px 2px rgba(15, 23, 42, 0.04); }
h2 { margin: 0 0 14px; font-size: 18px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 8px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
thead th { font-size: 12.5px; color: var(--muted); font-weight: 600; background: var(--soft);
  border-bottom: 1px solid #cbd5e1; }
thead th:first-child, th[scope=row], th.text, td.text { text-align: left; }
tbody tr:nth-child(even) { background: var(--soft); }
tbody tr:hover { background: #eef2ff; }
th[scope=row] { font-weight: 600; white-space: normal; min-width: 250px; }
th[scope=row] small { display: block; font-weight: 400; color: var(--muted); font-size: 12px; }
th[scope=row] code { font-weight: 700; margin-right: 4px; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 7px; }
td.none { color: #cbd5e1; text-align: center; }
.note { color: var(--muted); font-size: 13px; margin: 10px 0 0; }
.empty { color: var(--muted); background: var(--soft); border: 1px dashed #cbd5e1; border-radius: 8px;
  padding: 12px 14px; margin: 10px 0 0; }
.scroll { overflow-x: auto; margin-top: 10px; }
table.search { font-size: 13px; }
table.search th, table.search td { padding: 7px 9px; }
table.search tr.best { background: var(--good-bg); box-shadow: inset 3px 0 0 var(--good); }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 18px; }
figure { margin: 14px 0 0; }
figure img { display: block; width: 100%; height: auto; border: 1px solid var(--line); border-radius: 8px; }
.figures figure { margin: 0; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
#search figure img { width: auto; max-width: 100%; }
#search figure { display: inline-block; max-width: 100%; }
.cards { display: grid; gap: 12px; }
article.example { border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; display: grid;
  grid-template-columns: minmax(220px, 32%) minmax(0, 1fr); gap: 18px; align-items: start; }
article.example header { display: flex; flex-direction: column; align-items: flex-start; gap: 10px; }
.caption { margin: 0; font-size: 15px; font-weight: 600; line-height: 1.45; }
.caption::before { content: "“"; color: var(--muted); } .caption::after { content: "”"; color: var(--muted); }
.rank { flex: none; font-size: 12.5px; font-weight: 600; padding: 2px 10px; border-radius: 999px; }
.rank.r1 { color: var(--good); background: #dcfce7; } .rank.top { color: var(--warn); background: #fef3c7; }
.rank.miss { color: var(--bad); background: #fee2e2; }
ol.clips { list-style: none; margin: 0; padding: 0; }
li.clip { display: grid; grid-template-columns: 30px minmax(0, 1fr) 52px 260px; gap: 10px; align-items: center;
  padding: 2px 8px; border-radius: 6px; }
li.clip.beyond { margin-top: 8px; position: relative; }
li.clip.beyond::before { content: "⋯"; position: absolute; top: -13px; left: 16px; color: var(--muted);
  font-size: 12px; line-height: 1; }
li.clip + li.clip { margin-top: 2px; }
li.clip.hit { background: var(--good-bg); box-shadow: inset 3px 0 0 var(--good); }
.pos { color: var(--muted); font-variant-numeric: tabular-nums; text-align: right; }
.name { display: flex; align-items: center; gap: 8px; min-width: 0; }
.fname { font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; }
.tag { flex: none; font: 600 11px/1 system-ui, sans-serif; color: var(--good); border: 1px solid #86efac;
  border-radius: 999px; padding: 2px 7px; }
.score { font-variant-numeric: tabular-nums; text-align: right; font-size: 13.5px; }
audio { width: 260px; height: 32px; }
"""


def write_report(
    out_dir: Path,
    split: str,
    untrained: bool,
    scores: np.ndarray | torch.Tensor,
    fnames: list[str],
    captions: list[str],
    caption_audio: np.ndarray | torch.Tensor,
    metrics: dict[str, dict[str, float]],
    audio_dir: Path,
    model: str,
    experiment: Path | None,
    examples: int,
) -> Path:
    """Write ``report_file(out_dir, split, untrained)`` and its figures into the folder beside it, from the
    split's ``scores`` ``(n_audio, n_captions)``, its clips' ``fnames`` (files in ``audio_dir``), ``captions`` and
    their ``caption_audio`` ``(n_captions,)``, the ``metrics`` of ``retrieval_metrics``, the ``model``'s name and
    its ``experiment`` folder (None: no search section), with ``examples`` best and worst captions; returns the
    page's path."""
    path = report_file(out_dir, split, untrained)
    scores = torch.as_tensor(scores, dtype=torch.float32)
    caption_audio = torch.as_tensor(caption_audio, dtype=torch.long)
    figures = path.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    ranks = retrieval_ranks(scores, caption_audio)
    recall_png = plot_recall(recall_at_k(ranks), figures / RECALL_PLOT)
    ranks_png = plot_ranks(ranks, figures / RANK_PLOT)

    missing = [f for f in fnames if not (Path(audio_dir) / f).is_file()]
    if missing:
        log.warning(
            "%d of %d clips are not in %s (e.g. %s): the page cannot play them",
            len(missing),
            len(fnames),
            audio_dir,
            missing[0],
        )
    sources = [audio_source(Path(audio_dir) / f, path.parent) for f in fnames]
    best, worst = gallery_captions(ranks.t2a, examples)
    n_audio, n_captions = scores.shape
    title = f"Retrieval report: {split}{' (untrained model)' if untrained else ''}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body><main>
<header class="page"><h1>{html.escape(title)}</h1>
<p class="meta">{n_audio} clips · {n_captions} captions · model <code>{html.escape(model)}</code></p>
<nav><a href="#metrics">Metrics</a><a href="#curves">Recall@k and ranks</a><a href="#search">Search</a>
<a href="#best">Best-ranked captions</a><a href="#worst">Worst-ranked captions</a></nav></header>
<section id="metrics"><h2>Metrics</h2>{metrics_table(metrics)}
<p class="note">DCASE definitions: R@k = relevant items in the top k / the query's relevant items; mAP@10 and
NDCG with binary relevance; mean and median rank of the first relevant item (1 is best). Chance t2a R@1 is
1/{n_audio} = {1 / n_audio:.3f}.</p></section>
<section id="curves"><h2>Recall@k and ranks</h2><div class="figures">
{_figure(recall_png, "recall at k", f"Recall@k for k = 1 … {MAX_K}: t2a, and a2t under both protocols.")}
{_figure(ranks_png, "rank histogram", "t2a: each caption's rank of its clip; a2t: each clip's best-ranked caption.")}
</div></section>
<section id="search"><h2>Hyperparameter search</h2>{search_section(experiment, model)}</section>
<section id="best"><h2>Best-ranked captions</h2><div class="cards">
{gallery(best, scores, ranks.t2a, fnames, captions, caption_audio, sources)}</div></section>
<section id="worst"><h2>Worst-ranked captions</h2><div class="cards">
{gallery(worst, scores, ranks.t2a, fnames, captions, caption_audio, sources)}</div></section>
</main></body></html>
"""
    with atomic_path(path) as partial_file:
        partial_file.write_text(page, encoding="utf-8")
    log.info("wrote %s and its figures in %s", path, figures)
    return path
