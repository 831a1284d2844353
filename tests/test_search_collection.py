"""Searching a collection: the index file (nested folders, resuming, the model check), exact search against plain
references, the text-aware re-rank, the optional libraries' glue, 200,000 vectors, and the page in Chromium."""

from __future__ import annotations

import importlib.machinery
import json
import re
import shutil
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from browser import chromium, needs_chromium
from conftest import REPO_ROOT, TINY_OVERRIDES

import example.index as index_script
from example.index import build_index
from example.search import CollectionSearch
from example.search import main as search_main
from example.search_app import make_server, only_this_machine
from utils.cli import SEARCH_BACKENDS
from utils.config import load_raw, validate, with_overrides
from utils.errors import InputError
from utils.inference import AudioEmbeddings, encode_audio_files, encode_captions, load_for_inference, score_pairs
from utils.training import train
from utils.vector_index import (
    BACKENDS,
    ExactSearch,
    IndexInfo,
    IndexWriter,
    config_hash,
    create_index,
    read_fnames,
    read_frames,
    read_info,
    read_vectors,
    top_k,
)

QUERIES = ["Three high beeps, then a burst of static noise.", "A low electrical hum followed by a rising whistle."]
NESTED = ["a.wav", "b.wav", "c.wav", "birds/d.wav", "birds/e.wav", "birds/night/f.wav", "birds/night/g.wav", "h.WAV"]


def trained_checkpoint(raw: dict, target: Path) -> Path:
    """Train ``raw`` for its one epoch and keep the checkpoint at ``target``."""
    target.mkdir(parents=True)
    train(validate(raw), lambda metrics, folder: shutil.copy(Path(folder) / "checkpoint.pt", target))
    return target / "checkpoint.pt"


