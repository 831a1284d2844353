"""The AST tower (``ASTEncoder``, ``ASTInputs``) against plain references: its frames against ``ASTModel`` run
window by window, a clip in a batch against the clip alone, its stores against the tower on raw inputs, and new
files embedded through the tower's own extractor."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT

from models import ASTEncoder
from models.tiny import tiny_ast, tiny_roberta
from models.weights import load_weights
from preprocessing.tower_stores import write_audio_store
from utils.audio import load_audio
from utils.checkpoints import build_model
from utils.config import load_raw, validate, with_overrides
from utils.data import StoredViews, collate_frames
from utils.extractors import ASTInputs, make_extractor
from utils.inference import encode_audio_files

WINDOW, ROWS, COLUMNS = 128, 2, 12  # tiny_ast: 128-frame windows; 32 mel bins and 16x16 patches every 10 -> 2 x 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ast")
    return {"ast": tiny_ast(root / "ast"), "roberta": tiny_roberta(root / "roberta")}


@pytest.fixture(scope="module")
def tower(folders):
    return ASTEncoder(ASTEncoder.Config(model_id=str(folders["ast"]))).eval()


def waves(seconds, rate=16000):
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(s * rate))).astype(np.float32) for s in seconds]


def reference_frames(model, rows):
    """The definition, one window at a time: ``ASTModel`` on each ``(128, 32)`` window of the extractor's output,
    its first 2 tokens (CLS, distillation) dropped, the patches on their frequency x time grid, the mean over
    frequency; the windows' frames one after another -> ``(windows * 12, D)``."""
    frames = []
    for window in torch.from_numpy(rows).split(WINDOW):
        hidden = model(input_values=window[None]).last_hidden_state[0, 2:]  # (ROWS * COLUMNS, D)
        frames.append(hidden.reshape(ROWS, COLUMNS, -1).mean(0))
    return torch.cat(frames)


def test_frames_are_each_windows_patch_columns_averaged_over_frequency(tower):
    extractor = ASTInputs(tower.config)
    (wave,) = waves([3.0])  # 298 frames of 25 ms every 10 ms: 3 windows of 128, the last with 42 frames of audio
    item = extractor.extract(wave, seed=0)
    assert (int(item["windows"]), int(item["n_frames"]), item["rows"].shape) == (3, 298, (3 * WINDOW, 32))
    # the windows are the whole clip's log-mels cut in three, the last padded as the extractor pads a short clip
    fe = extractor.extractor
    assert np.allclose(item["rows"], fe.normalize(fe._extract_fbank_features(wave, 3 * WINDOW)), atol=1e-6)
    with torch.no_grad():
        frames, lengths = tower.frames(**extractor.collate([item]))
        expected = reference_frames(tower.backbone, item["rows"])
    assert frames.shape == (1, 3 * COLUMNS, 32) and torch.allclose(frames[0], expected, atol=1e-5)
    assert lengths.tolist() == [2 * COLUMNS + 5]  # the last window's columns starting at frames 0, 10, ..., 40


def test_the_patch_grid_is_frequency_rows_of_time_columns(tower):
    """The order of ``ASTPatchEmbeddings``' tokens, checked without the tower's reshape: at ``layer=0`` (the
    embeddings) a frame is the mean over frequency of the patch convolution at that time column, plus the mean of
    its position embeddings."""
    layered = ASTEncoder(ASTEncoder.Config(model_id=tower.config.model_id, layer=0)).eval()
    extractor = ASTInputs(layered.config)
    (wave,) = waves([1.0])
    inputs = extractor.collate([extractor.extract(wave, seed=0)])
    embeddings = layered.backbone.embeddings
    with torch.no_grad():
        frames, _ = layered.frames(**inputs)
        spectrogram = inputs["input_values"][:, 0].transpose(1, 2)[:, None]  # (1, 1, mel_bins, time)
        patches = embeddings.patch_embeddings.projection(spectrogram)[0]  # (D, ROWS, COLUMNS)
        positions = embeddings.position_embeddings[0, 2:].reshape(ROWS, COLUMNS, -1)
        expected = patches.mean(1).T + positions.mean(0)  # (COLUMNS, D)
    assert patches.shape[1:] == (ROWS, COLUMNS) and torch.allclose(frames[0], expected, atol=1e-5)


def test_a_clip_gets_in_a_batch_exactly_what_it_gets_alone(tower):
    extractor = ASTInputs(tower.config)
    items = [extractor.extract(w, seed=0) for w in waves([1.0, 4.0, 2.0])]  # 1, 4 and 2 windows
    assert [int(item["windows"]) for item in items] == [1, 4, 2]
    with torch.no_grad():
        frames, lengths = tower.frames(**extractor.collate(items))
        # 98, 398 and 198 frames of audio: 10 columns; 3 windows and 2 columns; 1 window and 7 columns
        assert frames.shape[1] == 4 * COLUMNS and lengths.tolist() == [10, 3 * COLUMNS + 2, COLUMNS + 7]
        for i, item in enumerate(items):
            alone, n = tower.frames(**extractor.collate([item]))
            assert lengths[i] == n[0] and alone.shape[1] == int(item["windows"]) * COLUMNS
            assert torch.allclose(frames[i, : lengths[i]], alone[0, : n[0]], atol=1e-5)
            assert torch.allclose(frames[i, n[0] : alone.shape[1]], alone[0, n[0] :], atol=1e-5)  # padded columns too


