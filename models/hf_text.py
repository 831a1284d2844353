"""Text towers from ``transformers``: captions tokenised in the data loader (``input_ids``, ``attention_mask``
``(B, L)``) -> a pretrained encoder -> one vector per caption ``(B, D)``.

A frozen tower's vectors are computed once per dataset (``preprocessing/tower_stores.py``) and come in as
``text_embeds`` ``(B, D)``, like Sentence-BERT's; its backbone is then not even loaded, and it is never
part of the state dict (it is the model id's).

A ``sequence`` tower (``CLIPTextEncoder``) gives one vector per token position instead, ``(B, L, W)``: the
hidden states that a Stable Diffusion pipeline is conditioned on.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import PositiveInt
from torch import nn

from models.hf_audio import PretrainedTower, PretrainedTowerConfig
from models.pooling import masked_mean
from models.text_encoders import TEXT_ENCODERS


class PretrainedTextConfig(PretrainedTowerConfig):
    max_length: PositiveInt = 77  # tokens per caption (CLAP: 77); longer captions are truncated


class PretrainedTextTower(PretrainedTower):
    """The shared body of the ``transformers`` text towers; subclasses load the backbone and pool."""

    Config: ClassVar[type[PretrainedTextConfig]]
    key: ClassVar[str] = "model.text_enc.model_id"
    sequence: ClassVar[bool] = False  # True: the output is a sequence (B, L, W), one vector per position
    pads_to_max_length: ClassVar[bool] = False  # True: captions are padded to max_length, not to the batch's longest

    def __init__(
        self, config: PretrainedTextConfig | None = None, *, in_dim: int | None = None, load_backbone: bool = True
    ) -> None:
        super().__init__(config, in_dim, load_backbone)
        self.out_dim = self.width

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone on tokens ``(B, L)`` -> ``(B, D)``."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens, or a frozen tower's cached ``text_embeds`` ``(B, D)`` (passed through) -> ``(B, D)``."""
        if text_embeds is not None:
            return text_embeds
        if self.backbone is None:
            raise RuntimeError(f"{type(self).__name__} was built without its backbone: pass cached text_embeds")
        return self.pool(input_ids, attention_mask)


@TEXT_ENCODERS.register
class AutoTextEncoder(PretrainedTextTower):
    """Any ``AutoModel`` text encoder (RoBERTa, BERT, MPNet, NomicBERT, ...) with masked-mean pooling over
    the caption's tokens, or the first token's state (``cls``)."""

    class Config(PretrainedTextConfig):
        name: Literal["AutoTextEncoder"] = "AutoTextEncoder"
        model_id: str = "FacebookAI/roberta-base"
        pooling: Literal["mean", "cls"] = "mean"

    def __init__(self, config: Config | None = None, **inputs: Any) -> None:
        super().__init__(config, **inputs)

    @classmethod
    def load_backbone(cls, config: Config) -> nn.Module:
        from transformers import AutoModel

        return cls.pretrained(AutoModel.from_pretrained, config)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        if self.config.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, attention_mask.sum(-1))  # tokens are left-aligned: the mask is a prefix


@TEXT_ENCODERS.register
class ClapTextEncoder(PretrainedTextTower):
    """LAION CLAP's RoBERTa text model (``ClapTextModelWithProjection``'s ``text_model``; its projection is the
    model's head, see ``DualEncoderModel.Config.init_from``), pooled as CLAP does: ``pooler_output``."""

    class Config(PretrainedTextConfig):
        name: Literal["ClapTextEncoder"] = "ClapTextEncoder"
        model_id: str = "laion/clap-htsat-unfused"

    def __init__(self, config: Config | None = None, **inputs: Any) -> None:
        super().__init__(config, **inputs)

    @classmethod
    def load_backbone(cls, config: Config) -> nn.Module:
        from transformers import ClapTextModelWithProjection

        return cls.pretrained(ClapTextModelWithProjection.from_pretrained, config).text_model

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).pooler_output


@TEXT_ENCODERS.register
class CLIPTextEncoder(PretrainedTextTower):
    """The CLIP text encoder of a Stable Diffusion pipeline (SD 2.1's: OpenCLIP ViT-H, 1024 wide, 77 positions)
    as the pipeline runs it, so its outputs are exactly the pipeline's ``prompt_embeds`` ``(B, 77, W)``: the
    ``last_hidden_state`` of the caption's tokens padded to ``max_length`` (``pads_to_max_length``; the data
    loader's ``CaptionTokens`` does it), without an attention mask unless the model's config sets
    ``use_attention_mask`` (diffusers' ``StableDiffusionPipeline.encode_prompt``). The padding positions are
    part of what the UNet attends to, so they are targets too; CLIP's causal attention keeps them from changing
    the caption's own positions.

    ``model_id`` names the pipeline's repository (or a local copy of it), ``subfolder`` and ``tokenizer_subfolder``
    where the model and its tokenizer sit in it (None: at its root, as in a plain CLIP text model folder).
    """

    sequence: ClassVar[bool] = True
    pads_to_max_length: ClassVar[bool] = True

    class Config(PretrainedTextConfig):
        name: Literal["CLIPTextEncoder"] = "CLIPTextEncoder"
        model_id: str = "stabilityai/stable-diffusion-2-1"
        subfolder: str | None = "text_encoder"  # where the model sits in the repository or folder; None: its root
        tokenizer_subfolder: str | None = "tokenizer"  # where its tokenizer sits; None: the root

    def __init__(self, config: Config | None = None, **inputs: Any) -> None:
        super().__init__(config, **inputs)

    @classmethod
    def load_backbone(cls, config: Config) -> nn.Module:
        from transformers import CLIPTextModel

        return cls.pretrained(
            CLIPTextModel.from_pretrained, config, **({"subfolder": config.subfolder} if config.subfolder else {})
        )

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, max_length)`` padded to ``max_length`` -> hidden states ``(B, max_length, W)``."""
        if input_ids.size(1) != self.config.max_length:  # padded to the longest caption: not the pipeline's input
            raise ValueError(
                f"CLIPTextEncoder takes captions padded to max_length={self.config.max_length} tokens, as a Stable "
                f"Diffusion pipeline pads them (CaptionTokens does), got {input_ids.size(1)}"
            )
        # the pipeline passes the mask only to text encoders whose config asks for it (SD's CLIP does not)
        mask = attention_mask if getattr(self.backbone.config, "use_attention_mask", False) else None
        return self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
