"""The audio2img pieces: the sequence contrastive loss and the resampling head against plain implementations of their
definitions, and the Stable Diffusion text encoder against ``CLIPTextModel`` run as the pipeline runs it, on a tiny
offline folder laid out like an SD repository."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPTextModel

from models.audio_encoders import SmallCNNEncoder
from models.hf_text import AutoTextEncoder, CLIPTextEncoder, PretrainedTextTower
from models.losses import LOSSES, SequenceContrastiveLoss
from models.pooling import POOLING, PoolingHead, SequenceResampling
from models.tiny import tiny_roberta, tiny_sd_text_encoder
from utils.errors import ConfigError
from utils.extractors import CaptionTokens

CAPTIONS = ["A dog barks twice", "The rain and the thunder, far away!", "ünïcödé bïrds — 日本語", ""]


def definition_loss(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """The definition, one position and one row at a time: at position l, audio i's ``A[i, l]`` scored by cosine
    against every caption's ``T[j, l]``, times ``scale``; cross-entropy picks caption i; the mean over all."""
    n, length, _ = audio.shape
    losses = []
    for pos in range(length):
        for i in range(n):
            logits = torch.stack([F.cosine_similarity(audio[i, pos], text[j, pos], dim=0) for j in range(n)]) * scale
            losses.append(F.cross_entropy(logits[None], torch.tensor([i])))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("learnable", [False, True])
def test_sequence_loss_equals_its_definition_position_by_position(learnable: bool):
    torch.manual_seed(0)
    audio, text = torch.randn(5, 7, 6, requires_grad=True), torch.randn(5, 7, 6)
    audio_ids = torch.tensor([0, 0, 1, 2, 3])  # two captions of one clip: each is the other's negative
    loss = SequenceContrastiveLoss()
    assert loss.config.temperature == 0.15
    logit_scale = torch.tensor(4.0, requires_grad=True) if learnable else None
    expected = definition_loss(audio, text, logit_scale if learnable else 1 / 0.15)
    expected_grads = torch.autograd.grad(expected, [audio] + ([logit_scale] if learnable else []))

    value = loss(audio, text, audio_ids, logit_scale=logit_scale)
    assert torch.allclose(value, expected, atol=1e-6)
    grads = torch.autograd.grad(value, [audio] + ([logit_scale] if learnable else []))
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected_grads))

    # what training calls: per-position cosines (L, N, N), scaled by the loss
    scores = torch.einsum("ilw,jlw->lij", F.normalize(audio, dim=-1), F.normalize(text, dim=-1))
    assert torch.allclose(loss.from_pair_scores(scores, audio_ids, logit_scale=logit_scale), expected, atol=1e-6)
    assert torch.allclose(loss(audio, text, logit_scale=logit_scale), expected, atol=1e-6)  # no audio_ids needed
    with pytest.raises(ValueError, match="differ in shape"):
        loss(audio, text[:, :3])


def test_sequence_loss_config_is_cosine_only_with_its_own_temperature():
    assert "SequenceContrastiveLoss" in LOSSES.names()
    built = LOSSES.build(SequenceContrastiveLoss.Config(temperature=0.3))
    assert isinstance(built, SequenceContrastiveLoss) and built.config.temperature == 0.3
    with pytest.raises(ValueError, match="temperature"):
        SequenceContrastiveLoss(temperature=0)
    with pytest.raises(ValueError, match="dist"):  # always cosine: the one-vector losses' dist is refused by name
        SequenceContrastiveLoss(dist="dot_product")
    # the loss is the same whatever the sequences' norms (CLIP's first position is far larger than the rest)
    torch.manual_seed(0)
    audio, text = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    loss = SequenceContrastiveLoss()
    assert torch.allclose(loss(audio * 50, text * torch.rand(3, 4, 1)), loss(audio, text), atol=1e-6)


def test_sequence_resampling_equals_interpolate_clip_by_clip_and_ignores_padding():
    torch.manual_seed(0)
    lengths = torch.tensor([50, 1, 13, 77, 100])
    frames = torch.randn(5, 120, 8, dtype=torch.float64)
    padded = frames.masked_fill(torch.arange(120)[None, :, None] >= lengths[:, None, None], float("nan"))
    head = SequenceResampling(dim=8)
    assert head.config.positions == 77 and head.sequence and not PoolingHead.sequence
    assert "SequenceResampling" in POOLING.names()
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        out = head(padded.to(dtype), lengths)  # NaN padding: any padded frame read would show
        assert out.shape == (5, 77, 8) and out.dtype == dtype
        for b, n in enumerate(lengths.tolist()):
            clip = frames[b, :n].to(dtype)
            expected = F.interpolate(clip.T[None], size=77, mode="linear", align_corners=False)[0].T
            assert torch.allclose(out[b], expected, atol=atol), (dtype, n)
        assert torch.equal(out[1], frames[1, :1].to(dtype).expand(77, -1))  # one frame: repeated, exactly
        assert torch.equal(out[3], frames[3, :77].to(dtype))  # as many frames as positions: the frames themselves
    short = SequenceResampling(positions=4, dim=8)
    assert short(padded.float(), lengths).shape == (5, 4, 8)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd_text_encoder(tmp_path_factory.mktemp("tiny_sd"))