@pytest.fixture(scope="module")
def models(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """Two checkpoints trained one epoch on the tiny dataset: the tiny config, and the same with a TAP head."""
    folder = tmp_path_factory.mktemp("search_models")
    raw = load_raw(REPO_ROOT / "conf.yaml", TINY_OVERRIDES + [f"data.dataset_dir={tiny_dataset}"])
    tap = with_overrides(raw, {"model.pooling": {"name": "TextAwareAttentionPooling", "proj_dim": 12}})
    return {"plain": trained_checkpoint(raw, folder / "plain"), "tap": trained_checkpoint(tap, folder / "tap")}


@pytest.fixture(scope="module")
def collection(tiny_dataset, tmp_path_factory) -> Path:
    """Eight demo clips in nested folders (one with an upper-case suffix), an unreadable .wav and a text file."""
    folder = tmp_path_factory.mktemp("collection")
    clips = sorted((tiny_dataset / "development").glob("*.wav"))
    for name, clip in zip(NESTED, clips):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, folder / name)
    (folder / "birds" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    (folder / "notes.txt").write_text("not audio")
    return folder


@pytest.fixture(scope="module")
def plain_index(models, collection, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("indexes") / "plain.h5"
    build_index(models["plain"], collection, path, batch_size=3)
    return path


def test_index_holds_every_readable_file_of_the_nested_folder_as_the_model_embeds_it(models, collection, plain_index):
    model, config, device = load_for_inference(models["plain"], "cpu")
    info, names = read_info(plain_index), read_fnames(plain_index)
    assert names == sorted(NESTED) and "birds/broken.wav" not in names  # nested, any case; the bad file skipped
    root = str(collection.resolve())
    assert info == IndexInfo(config_hash(config), str(models["plain"].resolve()), root, 16, False, 8)
    vectors = read_vectors(plain_index)
    assert vectors.dtype == torch.float16 and vectors.shape == (8, 16)
    expected = encode_audio_files(model, config, [collection / n for n in names], device).frames[:, 0]  # (8, 16)
    assert torch.allclose(vectors.float(), expected, atol=1e-3)
    with h5py.File(plain_index) as f:  # plain arrays and strings, nothing else
        assert set(f) == {"vectors", "fnames"} and f["fnames"].dtype.kind == "O"


def test_an_interrupted_run_resumes_to_the_same_index_and_reruns_add_only_new_files(
    models, collection, plain_index, tmp_path, monkeypatch
):
    path, calls = tmp_path / "resumed.h5", []
    write_batch = index_script.write_batch

    def interrupted(*args):  # Ctrl-C after the second batch was written
        write_batch(*args)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(index_script, "write_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(models["plain"], collection, path, batch_size=2)
    partial = tmp_path / "resumed.h5.partial"
    assert not path.exists() and read_info(partial).count == 3  # whole batches (one bad file), unpublished
    monkeypatch.setattr(index_script, "write_batch", write_batch)
    build_index(models["plain"], collection, path, batch_size=2)
    assert not partial.exists() and len(calls) == 2
    assert read_fnames(path) == read_fnames(plain_index)
    assert torch.equal(read_vectors(path), read_vectors(plain_index))  # the same index as one run

    # files added later: only they are embedded, after the others
    extra = tmp_path / "extra"
    shutil.copytree(collection, extra)
    shutil.copy(collection / "a.wav", extra / "birds" / "z.wav")
    build_index(models["plain"], extra, tmp_path / "extra.h5")
    written = (tmp_path / "extra.h5").stat().st_mtime_ns
    build_index(models["plain"], extra, tmp_path / "extra.h5")  # only the unreadable file to try again
    assert (tmp_path / "extra.h5").stat().st_mtime_ns == written  # nothing added: not rewritten
    shutil.copy(collection / "b.wav", extra / "aa.wav")
    embedded = []
    monkeypatch.setattr(index_script, "write_batch", lambda writer, model, views: embedded.append(list(views)))
    build_index(models["plain"], extra, tmp_path / "extra.h5")
    assert embedded == [["aa.wav"]]


def test_an_index_refuses_another_models_vectors_and_another_folder(
    models, collection, plain_index, tmp_path, monkeypatch
):
    with pytest.raises(InputError, match=r"made by another model \(config hash .*give --rebuild"):
        build_index(models["tap"], collection, plain_index)
    with pytest.raises(InputError, match="made by another model"):
        CollectionSearch(plain_index, models["tap"], "cpu")
    (tmp_path / "other").mkdir()
    shutil.copy(collection / "a.wav", tmp_path / "other" / "a.wav")
    other = re.escape(f"indexes {collection.resolve()}, not {(tmp_path / 'other').resolve()}: give that --folder")
    with pytest.raises(InputError, match=other):
        build_index(models["plain"], tmp_path / "other", plain_index)
    copy = tmp_path / "copy.h5"
    shutil.copy(plain_index, copy)
    assert build_index(models["plain"], tmp_path / "other", copy, rebuild=True).count == 1
    assert read_fnames(copy) == ["a.wav"] and read_fnames(plain_index) == sorted(NESTED)
    with h5py.File(copy, "r+") as f:
        f.attrs["model"] = str(tmp_path / "moved" / "checkpoint.pt")
    with pytest.raises(InputError, match="moved/checkpoint.pt is gone; give --checkpoint"):
        CollectionSearch(copy)
    sequence = types.SimpleNamespace(sequence=True)  # an audio2img model: prompt sequences, no clip vectors
    config = types.SimpleNamespace(
        model=types.SimpleNamespace(pooling=types.SimpleNamespace(name="SequenceResampling"))
    )
    monkeypatch.setattr(index_script, "load_for_inference", lambda path, device: (sequence, config, "cpu"))
    with pytest.raises(InputError, match=r"a sequence head \(SequenceResampling\) gives prompt sequences"):
        build_index(models["plain"], collection, tmp_path / "sequence.h5")
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not audio")
    with pytest.raises(InputError, match="no audio files"):
        build_index(models["plain"], tmp_path / "empty", tmp_path / "none.h5")


def test_text_and_audio_search_equal_a_plain_reference(models, collection, plain_index, tmp_path, capsys):
    search = CollectionSearch(plain_index, device="cpu")
    assert search.vectors.backend == "torch"  # neither faiss nor usearch is installed here
    names, vectors = read_fnames(plain_index), read_vectors(plain_index)

    def reference(query: torch.Tensor, top: int, skip: str | None = None) -> list[tuple[str, float]]:
        scored = [(name, float(v.float() @ query)) for name, v in zip(names, vectors) if name != skip]
        return sorted(scored, key=lambda hit: -hit[1])[:top]

    def assert_hits(found, expected):
        assert [name for name, _ in found] == [name for name, _ in expected]
        assert np.allclose([s for _, s in found], [s for _, s in expected], atol=1e-6)

    text = encode_captions(search.model, search.config, QUERIES, search.device)
    for query, hits in zip(text, search.text(QUERIES, top=5)):
        assert_hits(hits, reference(query, 5))
    outside = tmp_path / "query.wav"
    shutil.copy(collection / "birds" / "d.wav", outside)
    queries = [collection / "birds" / "d.wav", outside]
    audio = encode_audio_files(search.model, search.config, queries, search.device).frames[:, 0]
    inside_hits, outside_hits = search.audio(queries, top=20)
    assert_hits(inside_hits, reference(audio[0], 20, skip="birds/d.wav"))  # the query file is not its own result
    assert_hits(outside_hits, reference(audio[1], 20))
    assert len(inside_hits) == 7 and outside_hits[0][0] == "birds/d.wav"  # its copy: the same sound

    sys_argv = ["search.py", "--index", str(plain_index), "--text", QUERIES[0], "--top", "3", "--json"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [*sys_argv, "--device", "cpu"])
        search_main()
    printed = json.loads(capsys.readouterr().out)
    assert printed == [{"kind": "text", "query": QUERIES[0], "results": [
        {"file": name, "score": round(score, 6)} for name, score in search.text(QUERIES[:1], 3)[0]
    ]}]  # fmt: skip


def test_tap_search_reranks_its_shortlist_by_the_models_own_pair_scores(models, collection, tmp_path):
    path = tmp_path / "tap.h5"
    build_index(models["tap"], collection, path, batch_size=5)
    search = CollectionSearch(path, device="cpu")
    names, vectors = read_fnames(path), read_vectors(path)
    stored = read_frames(path, list(range(len(names))))
    fresh = encode_audio_files(search.model, search.config, [collection / n for n in names], search.device)
    for i, frames in enumerate(stored):  # each file's projected frames, and their normalised mean as its vector
        assert torch.allclose(frames.float(), fresh.frames[i, : fresh.lengths[i]], atol=2e-3)
        assert torch.allclose(vectors[i].float(), F.normalize(frames.float().mean(0), dim=0), atol=2e-3)

    text = encode_captions(search.model, search.config, QUERIES, search.device)
    for query, hits in zip(text, search.text(QUERIES, top=3, shortlist=5)):
        by_mean = sorted(range(len(names)), key=lambda i: -float(vectors[i].float() @ query))[:5]
        clips = AudioEmbeddings(
            torch.nn.utils.rnn.pad_sequence([stored[i].float() for i in by_mean], batch_first=True),
            torch.tensor([len(stored[i]) for i in by_mean]),
        )
        pair = score_pairs(search.model, search.device, clips, query[None])[:, 0]  # the model's own scores
        expected = sorted(zip([names[i] for i in by_mean], pair.tolist()), key=lambda hit: -hit[1])[:3]
        assert [n for n, _ in hits] == [n for n, _ in expected]
        assert np.allclose([s for _, s in hits], [s for _, s in expected], atol=1e-5)
    # a shortlist of every file: the model's ranking of the whole collection, up to the stored frames' float16
    everything = score_pairs(search.model, search.device, fresh, text)  # (8, 2)
    for column, hits in enumerate(search.text(QUERIES, top=8, shortlist=100)):
        assert np.allclose(sorted((s for _, s in hits), reverse=True), [s for _, s in hits])
        scores = dict(hits)
        assert np.allclose([scores[n] for n in names], everything[:, column], atol=5e-3)


def test_exact_search_merges_chunks_excludes_rows_and_the_optional_libraries_agree(monkeypatch):
    torch.manual_seed(0)
    vectors = F.normalize(torch.randn(1000, 16), dim=-1).half()
    queries = F.normalize(torch.randn(3, 16), dim=-1)
    exclude = torch.tensor([-1, 5, 999])
    full = queries @ vectors.float().T  # (3, 1000)
    full[[1, 2], [5, 999]] = float("-inf")
    expected_values, expected_rows = full.sort(dim=1, descending=True, stable=True)
    for chunk_rows in (64, 1000, 4096):
        values, rows = top_k(queries, vectors, 7, exclude, chunk_rows)
        assert torch.equal(rows, expected_rows[:, :7]) and torch.allclose(values, expected_values[:, :7])
    assert top_k(queries, vectors[:4], 10)[1].shape == (3, 4)  # k beyond n: every row

    class FlatIP:  # faiss.IndexFlatIP as documented: add float32 rows, search -> (scores, rows), best first
        def __init__(self, dim):
            self.rows = np.empty((0, dim), np.float32)

        def add(self, rows):
            self.rows = np.concatenate([self.rows, rows])

        def search(self, found, k):
            scores = found @ self.rows.T
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, order, 1), order

    def usearch_search(dataset, found, count, metric, exact):  # usearch.index.search: distances 1 - a.b
        assert metric == "ip" and exact
        scores = found @ dataset.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :count]
        keys, distances = order.astype(np.uint64), 1 - np.take_along_axis(scores, order, 1)
        return types.SimpleNamespace(keys=keys[0], distances=distances[0]) if len(found) == 1 else (
            types.SimpleNamespace(keys=keys, distances=distances)
        )  # fmt: skip

    fakes = {
        "faiss": {"IndexFlatIP": FlatIP},
        "usearch": {},
        "usearch.index": {"search": usearch_search, "MetricKind": types.SimpleNamespace(IP="ip")},
    }
    for name, members in fakes.items():
        module = types.ModuleType(name)
        module.__dict__.update(members, __spec__=importlib.machinery.ModuleSpec(name, None))
        monkeypatch.setitem(sys.modules, name, module)
    assert ExactSearch(vectors).backend == "faiss"  # auto: an installed library
    for backend in ("faiss", "usearch"):
        search = ExactSearch(vectors, backend)
        values, rows = search.search(queries, 7, exclude)
        assert torch.equal(rows, expected_rows[:, :7]) and torch.allclose(values, expected_values[:, :7], atol=1e-6)
        values, rows = search.search(queries[:1], 3)
        assert torch.equal(rows, expected_rows[:1, :3])
    assert BACKENDS == SEARCH_BACKENDS


def test_exact_search_over_200000_vectors_answers_within_a_second(capsys):
    torch.manual_seed(0)
    vectors = F.normalize(torch.randn(200_000, 512), dim=-1).half()
    query = F.normalize(torch.randn(1, 512), dim=-1)
    expected_values, expected_rows = (query @ vectors.float().T).topk(10, dim=1)
    # held as float32 (the default up to 1 GB), and converted chunk by chunk from float16
    for label, float32_mb in (("float32 copy", 1024), ("float16, per chunk", 0)):
        search = ExactSearch(vectors, "torch", float32_mb=float32_mb)
        search.search(query, 10)  # warm-up: first-call allocations
        start = time.perf_counter()
        values, rows = search.search(query, 10)
        seconds = time.perf_counter() - start
        assert torch.equal(rows, expected_rows) and torch.allclose(values, expected_values)
        with capsys.disabled():
            print(f"\nexact top-10 of 200,000 x 512 vectors, {label}: {seconds * 1000:.0f} ms", end="")
        assert seconds < 2.0


def test_an_index_writer_drops_rows_an_interrupted_write_left_past_the_count(tmp_path):
    path = tmp_path / "index.h5"
    create_index(path, IndexInfo("hash", "model", "root", 4, True))
    with IndexWriter(path) as writer:
        writer.append(["x.wav", "y.wav"], torch.eye(4)[:2], torch.ones(5, 4), torch.tensor([2, 3]))
        f = writer.file
        for name, size in (("vectors", 3), ("fnames", 3), ("offsets", 4), ("frames", 9)):
            f[name].resize(size, axis=0)  # a third row half written: resized, never counted
    with IndexWriter(path) as writer:
        writer.append(["z.wav"], torch.eye(4)[2:3], 2 * torch.ones(1, 4), torch.tensor([1]))
    assert read_fnames(path) == ["x.wav", "y.wav", "z.wav"]
    assert [len(frames) for frames in read_frames(path, [0, 1, 2])] == [2, 3, 1]
    assert read_frames(path, [2])[0].tolist() == [[2.0] * 4]
    (tmp_path / "other.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="not a readable HDF5 index"):
        read_info(tmp_path / "other.h5")


@needs_chromium
def test_the_page_finds_and_plays_indexed_files_and_serves_nothing_else(plain_index, collection, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert only_this_machine("127.0.0.1") and only_this_machine("localhost") and not only_this_machine("0.0.0.0")
    search = CollectionSearch(plain_index, device="cpu")
    server = make_server(search, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def status(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url + path, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, b""

    try:
        with chromium(tmp_path / "profile") as driver:
            driver.get(url + "/")
            box = driver.find_element(By.ID, "q")
            box.clear()
            box.send_keys(QUERIES[0])
            driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.result")) == 8)
            rows = driver.find_elements(By.CSS_SELECTOR, "li.result")
            shown = [row.find_element(By.CLASS_NAME, "file").text for row in rows]
            assert shown == [name for name, _ in search.text(QUERIES[:1], 10)[0]]
            sources = [row.find_element(By.TAG_NAME, "audio").get_attribute("src") for row in rows]
        for name, source in zip(shown, sources):
            code, body = status(source.removeprefix(url))
            assert code == 200 and body == (collection / name).read_bytes()
        for refused in ("/audio?f=../../etc/passwd", "/audio?f=birds/broken.wav", "/audio?f=notes.txt", "/other"):
            assert status(refused)[0] == 404, refused
        assert status("/api/search?q=&k=3")[0] == 400 and status("/api/search?q=hum&k=1000")[0] == 400
        code, body = status("/api/search?q=hum&k=3")
        assert code == 200 and len(json.loads(body)["results"]) == 3
        # a page that rebinds its own domain to 127.0.0.1 reaches the port under its own name: refused
        rebound = urllib.request.Request(url + "/api/search?q=hum&k=3", headers={"Host": "attacker.example:80"})
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(rebound, timeout=30)
        local = urllib.request.Request(url + "/", headers={"Host": f"localhost:{server.server_address[1]}"})
        assert urllib.request.urlopen(local, timeout=30).status == 200
    finally:
        server.shutdown()
        server.server_close()
