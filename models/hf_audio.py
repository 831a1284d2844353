"""Audio towers from ``transformers``: a pretrained backbone read at one hidden layer, an optional trainable
adapter, and padding-aware mean pooling over time.

Each tower is fed what its model was trained on (the feature extractor of the same model id, at its own
sample rate; ``utils/extractors.py``) and works in one of two modes:

- raw: model inputs (``input_features`` ...) -> backbone -> frames ``(B, T', D)`` + valid lengths ``(B,)``
  -> adapter -> mean over the valid frames -> ``(B, out_dim)``;
- cached: a frozen backbone's frames, computed once per dataset (``preprocessing/tower_stores.py``), come
  in as ``frames``/``lengths`` and only the adapter and the pooling run. Where the head commutes with the
  pooling (no adapter or a linear one: the mean of affine maps is the affine map of the mean) the store
  holds each clip's mean frame, ``(B, 1, D)``, and the result is the same to rounding.

A frozen backbone is not part of the state dict: it is the model id's, loaded from there when needed, so
checkpoints hold only what training changed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PositiveInt, field_validator
from torch import nn

from models.audio_encoders import AUDIO_ENCODERS
from models.pooling import valid_frames
from models.pretrained import load_pretrained
from models.registry import StrictModel, configured
from utils.errors import ConfigError

log = logging.getLogger(__name__)


class AdapterConfig(StrictModel):
    """A trainable adapter on the backbone's frames: a linear map, or a 1-D convolution over time
    (``kernel_size`` frames, zero padding, stride 1, so the valid lengths do not change)."""

    kind: Literal["linear", "conv1d"] = "linear"
    out_dim: PositiveInt
    kernel_size: PositiveInt = 3

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, kernel_size: int) -> int:
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so frames stay centred, got {kernel_size}")
        return kernel_size


class PretrainedTowerConfig(StrictModel):
    """What every ``transformers`` tower's config holds."""

    model_id: str  # hub id, "id@revision" or a local folder written by save_pretrained
    trainable: bool = False  # False: frozen, its outputs computed once per dataset and read by every trial
    trust_remote_code: bool = False  # run the model repository's own code: only when set explicitly
    store: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*$")  # stores' name; None: from the class


class PretrainedAudioConfig(PretrainedTowerConfig):
    adapter: AdapterConfig | None = None


class LayeredAudioConfig(PretrainedAudioConfig):
    """Towers whose hidden states can be read at any layer."""

    layer: int | None = None  # index into hidden_states (0: the embeddings, -1: the last); None: last_hidden_state


class Conv1dAdapter(nn.Conv1d):
    """``(B, T, D) -> (B, T, out_dim)``: a convolution over time, applied frame-major."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return super().forward(frames.transpose(1, 2)).transpose(1, 2)


def pools_first(adapter: AdapterConfig | None, pooling: StrictModel | None) -> bool:
    """Whether a tower's adapter and pooling head commute with taking the mean over frames (no adapter or a linear
    one, then mean pooling), so that a frozen backbone's store may keep one mean frame per clip instead of all."""
    return (adapter is None or adapter.kind == "linear") and (pooling is None or pooling.name == "MeanPooling")