def test_clip_text_encoder_gives_the_pipelines_prompt_embeds(tiny_sd: Path):
    assert not (tiny_sd / "config.json").exists()  # as in an SD repository: the model is in its subfolder
    config = CLIPTextEncoder.Config(model_id=str(tiny_sd))
    assert (config.subfolder, config.tokenizer_subfolder, config.max_length) == ("text_encoder", "tokenizer", 77)
    tower = CLIPTextEncoder(config)
    assert tower.sequence and tower.pads_to_max_length and tower.out_dim == 16
    assert not PretrainedTextTower.sequence and not AutoTextEncoder.pads_to_max_length
    assert tower.state_dict() == {}  # frozen: the backbone is the model id's

    tokens = CaptionTokens(config)(CAPTIONS + ["a long caption " * 40])
    assert tokens["input_ids"].shape == (5, 77)  # padded to max_length, not to the longest caption
    assert tokens["input_ids"][0, -1] == 0 and tokens["input_ids"][-1, -1] != 0  # "!" pads; the long one is cut
    with torch.no_grad():
        out = tower(**tokens)

        # diffusers' StableDiffusionPipeline.encode_prompt: the pipeline's own tokenizer and text encoder, ids padded
        # to tokenizer.model_max_length, no attention mask (the config has no use_attention_mask)
        tokenizer = AutoTokenizer.from_pretrained(tiny_sd / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder").eval()
        ids = tokenizer(
            CAPTIONS + ["a long caption " * 40],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        assert torch.equal(ids, tokens["input_ids"])
        prompt_embeds = text_encoder(ids)[0]
        assert out.shape == (5, 77, 16)
        assert torch.equal(out, prompt_embeds)

        masked = text_encoder(ids, attention_mask=tokens["attention_mask"])[0]
        assert not torch.allclose(masked, prompt_embeds)  # the mask changes the padding positions: it matters
        text_encoder.config.use_attention_mask = tower.backbone.config.use_attention_mask = True
        assert torch.equal(tower(**tokens), masked)  # a text encoder that asks for the mask gets it, as in diffusers

        with pytest.raises(ValueError, match="max_length=77"):
            tower(tokens["input_ids"][:, :20], tokens["attention_mask"][:, :20])


def test_other_text_towers_still_pad_to_the_longest_caption(tmp_path: Path):
    tokens = CaptionTokens(AutoTextEncoder.Config(model_id=str(tiny_roberta(tmp_path / "roberta"))))(CAPTIONS[:2])
    assert tokens["input_ids"].shape[1] < 77


def hub_cache(tmp_path: Path, tiny_sd: Path, repo: str) -> Path:
    """A Hugging Face cache holding ``repo`` as ``tiny_sd`` (refs/main -> a snapshot), as ``snapshot_download``
    (diffusers' download) leaves it: with no record of the files the repository lacks (``tokenizer/config.json``)."""
    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sd, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return cache


def test_a_cached_hub_id_loads_from_its_subfolders_offline(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import huggingface_hub.constants

    # no config.json at the repository's root: the cache is looked up under the subfolders
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path, tiny_sd, "org/tiny-sd")))
    config = CLIPTextEncoder.Config(model_id="org/tiny-sd")
    assert CLIPTextEncoder(config)(**CaptionTokens(config)(CAPTIONS)).shape == (4, 77, 16)

    from main import check_model_ids

    check_model_ids(model_config(config))  # the tower's config is read from its subfolder


def model_config(text_enc: CLIPTextEncoder.Config) -> SimpleNamespace:
    """What ``check_model_ids`` reads of a config: the two towers and ``init_from``."""
    return SimpleNamespace(model=SimpleNamespace(audio_enc=SmallCNNEncoder.Config(), text_enc=text_enc, init_from=None))


def test_a_model_that_cannot_be_loaded_is_one_config_error_line(tiny_sd: Path, tmp_path: Path):
    from main import check_model_ids

    missing = CLIPTextEncoder.Config(model_id=str(tmp_path / "missing"))  # no folder, and HF_HUB_OFFLINE=1
    for load in (CLIPTextEncoder, CaptionTokens, lambda config: check_model_ids(model_config(config))):
        with pytest.raises(ConfigError) as err:
            load(missing)
        assert str(err.value).startswith("model.text_enc.model_id: cannot load") and "\n" not in str(err.value)
        assert str(tmp_path / "missing") in str(err.value)
    # an SD folder without a text encoder where the config says
    wrong = CLIPTextEncoder.Config(model_id=str(tiny_sd), subfolder="unet")
    with pytest.raises(ConfigError, match=r"^model.text_enc.model_id: cannot load .* from its folder") as err:
        CLIPTextEncoder(wrong)
    assert "\n" not in str(err.value)
