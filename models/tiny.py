"""Tiny randomly initialised ``transformers`` models of the real classes, written with ``save_pretrained`` (model,
feature extractor, tokenizer) into a folder that the recipes' model-id keys then load: the tests and benchmarks go
through the real ``from_pretrained`` path, offline, in seconds (timm's tiny variants, for this project's towers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    ASTConfig,
    ASTFeatureExtractor,
    ASTModel,
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapTextConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    RobertaConfig,
    RobertaModel,
    RobertaTokenizer,
    SeamlessM4TFeatureExtractor,
    Wav2Vec2BertConfig,
    Wav2Vec2BertModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

# the size of every tiny transformer here: one layer, two heads, 32 wide
TINY_TRANSFORMER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def byte_tokenizer() -> RobertaTokenizer:
    """A RoBERTa tokenizer over the 256 byte-level characters (no merges): any text, 261 ids, offline."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[])


def tiny_whisper(folder: Path, chunk_seconds: int = 6, d_model: int = 32, layers: int = 1, heads: int = 2) -> Path:
    """A Whisper (1 layer, d_model 32 unless told) whose extractor pads or cuts to ``chunk_seconds`` at 16 kHz."""
    torch.manual_seed(0)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=chunk_seconds)
    config = WhisperConfig(
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=1,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        num_mel_bins=80,
        max_source_positions=extractor.nb_max_frames // 2,  # the encoder takes exactly the extractor's frames
        max_target_positions=32,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    WhisperModel(config).save_pretrained(folder)
    extractor.save_pretrained(folder)
    return folder


def tiny_roberta(folder: Path) -> Path:
    """A 1-layer RoBERTa (hidden 32) with the byte-level tokenizer."""
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=261,
        **TINY_TRANSFORMER,
        max_position_embeddings=80,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    RobertaModel(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def tiny_clap(folder: Path, fusion: bool = False) -> Path:
    """A whole tiny ``ClapModel`` (2-stage HTS-AT, 1-layer RoBERTa, 16-d projections), its 48 kHz extractor and
    the byte-level tokenizer: what a released CLAP checkpoint folder holds."""
    torch.manual_seed(0)
    audio = ClapAudioConfig(
        spec_size=256,
        num_mel_bins=64,
        window_size=8,
        patch_size=4,
        patch_stride=[4, 4],
        depths=[1, 1],
        num_attention_heads=[1, 2],
        patch_embeds_hidden_size=8,
        hidden_size=16,  # the last Swin stage's width: patch_embeds_hidden_size * 2 ** (stages - 1)
        mlp_ratio=2.0,
        enable_fusion=fusion,
    )
    text = ClapTextConfig(
        vocab_size=261,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=90,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)
    model = ClapModel(config)
    with torch.no_grad():  # not CLIP's initial value, so a test can tell that it was loaded
        model.logit_scale_t.fill_(3.0)
    model.save_pretrained(folder)
    ClapFeatureExtractor().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def tiny_w2v_bert(folder: Path, **adapter: object) -> Path:
    """A 1-layer ``Wav2Vec2BertModel`` (hidden 32) and its 16 kHz ``SeamlessM4TFeatureExtractor``."""
    torch.manual_seed(0)
    config = Wav2Vec2BertConfig(
        **TINY_TRANSFORMER,
        feature_projection_input_dim=160,
        conv_depthwise_kernel_size=3,
        layerdrop=0.0,
        mask_time_prob=0.0,
        apply_spec_augment=False,
        **adapter,
    )
    Wav2Vec2BertModel(config).save_pretrained(folder)
    SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, sampling_rate=16000, stride=2).save_pretrained(folder)
    return folder


def tiny_ast(folder: Path, num_mel_bins: int = 32, max_length: int = 128) -> Path:
    """A 1-layer ``ASTModel`` (hidden 32, the released model's 16x16 patches every 10 frames and bins) and its
    ``ASTFeatureExtractor``: 32 mel bins make a frequency grid of 2 rows, windows of 128 frames (1.28 s, 12 patch
    columns) make the demo clips need several windows."""
    torch.manual_seed(0)
    config = ASTConfig(
        **TINY_TRANSFORMER,
        num_mel_bins=num_mel_bins,
        max_length=max_length,
    )
    model = ASTModel(config)
    with torch.no_grad():  # AST starts them at zero: random ones, so that a patch's place in the grid matters
        embeddings = model.embeddings
        for token in (embeddings.cls_token, embeddings.distillation_token, embeddings.position_embeddings):
            token.normal_(std=0.5)
    model.save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=num_mel_bins, max_length=max_length).save_pretrained(folder)
    return folder


def tiny_sd_text_encoder(folder: Path, width: int = 16) -> Path:
    """A folder laid out like a Stable Diffusion repository's text side, and nothing at its root but
    ``model_index.json`` (no ``config.json``): ``text_encoder/``, a 1-layer ``CLIPTextModel`` ``width`` wide with
    77 positions, and ``tokenizer/``, a ``CLIPTokenizer`` (padded with ``!``, id 0, as SD 2.1's is) built offline
    from a ``vocab.json`` and ``merges.txt`` written here: the 256 byte-level characters, each also with CLIP's
    end-of-word ``</w>``, so any caption tokenises, a few merges ("the", "and"), then the start and end tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    torch.manual_seed(0)
    chars = sorted(ByteLevel.alphabet())  # "!" first, as in CLIP's vocabulary
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer_dir = folder / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        vocab=str(tokenizer_dir / "vocab.json"),
        merges=str(tokenizer_dir / "merges.txt"),
        pad_token="!",
        model_max_length=77,
    )
    tokenizer.save_pretrained(tokenizer_dir)
    config = CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
    (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return folder
