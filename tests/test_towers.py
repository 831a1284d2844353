"""The transformers towers against plain references: cached outputs against the tower on raw inputs, padding
against clips run alone, pooling against per-caption means, and a frozen backbone that training never calls."""

import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT

from models import AutoTextEncoder, ClapAudioEncoder, Wav2Vec2BertEncoder, WhisperEncoder
from models.losses import LOSSES
from models.pooling import masked_mean
from models.tiny import tiny_clap, tiny_roberta, tiny_w2v_bert, tiny_whisper
from models.weights import load_weights
from preprocessing.tower_stores import prepare_split, tower_outputs, write_audio_store
from utils.audio import CropConfig, clip_views, eval_crops, fit_length
from utils.checkpoints import build_model
from utils.config import load_raw, validate, with_overrides
from utils.data import CaptionPairs, StoredViews, audio_source, collate_frames, pad_logmels, pair_loader
from utils.errors import ConfigError
from utils.extractors import CaptionTokens, ClapInputs, SeamlessInputs, WhisperInputs, make_extractor
from utils.inference import encode_split
from utils.tower_stores import audio_store
from utils.training import make_optimizer, run_epoch, train


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {
        "whisper": tiny_whisper(root / "whisper"),
        "roberta": tiny_roberta(root / "roberta"),
        "w2v": tiny_w2v_bert(
            root / "w2v", add_adapter=True, adapter_kernel_size=3, adapter_stride=2, num_adapter_layers=2
        ),
    }


def waves(seconds=(1.0, 2.5, 4.0), rate=16000):
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(s * rate))).astype(np.float32) for s in seconds]


@pytest.mark.parametrize("adapter", [{"kind": "linear", "out_dim": 8}, {"kind": "conv1d", "out_dim": 8}])
def test_cached_backbone_outputs_give_the_tower_on_raw_inputs(folders, adapter):
    torch.manual_seed(0)
    tower = WhisperEncoder(WhisperEncoder.Config(model_id=str(folders["whisper"]), adapter=adapter)).eval()
    extractor = WhisperInputs(tower.config)
    inputs = extractor.collate([extractor.extract(w, seed=0) for w in waves()])
    with torch.no_grad():
        raw = masked_mean(*tower(**inputs))  # (3, 8): the backbone, the adapter and the pooling
        pooled = adapter["kind"] == "linear"  # a linear head commutes with the mean: one frame per clip is enough
        cached = collate_frames([{"rows": rows} for rows in tower_outputs(tower, inputs, pooled)])
        assert cached["frames"].shape[1] == (1 if pooled else 200)  # only the frames of audio are stored
        assert torch.allclose(masked_mean(*tower(**cached)), raw, atol=1e-5)
        # the definition: the adapter on the clip's own frames (a 1 s clip has 50 of the 300), then their mean;
        # padded frames never reach it, not even through the convolution's edge
        frames, lengths = tower.frames(**inputs)
        assert lengths.tolist() == [50, 125, 200]
        manual = torch.stack([tower.adapter(frames[i : i + 1, :n]).mean(1)[0] for i, n in enumerate(lengths)])
        assert torch.allclose(raw, manual, atol=1e-5)