def build_adapter(config: AdapterConfig | None, in_dim: int) -> nn.Module:
    if config is None:
        return nn.Identity()
    if config.kind == "linear":
        return nn.Linear(in_dim, config.out_dim)
    return Conv1dAdapter(in_dim, config.out_dim, config.kernel_size, padding=config.kernel_size // 2)


class PretrainedTower(nn.Module):
    """What the ``transformers`` towers share: the backbone of the config's model id, loaded unless it is frozen
    and its outputs come from a store (then ``width`` is theirs), trainable or frozen as configured; a frozen
    backbone keeps its dropout off and stays out of the state dict (it is the model id's)."""

    Config: ClassVar[type[PretrainedTowerConfig]]
    key: ClassVar[str]  # the config key of the model id, for errors

    def __init__(self, config: PretrainedTowerConfig | None, width: int | None, load_backbone: bool) -> None:
        super().__init__()
        self.config = config = configured(self.Config, config, {})
        self.backbone: nn.Module | None = None
        if load_backbone or config.trainable:
            self.backbone = self.load_backbone(config).requires_grad_(config.trainable)
            width = self.backbone.config.hidden_size
        elif width is None:
            raise ValueError(f"{type(self).__name__} without its backbone needs the width of its stored outputs")
        self.width = width
        if not config.trainable:
            self._register_state_dict_hook(_drop_backbone)

    @classmethod
    def load_backbone(cls, config: PretrainedTowerConfig) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def pretrained(cls, loader: Callable[..., nn.Module], config: PretrainedTowerConfig, **kwargs: Any) -> nn.Module:
        """``loader`` (a ``from_pretrained``) on the config's model id, with its ``trust_remote_code``; a model that
        cannot be loaded is one ``ConfigError`` naming the tower's key."""
        return load_pretrained(loader, config.model_id, cls.key, trust_remote_code=config.trust_remote_code, **kwargs)

    def train(self, mode: bool = True) -> PretrainedTower:
        super().train(mode)
        if self.backbone is not None and not self.config.trainable:
            self.backbone.eval()  # as it was when its outputs were cached
        return self


def _drop_backbone(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict hook: leave a frozen backbone out, so checkpoints hold only what training changed
    (``models.weights.load_weights`` checks a loaded state against this one)."""
    for key in [k for k in state if k.startswith(prefix + "backbone.")]:
        del state[key]


class PretrainedAudioTower(PretrainedTower):
    """The shared body of the ``transformers`` audio towers; subclasses load their backbone and turn its
    outputs into frames and valid lengths (``frames``), which the trainable adapter then maps."""

    Config: ClassVar[type[PretrainedAudioConfig]]
    key: ClassVar[str] = "model.audio_enc.model_id"
    default_pooling: ClassVar[str] = "MeanPooling"

    def __init__(
        self, config: PretrainedAudioConfig | None = None, *, frame_dim: int | None = None, load_backbone: bool = True
    ) -> None:
        super().__init__(config, frame_dim, load_backbone)
        self.adapter = build_adapter(self.config.adapter, self.width)
        self.out_dim = self.frame_dim = self.config.adapter.out_dim if self.config.adapter else self.width

    def frames(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone on model inputs -> frames ``(B, T', D)`` and their valid lengths ``(B,)``."""
        raise NotImplementedError

    def forward(
        self, frames: torch.Tensor | None = None, lengths: torch.Tensor | None = None, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached frames (``frames``, ``lengths``) or model inputs -> the adapter's frames ``(B, T', out_dim)``
        (padded frames zero before it, so a convolution sees a clip's end as alone) and valid lengths ``(B,)``."""
        if frames is None:
            if self.backbone is None:
                raise RuntimeError(f"{type(self).__name__} was built without its backbone: pass cached frames")
            frames, lengths = self.frames(**inputs)
        valid = valid_frames(lengths, frames.size(1))  # (B, T')
        return self.adapter(frames.float() * valid[..., None]), lengths

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        """The tower's embedding is its pooled frame: nothing follows the pooling head."""
        return pooled


def _hidden(outputs: Any, layer: int | None) -> torch.Tensor:
    return outputs.last_hidden_state if layer is None else outputs.hidden_states[layer]


@AUDIO_ENCODERS.register
class WhisperEncoder(PretrainedAudioTower):
    """The encoder of a Whisper model (``WhisperModel``; its decoder is dropped after loading), on
    ``WhisperFeatureExtractor`` log-mels ``(B, n_mels, 3000)`` of 30 s windows at 16 kHz. Frames past
    the clip's end (the extractor's zero padding) are left out of the pooling."""

    class Config(LayeredAudioConfig):
        name: Literal["WhisperEncoder"] = "WhisperEncoder"
        model_id: str = "openai/whisper-large-v3"

    def __init__(self, config: Config | None = None, **inputs: Any) -> None:
        super().__init__(config, **inputs)

    @classmethod
    def load_backbone(cls, config: Config) -> nn.Module:
        from transformers import WhisperModel

        return cls.pretrained(WhisperModel.from_pretrained, config).get_encoder()

    def frames(self, input_features: torch.Tensor, n_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_features`` ``(B, n_mels, frames)``; ``n_frames`` ``(B,)`` log-mel frames of real audio."""
        layer = self.config.layer
        outputs = self.backbone(input_features, output_hidden_states=layer is not None)
        hidden = _hidden(outputs, layer)  # (B, frames / 2, D): the second convolution has stride 2
        return hidden, ((n_frames + 1) // 2).clamp(1, hidden.size(1))


@AUDIO_ENCODERS.register
class ClapAudioEncoder(PretrainedAudioTower):
    """LAION CLAP's HTS-AT audio model (``ClapAudioModelWithProjection``'s ``audio_model``: its projection
    is the model's head, see ``DualEncoderModel.Config.init_from``) on ``ClapFeatureExtractor`` input at
    48 kHz: 10 s log-mels ``(B, 1, 1001, 64)``, or with ``fusion`` a global view of the whole clip and three
    crops ``(B, 4, 1001, 64)`` plus ``is_longer``. Its frame is the pooled clip embedding ``(B, 1, 768)``."""

    class Config(PretrainedAudioConfig):
        name: Literal["ClapAudioEncoder"] = "ClapAudioEncoder"
        model_id: str = "laion/clap-htsat-unfused"
        fusion: bool = False  # feature fusion for clips over 10 s: needs a fused checkpoint (laion/clap-htsat-fused)

    def __init__(self, config: Config | None = None, **inputs: Any) -> None:
        super().__init__(config, **inputs)

    @classmethod
    def load_backbone(cls, config: Config) -> nn.Module:
        from transformers import ClapAudioModelWithProjection

        model = cls.pretrained(ClapAudioModelWithProjection.from_pretrained, config)
        if bool(model.config.enable_fusion) != config.fusion:
            raise ConfigError(
                f"model.audio_enc.fusion is {config.fusion} but {config.model_id!r} was trained "
                f"{'with' if model.config.enable_fusion else 'without'} feature fusion"
            )
        return model.audio_model

    def frames(self, input_features: torch.Tensor, is_longer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.backbone(input_features=input_features, is_longer=is_longer).pooler_output  # (B, D)
        return pooled[:, None, :], torch.ones(len(pooled), dtype=torch.long, device=pooled.device)


@AUDIO_ENCODERS.register
class Wav2Vec2BertEncoder(PretrainedAudioTower):
    """``Wav2Vec2BertModel`` (w2v-BERT 2.0) on ``SeamlessM4TFeatureExtractor`` input ``(B, T, 160)`` at 16 kHz.
    ``add_adapter``, ``adapter_kernel_size``, ``adapter_stride`` and ``num_adapter_layers`` override the
    checkpoint's config (the model's own strided adapter, which shortens the sequence)."""

    class Config(LayeredAudioConfig):
        name: Literal["Wav2Vec2BertEncoder"] = "Wav2Vec2BertEncoder"
        model_id: str = "facebook/w2v-bert-2.0"
        add_adapter: bool | None = None  # None: as the checkpoint's config says
        adapter_kernel_size: PositiveInt | None = None
        adapter_stride: PositiveInt | None = None
        num_adapter_layers: PositiveInt | None = None

    def __init__(self, config: Config | None = None, **inputs: Any) -> None:
        super().__init__(config, **inputs)
        # The adapter's strided convolutions read padded frames into the last valid ones (and its attention
        # spreads them), and its layer norms make zeros non-zero again: a clip's frames would depend on its
        # batch. Each convolution's input is therefore masked to the layer's valid frames (``frames`` sets them).
        self._adapter_lengths: list[torch.Tensor] = []
        adapter = getattr(self.backbone, "adapter", None)
        for i, layer in enumerate(adapter.layers if adapter is not None else []):
            for conv in (layer.residual_conv, layer.self_attn_conv):
                conv.register_forward_pre_hook(functools.partial(self._mask_conv_input, i))

    def _mask_conv_input(self, i: int, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]  # (B, C, T) at adapter layer i
        valid = torch.arange(x.size(-1), device=x.device)[None, :] < self._adapter_lengths[i][:, None]
        return (x * valid[:, None, :].to(x.dtype), *args[1:])

    @classmethod
    def load_backbone(cls, config: Config) -> nn.Module:
        from transformers import Wav2Vec2BertModel

        names = ("add_adapter", "adapter_kernel_size", "adapter_stride", "num_adapter_layers")
        overrides = {name: getattr(config, name) for name in names if getattr(config, name) is not None}
        return cls.pretrained(Wav2Vec2BertModel.from_pretrained, config, **overrides)

    def frames(self, input_features: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.config.layer
        lengths = attention_mask.sum(-1)  # (B,) valid input frames
        adapter, config = self.backbone.adapter, self.backbone.config
        self._adapter_lengths, steps = [], lengths
        for _ in adapter.layers if adapter is not None else []:  # each adapter layer's input lengths
            self._adapter_lengths.append(steps)
            # the model's own length formula (_get_feat_extract_output_lengths), one layer at a time
            pad, kernel = config.adapter_kernel_size // 2, config.adapter_kernel_size
            steps = torch.div(steps + 2 * pad - kernel, config.adapter_stride, rounding_mode="floor") + 1
        outputs = self.backbone(input_features, attention_mask=attention_mask, output_hidden_states=layer is not None)
        if layer is None:  # after the model's own strided adapter, when it has one: the model's own formula
            lengths = self.backbone._get_feat_extract_output_lengths(lengths)
        hidden = _hidden(outputs, layer)
        return hidden, lengths.clamp(1, hidden.size(1))


@AUDIO_ENCODERS.register
class ASTEncoder(PretrainedAudioTower):
    """The Audio Spectrogram Transformer (``ASTModel``) on ``ASTFeatureExtractor`` log-mels at 16 kHz, in windows
    of the model's ``max_length`` frames (1024, 10.24 s, for the released model): ``input_values``
    ``(B, windows, max_length, mel_bins)`` (``utils.extractors.ASTInputs``). Its patch tokens become time frames:
    the CLS and distillation tokens are dropped, the patches laid out on their (frequency, time) grid and averaged
    over frequency, one frame per patch column; each window runs alone and a clip's windows' frames follow one
    another, so a long clip is seen whole and a clip's frames never depend on its batch."""

    class Config(LayeredAudioConfig):
        name: Literal["ASTEncoder"] = "ASTEncoder"
        model_id: str = "MIT/ast-finetuned-audioset-10-10-0.4593"

    def __init__(self, config: Config | None = None, **inputs: Any) -> None:
        super().__init__(config, **inputs)

    @classmethod
    def load_backbone(cls, config: Config) -> nn.Module:
        from transformers import ASTModel

        # an ASTForAudioClassification checkpoint (the released ones) loads its base model; the classifier is dropped
        return cls.pretrained(ASTModel.from_pretrained, config)

    def frames(
        self, input_values: torch.Tensor, windows: torch.Tensor, n_frames: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_values`` ``(B, W, max_length, mel_bins)``, of which each clip's first ``windows`` ``(B,)`` hold
        it (the rest is padding, never run); ``n_frames`` ``(B,)`` log-mel frames of real audio -> frames
        ``(B, W * T, D)`` (``T`` patch columns per window) and their valid lengths ``(B,)``: the columns whose
        patches start inside the clip's audio."""
        config = self.backbone.config
        batch, n_windows, length = input_values.shape[:3]
        if length != config.max_length:  # its position embeddings are those of one window's patch grid
            raise ValueError(f"{type(self).__name__}: windows of {length} frames, the model takes {config.max_length}")
        real = torch.arange(n_windows, device=input_values.device)[None, :] < windows[:, None]  # (B, W)
        layer = self.config.layer
        # the batch's real windows in one call, each its own sequence: padded windows cost nothing and touch nothing
        outputs = self.backbone(input_values=input_values[real], output_hidden_states=layer is not None)
        patches = _hidden(outputs, layer)[:, 2:]  # (N, F * T, D): after the CLS and distillation tokens
        rows, columns = self.backbone.embeddings.get_shape(config)  # (F, T)
        # ASTPatchEmbeddings convolves (B, 1, mel_bins, time) and flattens its (F, T) output grid row-major:
        # patch f * T + t is frequency row f of time column t
        per_window = patches.reshape(len(patches), rows, columns, -1).mean(1)  # (N, T, D)
        frames = per_window.new_zeros(batch, n_windows, columns, per_window.size(-1))
        frames[real] = per_window
        # all columns of the full windows, and those of the last window that start before the audio ends
        last = (windows - 1).clamp(min=0)
        rest = (n_frames - last * length).clamp(min=0)  # frames of audio in the last window
        stride = config.time_stride
        lengths = last * columns + torch.div(rest + stride - 1, stride, rounding_mode="floor").clamp(max=columns)
        return frames.reshape(batch, n_windows * columns, -1), lengths.clamp(1, n_windows * columns)