def ast_recipe(dataset, folders, runs, adapter):
    """The Whisper recipe with a frozen tiny AST as its audio tower and the tiny RoBERTa as its text tower."""
    raw = load_raw(REPO_ROOT / "example" / "recipes" / "whisper_embedder.yaml")
    return with_overrides(
        raw,
        {
            "data.dataset_dir": str(dataset),
            "device": "cpu",
            "model.audio_enc": {"name": "ASTEncoder", "model_id": str(folders["ast"]), "adapter": adapter},
            "model.text_enc.model_id": str(folders["roberta"]),
            "model.text_enc.max_length": 64,
            "model.embed_dim": 32,  # the tiny RoBERTa's width: the recipe's IdentityProjection keeps it
            "param_conf.num_workers": 0,
            "ray_conf.storage_path": str(runs),
        },
    )


@pytest.mark.parametrize("adapter", [{"kind": "linear", "out_dim": 32}, {"kind": "conv1d", "out_dim": 32}])
def test_cached_ast_outputs_give_the_tower_on_its_stored_inputs(tiny_dataset, folders, tmp_path, adapter):
    """A frozen tower's store (one mean frame per clip with a linear adapter, all valid frames in float16 with a
    convolution) holds the tower's frames on the same clips' stored model inputs, and a model reading the store
    embeds the clips as the same model running the backbone on those inputs does."""
    config = validate(ast_recipe(tiny_dataset, folders, tmp_path, adapter))
    assert config.model.audio_enc.name == "ASTEncoder" and not config.model.audio_enc.trainable
    cpu = torch.device("cpu")
    cached = StoredViews(write_audio_store(config, "validation", cpu), collate_frames, train=False)
    as_inputs = validate(with_overrides(config.model_dump(mode="json"), {"model.audio_enc.trainable": True}))
    extractor = make_extractor(as_inputs.model.audio_enc)
    inputs = StoredViews(write_audio_store(as_inputs, "validation", cpu), extractor.collate, train=False)
    fids = sorted(inputs.fids)
    assert fids == sorted(cached.fids) and len(fids) == 12
    raw_items, stored = [inputs.views(fid)[0] for fid in fids], [cached.views(fid)[0] for fid in fids]
    assert max(int(item["windows"]) for item in raw_items) > 1  # the demo clips need several windows
    # a stored item is a fresh one: the inputs store holds what ASTInputs makes of the clip
    fname = pd.read_csv(tiny_dataset / "validation_audio.csv").set_index("fid")["fname"][fids[0]]
    fresh = extractor.extract(load_audio(tiny_dataset / "validation" / fname, extractor.sample_rate), seed=0)
    assert fresh.keys() == raw_items[0].keys() and np.array_equal(fresh["rows"], raw_items[0]["rows"])
    assert all(int(fresh[name]) == int(raw_items[0][name]) for name in ("windows", "n_frames"))
    raw_inputs = extractor.collate(raw_items)
    torch.manual_seed(0)
    model = build_model(config, cpu, inputs={"audio_dim": 32})  # reads the store: no backbone
    running = build_model(config, cpu, inputs={}, backbones=True)  # the frozen AST, run on the inputs
    load_weights(running, model.state_dict(), "cached model")
    assert model.audio_encoder.backbone is None and running.audio_encoder.backbone is not None
    model.eval(), running.eval()
    atol = 1e-5 if adapter["kind"] == "linear" else 5e-3  # the frames store is float16
    with torch.no_grad():
        frames, lengths = running.audio_encoder.frames(**raw_inputs)
        for i, item in enumerate(stored):  # the store: the mean frame, or every valid frame
            expected = (
                frames[i, : lengths[i]].mean(0, keepdim=True)
                if adapter["kind"] == "linear"
                else frames[i, : lengths[i]]
            )
            rows = torch.from_numpy(item["rows"]).float()
            assert rows.shape == expected.shape and torch.allclose(rows, expected, atol=atol)
        from_store = model.encode_audio(**collate_frames(stored))
        from_inputs = running.encode_audio(**raw_inputs)
    assert from_store.shape == (12, 32) and torch.allclose(from_store, from_inputs, atol=atol)


def test_new_files_embed_through_the_ast_towers_own_extractor(tiny_dataset, folders, tmp_path):
    """The xmodal path: files embedded by a model holding the frozen AST are each the embedding of the file's one
    view (the whole clip, in windows) through ``ASTInputs``."""
    config = validate(ast_recipe(tiny_dataset, folders, tmp_path, {"kind": "linear", "out_dim": 32}))
    torch.manual_seed(0)
    model = build_model(config, torch.device("cpu"), inputs={}, backbones=True)  # the frozen AST, loaded
    paths = sorted((tiny_dataset / "evaluation").glob("*.wav"))[:3]
    assert len(paths) == 3
    embeds = encode_audio_files(model, config, paths, torch.device("cpu"))
    vectors = embeds.frames[:, 0]  # (3, E): a mean-pooling head gives one vector per clip
    assert embeds.frames.shape == (3, 1, 32) and embeds.lengths.tolist() == [1, 1, 1]
    assert torch.isfinite(vectors).all() and torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    extractor = make_extractor(config.model.audio_enc)
    items = [extractor.extract(load_audio(path, extractor.sample_rate), seed=0, train=False) for path in paths]
    with torch.no_grad():
        expected = model.encode_audio(**extractor.collate(items))
    assert torch.allclose(vectors, expected, atol=1e-5)
