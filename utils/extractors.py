"""Model inputs for the ``transformers`` towers: each tower's own feature extractor (loaded from the same
model id) on one view of a clip, and the batching of those inputs; tokenised captions for text towers.

An extractor turns a mono wave at its ``sample_rate`` into one item: ``rows``, a 2-D array (what a store
keeps, concatenated over items), and scalar extras; ``collate`` turns items into the tower's keyword
inputs. ``draws_at_random``: whether the extractor itself picks random parts of a clip (CLAP's crops and
fusion), so that several training views of a whole clip differ; for evaluation (``train=False``) it
picks none at random. Items are what ``preprocessing/tower_stores.py`` stores, so a stored item and a
fresh one are the same thing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.hf_audio import ASTEncoder, ClapAudioEncoder, PretrainedAudioConfig, Wav2Vec2BertEncoder, WhisperEncoder
from models.hf_text import PretrainedTextConfig
from models.pretrained import load_pretrained
from models.text_encoders import TEXT_ENCODERS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Item = dict[str, np.ndarray]  # "rows": (n, width) float32, plus scalar extras


class WhisperInputs:
    """``WhisperFeatureExtractor``: log-mels ``(n_mels, frames)`` of a window padded or cut to its chunk length
    (30 s), and ``n_frames``, the frames that hold audio (its attention mask)."""

    def __init__(self, config: WhisperEncoder.Config) -> None:
        from transformers import WhisperFeatureExtractor

        self.extractor = load_pretrained(WhisperFeatureExtractor.from_pretrained, config.model_id, WhisperEncoder.key)
        self.sample_rate = int(self.extractor.sampling_rate)
        self.draws_at_random = False  # a clip's first 30 s

    def extract(self, wave: np.ndarray, seed: int, train: bool = True) -> Item:
        out = self.extractor(wave, sampling_rate=self.sample_rate, return_tensors="np", return_attention_mask=True)
        return {"rows": out["input_features"][0].T, "n_frames": np.int64(out["attention_mask"][0].sum())}

    def collate(self, items: list[Item]) -> dict[str, torch.Tensor]:
        rows = np.stack([item["rows"] for item in items])  # (B, frames, n_mels)
        return {
            "input_features": torch.from_numpy(rows).float().transpose(1, 2),  # (B, n_mels, frames)
            "n_frames": torch.tensor([int(item["n_frames"]) for item in items]),
        }


class ClapInputs:
    """``ClapFeatureExtractor`` at 48 kHz: log-mels of a 10 s window ``(1, 1001, 64)`` (longer clips cropped at
    random, shorter ones repeated then padded), or with ``fusion`` the whole clip shrunk to 10 s plus three
    random 10 s crops from its front, middle and back thirds ``(4, 1001, 64)``, and ``is_longer``."""

    def __init__(self, config: ClapAudioEncoder.Config) -> None:
        from transformers import ClapFeatureExtractor

        self.extractor = load_pretrained(
            ClapFeatureExtractor.from_pretrained,
            config.model_id,
            ClapAudioEncoder.key,
            truncation="fusion" if config.fusion else "rand_trunc",
            padding="repeatpad",
        )
        self.sample_rate = int(self.extractor.sampling_rate)
        self.fusion = config.fusion
        self.draws_at_random = True

    def extract(self, wave: np.ndarray, seed: int, train: bool = True) -> Item:
        window = self.extractor.nb_max_samples
        if not train and not self.fusion and len(wave) > window:  # evaluation: the centred 10 s, not a random one
            start = (len(wave) - window) // 2
            wave = wave[start : start + window]
        np.random.seed(seed)  # the extractor draws its crops with NumPy's global generator
        out = self.extractor(wave, sampling_rate=self.sample_rate, return_tensors="np")
        features = out["input_features"][0]  # (views, frames, n_mels)
        # The extractor marks a random clip of a batch with no long clip as long (a training trick of CLAP's,
        # so the fusion branch always learns); one clip at a time, that would mark every short clip.
        longer = len(wave) > window
        return {"rows": features.reshape(-1, features.shape[-1]), "views": np.int64(len(features)), "is_longer": longer}

    def collate(self, items: list[Item]) -> dict[str, torch.Tensor]:
        views, n_mels = int(items[0]["views"]), items[0]["rows"].shape[-1]
        rows = np.stack([item["rows"] for item in items])  # (B, views * frames, n_mels)
        return {
            "input_features": torch.from_numpy(rows).float().reshape(len(items), views, -1, n_mels),
            "is_longer": torch.tensor([[bool(item["is_longer"])] for item in items]),
        }


class SeamlessInputs:
    """``SeamlessM4TFeatureExtractor`` (w2v-BERT 2.0) at 16 kHz: stacked log-mel frames ``(T, 160)`` of any
    length, batched with zero padding and an attention mask."""

    def __init__(self, config: Wav2Vec2BertEncoder.Config) -> None:
        from transformers import AutoFeatureExtractor

        self.extractor = load_pretrained(AutoFeatureExtractor.from_pretrained, config.model_id, Wav2Vec2BertEncoder.key)
        self.sample_rate = int(self.extractor.sampling_rate)
        self.draws_at_random = False  # the whole clip

    def extract(self, wave: np.ndarray, seed: int, train: bool = True) -> Item:
        out = self.extractor(wave, sampling_rate=self.sample_rate, return_tensors="np")
        return {"rows": out["input_features"][0]}

    def collate(self, items: list[Item]) -> dict[str, torch.Tensor]:
        lengths = [len(item["rows"]) for item in items]
        features = torch.full((len(items), max(lengths), items[0]["rows"].shape[1]), self.extractor.padding_value)
        for i, item in enumerate(items):
            features[i, : lengths[i]] = torch.from_numpy(item["rows"])
        mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
        return {"input_features": features, "attention_mask": mask.long()}


class ASTInputs:
    """``ASTFeatureExtractor`` at 16 kHz: Kaldi log-mels of a clip cut into consecutive windows of its
    ``max_length`` frames (1024, 10.24 s, for the released model), the last one padded as the extractor pads a
    short clip. An item's ``rows`` are its windows one after another ``(windows * max_length, mel_bins)``, with
    ``windows`` and ``n_frames`` (the log-mel frames of real audio); ``collate`` gives ``input_values``
    ``(B, max windows, max_length, mel_bins)`` (padded windows zero, never run), ``windows`` and ``n_frames``
    ``(B,)``."""

    def __init__(self, config: ASTEncoder.Config) -> None:
        from transformers import ASTFeatureExtractor

        self.extractor = load_pretrained(ASTFeatureExtractor.from_pretrained, config.model_id, ASTEncoder.key)
        self.sample_rate = int(self.extractor.sampling_rate)
        self.draws_at_random = False  # the whole clip
        # the extractor's framing (Kaldi's fbank, in both of its backends): 25 ms frames every 10 ms, not centred
        self.frame_samples, self.hop_samples = round(0.025 * self.sample_rate), round(0.010 * self.sample_rate)

    def extract(self, wave: np.ndarray, seed: int, train: bool = True) -> Item:
        length, frame, hop = self.extractor.max_length, self.frame_samples, self.hop_samples
        if len(wave) < frame:  # less than one frame, which the extractor cannot frame: made one
            wave = np.pad(wave, (0, frame - len(wave)))
        n_frames = 1 + (len(wave) - frame) // hop
        n_windows = -(-n_frames // length)
        # window k is the samples of the clip's frames k * length ... (k + 1) * length - 1: the extractor on it
        # gives exactly those frames of the whole clip (each frame is computed on its own samples), and pads the
        # last window as it pads any short clip
        span = (length - 1) * hop + frame
        pieces = [wave[k * length * hop : k * length * hop + span] for k in range(n_windows)]
        features = self.extractor(pieces, sampling_rate=self.sample_rate, return_tensors="np")["input_values"]
        rows = np.asarray(features, dtype=np.float32).reshape(-1, features.shape[-1])  # (windows * length, mel_bins)
        return {"rows": rows, "windows": np.int64(n_windows), "n_frames": np.int64(n_frames)}

    def collate(self, items: list[Item]) -> dict[str, torch.Tensor]:
        length, bins = self.extractor.max_length, items[0]["rows"].shape[1]
        windows = [int(item["windows"]) for item in items]
        features = torch.zeros(len(items), max(windows), length, bins)  # (B, W, max_length, mel_bins)
        for i, item in enumerate(items):
            features[i, : windows[i]] = torch.from_numpy(np.asarray(item["rows"], np.float32)).reshape(-1, length, bins)
        return {
            "input_values": features,
            "windows": torch.tensor(windows),
            "n_frames": torch.tensor([int(item["n_frames"]) for item in items]),
        }


EXTRACTORS = {
    "WhisperEncoder": WhisperInputs,
    "ClapAudioEncoder": ClapInputs,
    "Wav2Vec2BertEncoder": SeamlessInputs,
    "ASTEncoder": ASTInputs,
}


def make_extractor(config: PretrainedAudioConfig) -> WhisperInputs | ClapInputs | SeamlessInputs | ASTInputs:
    """The input maker of the ``transformers`` audio tower that ``config`` describes."""
    return EXTRACTORS[config.name](config)


class CaptionTokens:
    """The text tower's own tokenizer (from the config's ``tokenizer_subfolder`` of the model id, where it has
    one): captions -> ``input_ids``, ``attention_mask`` ``(B, L)``, cut at ``max_length`` tokens and padded to the
    longest caption of the batch, or to ``max_length`` for a tower that ``pads_to_max_length`` (a Stable Diffusion
    text encoder, whose every position is an output)."""

    def __init__(self, config: PretrainedTextConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer

        key, trust_remote_code = "model.text_enc.model_id", config.trust_remote_code
        extra: dict[str, Any] = {}
        if subfolder := getattr(config, "tokenizer_subfolder", None):
            # AutoTokenizer first looks for a config.json beside the tokenizer, which a pipeline's tokenizer folder
            # lacks; offline, in a cache that snapshot_download filled (diffusers' download), transformers cannot
            # tell "not on the hub" from "not downloaded" and fails. So it gets the model's config, from its folder.
            model_folder = getattr(config, "subfolder", None)
            model_config = load_pretrained(
                AutoConfig.from_pretrained,
                config.model_id,
                key,
                trust_remote_code=trust_remote_code,
                **({"subfolder": model_folder} if model_folder else {}),
            )
            extra = {"subfolder": subfolder, "config": model_config}
        self.tokenizer: PreTrainedTokenizerBase = load_pretrained(
            AutoTokenizer.from_pretrained, config.model_id, key, trust_remote_code=trust_remote_code, **extra
        )
        self.tokenizer.padding_side = "right"  # the towers pool over a prefix of valid tokens
        self.max_length = min(config.max_length, self.tokenizer.model_max_length)  # what the model can take
        pads_to_max_length = getattr(TEXT_ENCODERS.get(config.name), "pads_to_max_length", False)
        self.padding: bool | str = "max_length" if pads_to_max_length else True

    def __call__(self, captions: list[str]) -> dict[str, Any]:
        tokens = self.tokenizer(
            captions, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