def test_w2v_bert_with_its_adapter_gives_each_clip_what_it_gets_alone(folders):
    tower = Wav2Vec2BertEncoder(
        Wav2Vec2BertEncoder.Config(model_id=str(folders["w2v"]), layer=None)
    ).eval()  # the checkpoint's strided adapter: 2 layers, stride 2
    torch.manual_seed(1)
    with torch.no_grad():  # as in any trained checkpoint: layer norms turn zeroed padding into their bias
        for module in tower.backbone.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_()
    extractor = SeamlessInputs(tower.config)
    items = [extractor.extract(w, seed=0) for w in waves((1.0, 2.0, 0.6))]
    with torch.no_grad():
        frames, lengths = tower.frames(**extractor.collate(items))
        for i, item in enumerate(items):
            alone, n = tower.frames(**extractor.collate([item]))
            assert lengths[i] == n[0] and lengths[i] < len(item["rows"])  # the adapter shortened it
            assert torch.allclose(frames[i, : lengths[i]], alone[0, : n[0]], atol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_tower_pools_each_caption_as_if_alone(folders, pooling):
    tower = AutoTextEncoder(AutoTextEncoder.Config(model_id=str(folders["roberta"]), pooling=pooling)).eval()
    tokens = CaptionTokens(tower.config)
    captions = ["a dog barks", "rain falls on a tin roof while a car passes", "beep"]
    with torch.no_grad():
        batched = tower(**tokens(captions))
        for i, caption in enumerate(captions):
            hidden = tower.backbone(**tokens([caption])).last_hidden_state[0]  # (L, D), no padding
            expected = hidden.mean(0) if pooling == "mean" else hidden[0]
            assert torch.allclose(batched[i], expected, atol=1e-5)


def test_model_ids_that_cannot_be_loaded_are_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.audio_enc\.model_id: cannot load 'nobody/no-such-model@v2'"):
        WhisperEncoder(WhisperEncoder.Config(model_id="nobody/no-such-model@v2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^model\.text_enc\.model_id: cannot load .* from its folder"):
        AutoTextEncoder(AutoTextEncoder.Config(model_id=str(tmp_path / "empty")))


def whisper_recipe(dataset, folders, runs, **overrides):
    raw = load_raw(REPO_ROOT / "example" / "recipes" / "whisper_embedder.yaml")
    return with_overrides(
        raw,
        {
            "data.dataset_dir": str(dataset),
            "device": "cpu",
            "model.audio_enc.model_id": str(folders["whisper"]),
            "model.text_enc.model_id": str(folders["roberta"]),
            "model.text_enc.max_length": 64,
            "model.embed_dim": 32,
            "model.audio_enc.adapter.out_dim": 32,
            "param_conf.batch_size": 16,
            "param_conf.num_workers": 0,
            "param_conf.val_every_steps": None,
            "ray_conf.storage_path": str(runs),
            "ray_conf.scheduler": {"name": "FIFO"},
        }
        | overrides,
    )


def test_fresh_views_cannot_be_asked_of_stored_towers(tiny_dataset, folders, tmp_path):
    raw = whisper_recipe(tiny_dataset, folders, tmp_path, **{"crops.seconds": 2})
    with pytest.raises(
        ConfigError, match=r"crops\.seconds with crops\.train_views 0 .*model\.audio_enc \(WhisperEncoder"
    ):
        validate(raw)
    validate(with_overrides(raw, {"crops.train_views": 3}))  # three crops drawn once per clip: stored
    with pytest.raises(ConfigError, match="crops.seconds and model.audio_enc.fusion"):
        validate(
            with_overrides(
                raw, {"model.audio_enc": {"name": "ClapAudioEncoder", "fusion": True}, "crops.train_views": 2}
            )
        )


def test_views_crop_repeat_and_slide():
    x = np.arange(10)
    assert fit_length(np.arange(3), 8, "repeat").tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    assert fit_length(np.arange(3), 5, "zero").tolist() == [0, 1, 2, 0, 0]
    assert [v.tolist() for v in eval_crops(x, 4, 3, "repeat")] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [v.tolist() for v in eval_crops(x, 4, None, "repeat")] == [[3, 4, 5, 6]]  # centred
    crops = CropConfig(seconds=0.4, train_views=3)
    train = clip_views(x, 10, crops, True, np.random.default_rng(0))
    assert len(train) == 3 and all(len(v) == 4 and v[1] - v[0] == 1 for v in train)


@pytest.mark.slow
def test_a_frozen_backbone_is_never_loaded_nor_called_in_training(tiny_dataset, folders, tmp_path, monkeypatch):
    config = validate(whisper_recipe(tiny_dataset, folders, tmp_path))
    for split in config.data.splits():
        prepare_split(config, split, "cpu")

    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the frozen Whisper encoder was used during training")

    monkeypatch.setattr(transformers.WhisperModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.models.whisper.modeling_whisper.WhisperEncoder, "forward", refuse)
    reports = []
    train(config, lambda metrics, folder: reports.append(metrics))
    assert [m["epoch"] for m in reports] == [1] and np.isfinite(reports[0]["val/t2a_mAP@10"])


@pytest.mark.slow
def test_an_epoch_on_cached_outputs_equals_the_epoch_running_the_frozen_backbone(
    tiny_dataset, folders, tmp_path, capsys
):
    """Caching a frozen tower changes nothing but the time, on one backbone in both arms (CPU): the same losses, and
    each arm's best time of two epochs printed (the tests' 1-layer, 32-wide Whisper encoder; the speed-up at
    Whisper-tiny's size belongs to the benchmarks)."""
    config = validate(whisper_recipe(tiny_dataset, folders, tmp_path))
    for split in config.data.splits():
        prepare_split(config, split, "cpu")
    # the same clips' model inputs, stored as a trainable tower would read them
    as_inputs = validate(with_overrides(config.model_dump(mode="json"), {"model.audio_enc.trainable": True}))
    inputs_path = write_audio_store(as_inputs, "development", torch.device("cpu"))
    torch.manual_seed(0)
    cached = build_model(config, torch.device("cpu"))
    running = build_model(config, torch.device("cpu"), backbones=True)  # the frozen encoder, run every step
    load_weights(running, cached.state_dict(), "cached model")
    assert cached.audio_encoder.backbone is None and running.audio_encoder.backbone is not None
    criterion = LOSSES.build(config.criterion)
    extractor = make_extractor(as_inputs.model.audio_enc)
    losses, seconds = [], []
    for model, source in ((cached, None), (running, StoredViews(inputs_path, extractor.collate))):
        dataset = CaptionPairs(config, "development")
        if source is not None:
            dataset.audio = source
        optimizer = make_optimizer(model, config.optimizer)
        times = []
        for _ in range(2):
            loader = pair_loader(dataset, 16, shuffle=True, seed=0)
            torch.manual_seed(0)  # the same dropout draws in the trainable text tower
            start = time.perf_counter()
            loss = run_epoch(model, loader, criterion, torch.device("cpu"), optimizer)
            times.append(time.perf_counter() - start)
            losses.append(loss)
        seconds.append(min(times))
    assert losses[0] == pytest.approx(losses[2], rel=1e-4)  # the first epoch of each arm
    with capsys.disabled():
        print(
            f"\ntest Whisper encoder: epoch on cached outputs {seconds[0]:.3f} s, running the frozen backbone "
            f"{seconds[1]:.3f} s: {seconds[1] / seconds[0]:.1f}x"
        )


def test_logmel_crops_are_fresh_in_training_and_windows_averaged_in_evaluation(tiny_raw):
    config = validate(with_overrides(tiny_raw, {"crops": {"seconds": 1.0, "eval_hop_seconds": 0.5}}))
    pairs = CaptionPairs(config, "development")
    draws = [pairs[0][0] for _ in range(4)]  # 1 s of 20 ms hops: 50 frames, from a random start each time
    assert {len(d) for d in draws} == {50} and len({d.tobytes() for d in draws}) > 1

    torch.manual_seed(0)
    model = build_model(config, torch.device("cpu")).eval()
    split = encode_split(model, config, "validation", torch.device("cpu"))
    source = audio_source(config, "validation")
    fid = int(next(iter(sorted(source.fids))))
    windows = source.views(fid)  # every 0.5 s, the last one ending at the clip's end
    assert len(windows) > 1 and all(len(w) == 50 for w in windows)
    with torch.no_grad():
        each = model.encode_audio(*pad_logmels(windows))  # (n_windows, E)
    expected = torch.nn.functional.normalize(each.mean(0), dim=-1)
    fnames = pd.read_csv(config.data.dataset_dir / "validation_audio.csv").set_index("fid")["fname"]
    row = split.fnames.index(fnames[fid])
    assert torch.allclose(split.audio.frames[row, 0], expected, atol=1e-5)


def test_clap_fusion_input_is_the_whole_clip_and_three_crops_of_long_clips(tmp_path):
    folder = tiny_clap(tmp_path / "clap-fused", fusion=True)
    tower = ClapAudioEncoder(ClapAudioEncoder.Config(model_id=str(folder), fusion=True)).eval()
    extractor = ClapInputs(tower.config)
    long, short = waves((15.0, 4.0), rate=48000)
    items = [extractor.extract(long, seed=1), extractor.extract(short, seed=1)]
    batch = extractor.collate(items)
    assert batch["input_features"].shape == (2, 4, 1001, 64) and batch["is_longer"].tolist() == [[True], [False]]
    again = extractor.collate([extractor.extract(long, seed=1)])["input_features"]
    assert torch.equal(again[0], batch["input_features"][0])  # the random crops are seeded: a store is reproducible
    with torch.no_grad():
        frames, lengths = tower(**batch)
        assert frames.shape == (2, 1, 16) and lengths.tolist() == [1, 1]  # CLAP's frame: its pooled embedding
    with pytest.raises(ConfigError, match="fusion is False but .* was trained with feature fusion"):
        ClapAudioEncoder(ClapAudioEncoder.Config(model_id=str(folder)))


def test_an_interrupted_store_continues_from_its_finished_parts(tiny_dataset, folders, tmp_path, monkeypatch):
    config = validate(whisper_recipe(tiny_dataset, folders, tmp_path, **{"model.audio_enc.store": "resumed"}))
    calls, crashed = [], []
    original = WhisperInputs.extract

    def crash_in_the_second_part(self, wave, seed, train=True):
        calls.append(seed)
        if len(calls) == 12 and not crashed:
            crashed.append(seed)
            raise MemoryError("the process dies here")
        return original(self, wave, seed, train)

    monkeypatch.setattr(WhisperInputs, "extract", crash_in_the_second_part)
    with pytest.raises(MemoryError):
        write_audio_store(config, "development", torch.device("cpu"), part_size=8)
    path, _ = audio_store(config, "development")
    assert not path.exists() and len(list(path.with_name(f"{path.stem}.parts").glob("*.h5"))) == 1
    calls.clear()
    write_audio_store(config, "development", torch.device("cpu"), part_size=8)
    assert len(calls) == 16 and path.is_file()  # the first part's 8 clips were not redone
    assert not path.with_name(f"{path.stem}.parts").exists()


def test_a_search_over_a_tower_setting_needs_one_store_per_value(tiny_dataset, folders, tmp_path):
    from main import store_variants

    search = {"model.audio_enc.layer": {"choice": [None, 0]}, "features.max_seconds": {"grid": [30, 20]}}
    raw = whisper_recipe(tiny_dataset, folders, tmp_path, **{"ray_conf.search_space": search})
    variants = store_variants(validate(raw))
    paths = {audio_store(v, "development")[0] for v in variants}
    assert len(variants) == len(paths) == 4  # every combination; the file's own values are one of them
    raw["ray_conf"]["search_space"] = {"model.audio_enc.layer": {"randint": [0, 2]}}
    with pytest.raises(ConfigError, match=r"model\.audio_enc\.layer: randint cannot be searched"):
        store_variants(validate(raw))


def test_a_relative_model_folder_resolves_against_the_config_file(tmp_path):
    (tmp_path / "models" / "whisper").mkdir(parents=True)
    (tmp_path / "conf.yaml").write_text(
        "model:\n  audio_enc: {name: WhisperEncoder, model_id: models/whisper}\n"
        "  text_enc: {name: AutoTextEncoder, model_id: FacebookAI/roberta-base}\n"
    )
    raw = load_raw(tmp_path / "conf.yaml")
    assert raw["model"]["audio_enc"]["model_id"] == str(tmp_path / "models" / "whisper")  # a folder there
    assert raw["model"]["text_enc"]["model_id"] == "FacebookAI/roberta-base"  # no such folder: a hub id
